"""``full``: the whole high-resolution image through the plain backbone. The reference point.

Its encoder, :class:`lwbench.vit.FullEncoder`, is timm's own forward (the teacher uses it too)."""

from __future__ import annotations

from torch import nn

from lwbench.method import Method, detach_copy
from lwbench.registry import register_method
from lwbench.vit import FullEncoder


@register_method("full")
class Full(Method):
    description = "whole high-res image through the backbone (reference)"
    style = ("#3a3a3a", "*")
    kind = "baseline"
    budget_key = None
    training = "none"  # the task-trained backbone itself (trained once per task and cached)

    def build(self, vit: nn.Module) -> nn.Module:
        return FullEncoder(detach_copy(vit))


__all__ = ["Full", "FullEncoder"]
