"""``full``: the whole high-resolution image through the plain backbone. The reference point."""

from __future__ import annotations

import torch
from torch import nn

from lwbench.method import Method, detach_copy
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, grid_of, num_prefix


class FullEncoder(nn.Module):
    """timm's own ``forward_features`` (fused attention, its norm), split into prefix and patches."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> TokenOutput:
        feats = self.vit.forward_features(x)
        p = num_prefix(self.vit)
        grid = grid_of(self.vit, x)
        return TokenOutput(feats[:, :p], feats[:, p:], all_positions(x.shape[0], grid, x.device), grid)


@register_method("full")
class Full(Method):
    description = "whole high-res image through the backbone (reference)"
    kind = "baseline"
    budget_key = None
    training = "none"  # the task-trained backbone itself (trained once per task and cached)

    def build(self, vit: nn.Module) -> nn.Module:
        return FullEncoder(detach_copy(vit))
