"""Mixed precision for a whole run (``RunConfig.autocast``): the same setting around every training step,
every evaluation batch and every timed call, so a row's accuracy and its latency come from one numeric regime.

``torch.autocast`` keeps the weights in float32 and runs matmuls / attention in bfloat16; the loss and the
backward stay outside it, as PyTorch recommends. Outputs are cast back to float32 so that metrics, losses and
the bootstrap never see bfloat16 rounding of their own. With ``"none"`` every helper here is a no-op, so the
float32 path is bit-for-bit the one without this module.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lwbench.errors import ConfigError

_DTYPES = {"bfloat16": torch.bfloat16}


def autocast(device: str | torch.device, name: str = "none") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``name`` on ``device``'s type, or a null context for ``"none"``."""
    if name in (None, "none"):
        return contextlib.nullcontext()
    if name not in _DTYPES:
        raise ConfigError(f"autocast '{name}' is not offered; use none or {', '.join(_DTYPES)}")
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    return torch.autocast(device_type=kind, dtype=_DTYPES[name])


def _to_float(obj):
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


class Autocast(nn.Module):
    """``model`` whose forward runs under :func:`autocast` and returns float32 outputs. Attribute access falls
    through to ``model`` (``.encoder``, ``.head``), so evaluation code and diagnostics see the model itself."""

    def __init__(self, model: nn.Module, name: str, device: str | torch.device = "cpu"):
        super().__init__()
        self.model = model
        self.name = name
        self.device_type = torch.device(device).type

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(super().__getattr__("model"), item)

    def forward(self, *args, **kwargs):
        with autocast(self.device_type, self.name):
            return _to_float(self.model(*args, **kwargs))


def wrap(model: nn.Module, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` itself for ``"none"`` (nothing changes), else :class:`Autocast` around it."""
    return model if name in (None, "none") else Autocast(model, name, device)
