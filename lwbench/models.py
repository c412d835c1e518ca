"""A method around a timm backbone with a classifier head: the one place that assembles a model outside a run.

:func:`lwbench.create_model` (the Python API) and ``lwbench flops`` both build here, so a model counted or timed
on random weights is the model a user gets; ``lwbench run`` builds the same parts from its typed config
(:mod:`lwbench.runner`), with the task-trained backbone instead of random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass
class BuiltModel:
    """The assembled model and its parts: ``method`` (the :class:`~lwbench.method.Method` at its budget), the
    plain ``vit`` it wraps (for closed-form counts) and the input size ``hw``."""

    model: nn.Module
    method: Any
    vit: nn.Module
    hw: tuple[int, int]


def build_model(method: str, backbone: str, img_size, budget: str | None = None, num_classes: int = 1000,
                weights: str | None = None, opts: Any = None, seed: int | None = None) -> BuiltModel:
    """``method`` at ``budget`` around ``backbone`` (random init, seeded when ``seed`` is given, or a local
    ``weights`` file) with a linear classifier, in eval mode. ``opts``: the method's options as a dict of
    keyword arguments or its typed ``Options`` instance."""
    import torch

    from lwbench.backbones import create_backbone
    from lwbench.heads import ClassifierHead, TaskModel, default_pool
    from lwbench.method import BackboneSpec, resolve_budget
    from lwbench.registry import get_method
    from lwbench.sizes import as_hw

    hw = as_hw(img_size)
    cls = get_method(method)
    value = resolve_budget(cls, budget)
    if seed is not None:
        torch.manual_seed(seed)
    vit = create_backbone(backbone, hw, weights=weights).eval()
    spec = BackboneSpec.of(vit, backbone, hw)
    m = cls(spec, value, **(opts or {})) if opts is None or isinstance(opts, dict) else cls(spec, value, opts=opts)
    model = TaskModel(m.build(vit), ClassifierHead(spec.embed_dim, num_classes, default_pool(vit))).eval()
    return BuiltModel(model, m, vit, hw)


__all__ = ["BuiltModel", "build_model"]
