"""A third-party method as a user would write it in an afternoon: keep the first k patches in raster order.

Only public lwbench API (``lwbench.method``, ``lwbench.registry``, ``lwbench.vit``), no lwbench internals, so
``tests/test_contracts.py`` can check that the contracts every built-in meets hold for an outside method too.
Load it with ``lwbench ... --plugin tests/plugins/contract_plugin.py`` or ``METHODS.load_module(path)``.
"""

from __future__ import annotations

import torch
from torch import nn

from lwbench.method import Method, detach_copy
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import run_selected


class FirstPatchesEncoder(nn.Module):
    """The backbone on the first ``k`` patches of the grid (row-major); the rest are dropped before embedding."""

    def __init__(self, vit: nn.Module, k: int):
        super().__init__()
        self.vit = vit
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        idx = torch.arange(self.k, device=x.device).expand(x.shape[0], -1)
        return run_selected(self.vit, x, idx)


@register_method("contract_plugin_drop")
class DropLastPatches(Method):
    description = "keeps the first k patches in raster order and drops the rest (test plugin)"
    kind = "selection"
    training = "none"
    budget_key = "k"
    budget_type = int

    @classmethod
    def budget_grid(cls, spec) -> list[int]:
        """A quarter, a half and all of the grid: valid on any grid."""
        n = spec.num_patches
        return sorted({max(1, n // 4), max(1, n // 2), n})

    @classmethod
    def default_budget(cls, spec) -> int:
        return max(1, spec.num_patches // 2)

    @classmethod
    def noop_budget(cls, spec) -> int:
        return spec.num_patches  # the first k = all patches: every patch, in grid order

    def check_budget(self) -> None:
        n = self.spec.num_patches
        self._require(1 <= self.budget <= n, f"k=1..{n}")

    def build(self, vit: nn.Module) -> nn.Module:
        return FirstPatchesEncoder(detach_copy(vit), int(self.budget))
