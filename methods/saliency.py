"""``saliency``: the k high-res patches with the most pixel activity, through the backbone. Budget = k.

The "no learning" floor of *where to look*: a parameter-free image statistic ranks the patches, with no teacher,
no selector to train and no attention. A learned selector (LookWhere, DPS, IPS) earns its training only by
beating it at the same k; read with ``object_recall`` it places every selector between this and ``oracle``.

The statistic (option ``statistic``), per patch of the backbone's grid, on the model's input pixels:

* ``variance`` (default): the variance of the patch's pixel values over its channels and positions, i.e.
  ``mean(v^2) - mean(v)^2`` over the ``C * p * p`` values ``v``. Flat sky and road score 0; signs, windows and
  text score high.
* ``edges``: the mean squared forward difference along rows and columns (summed over channels) inside the
  patch, a cheap edge energy: the border of a sign scores high even where its interior is flat.

Indices are the top-k scores sorted ascending (``torch.topk`` then sort), so k = all patches is the plain model
exactly. Selection cost is counted: the statistic is an :class:`~lwbench.method.Overhead` module with
``counts_elementwise``, so its elementwise ops count one MAC per element (``lwbench.measure.flops``): 0.7 MMACs
(variance) or 1.3 MMACs (edges) per 240x320 image, beside 30 MMACs for the quick backbone at k=28.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench.method import Overhead, PatchSelectionMethod, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import patch_cells, patch_size, run_selected

STATISTICS = ("variance", "edges")


def _cells(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C, p, p)``: the grid's patches, row-major (one copy)."""
    return patch_cells(x, p).flatten(1, 2)


def patch_variance(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, N)``: variance (population, ``mean(v^2) - mean(v)^2``) of each patch's ``C*p*p`` pixel values."""
    cells = _cells(x, p).flatten(2)
    mean = cells.mean(-1)
    return (cells * cells).mean(-1) - mean * mean


def patch_edge_energy(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, N)``: mean over each patch of the squared forward differences along rows and columns, summed over
    channels (differences that would cross the patch's border are left out, so a patch's score is its own)."""
    cells = _cells(x, p)
    dx = cells[..., :, 1:] - cells[..., :, :-1]
    dy = cells[..., 1:, :] - cells[..., :-1, :]
    return (dx * dx).sum((2, 3, 4)) / (p * (p - 1)) + (dy * dy).sum((2, 3, 4)) / (p * (p - 1))


class PixelSaliency(Overhead):
    """The per-patch statistic: selection overhead whose work is all elementwise, so it asks to be counted."""

    counts_elementwise = True

    def __init__(self, patch: int, statistic: str = "variance"):
        super().__init__()
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, not {statistic!r}")
        self.patch = patch
        self.statistic = statistic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistic == "edges":
            return patch_edge_energy(x, self.patch)
        return patch_variance(x, self.patch)


class SaliencyEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int, statistic: str = "variance"):
        super().__init__()
        self.vit = vit
        self.k = k
        self.scorer = PixelSaliency(patch_size(vit), statistic)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        scores = self.scorer(x)
        idx = scores.topk(self.k, dim=1).indices.sort(dim=1).values
        return run_selected(self.vit, x, idx)


@register_method("saliency")
class SaliencyPatches(PatchSelectionMethod):
    description = "k high-res patches with the highest pixel variance or edge energy (no learning; a floor)"
    style = ("#b8860b", r"$\mathbf{S}$")  # the two reference selectors are letters: S(aliency), O(racle)
    training = "none"  # off the shelf as it is; the finetuned regime fine-tunes it at k like every training-free one

    @dataclass(frozen=True)
    class Options:
        statistic: str = option("variance", "per-patch image statistic that ranks the patches", choices=STATISTICS)

    def build(self, vit):
        return SaliencyEncoder(detach_copy(vit), int(self.budget), statistic=self.opts.statistic)
