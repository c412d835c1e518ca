"""``lowres``: the whole image downsampled, through the same backbone. Budget = low-res height in px.

The backbone's position embedding is resampled once to the low-res grid (timm's
``set_input_size``), so the model is the plain ViT at a smaller input. By default it is briefly
fine-tuned at that resolution (``finetune=True``) so the baseline is not handicapped by a
train/test resolution mismatch; set ``--set method.finetune=false`` for the training-free variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.config import Stage
from lwbench.method import BackboneSpec, Method, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, grid_of, num_prefix


def lowres_size(spec, height: int) -> tuple[int, int]:
    """(h, w) keeping the aspect ratio, both multiples of the patch size."""
    h0, w0 = spec.img_size
    p = spec.patch
    h = int(height)
    w = max(p, int(round(w0 * h / h0 / p)) * p)
    return h, w


class LowResEncoder(nn.Module):
    def __init__(self, vit: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.size = size
        self.vit = vit
        self.vit.set_input_size(img_size=size)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        feats = self.vit.forward_features(x)
        p = num_prefix(self.vit)
        grid = grid_of(self.vit, x)
        return TokenOutput(feats[:, :p], feats[:, p:], all_positions(x.shape[0], grid, x.device), grid)


@register_method("lowres")
class LowRes(Method):
    description = "whole image downsampled to the budget height (aspect kept)"
    style = ("#8c564b", "v")
    kind = "baseline"
    budget_key = "size"
    training = "finetune"
    version = 2  # 2: one fine-tuning at the budget (1 ran the default train.* fine-tuning and then its own again)

    @dataclass(frozen=True)
    class Options:
        finetune: Stage = option(default_factory=Stage, help="fine-tuning at this size (steps=0: none)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return spec.img_size[0]  # "downsampled" to the high-res height: no resize at all

    @classmethod
    def default_budget(cls, spec):
        grid = cls.budget_grid(spec)
        return grid[min(1, len(grid) - 1)]

    @classmethod
    def budget_grid(cls, spec):
        """Heights at 1/4, 1/3 and 1/2 of the high-res height, rounded to the patch size."""
        h, p = spec.img_size[0], spec.patch
        return sorted({max(p, round(h * f / p) * p) for f in (0.25, 1 / 3, 0.5)})

    def check_budget(self):
        p, h = self.spec.patch, self.spec.img_size[0]
        self._require(self.budget % p == 0 and p <= self.budget <= h,
                      f"size=multiple of {p} between {p} and {h} (the high-res height)")

    def build(self, vit):
        return LowResEncoder(detach_copy(vit), lowres_size(self.spec, self.budget))

    def fit(self, ctx):
        # One fine-tuning at the budget: the method's own stage, which inherits the run's train.* recipe. (Before
        # version 2 the default fit's train.* fine-tuning ran first and this stage again on top: twice the steps
        # the row reported and every other method got.)
        return self.finetuned_once(ctx, tag=f"lowres-{self.budget}")
