"""``grid``: k high-res patches on a regular lattice, through the backbone. Budget = k.

The uniform-sampling baseline beside ``random`` (recent studies find such content-blind choices hard to beat,
e.g. arXiv:2502.11501): every image gets the same k cells, spread evenly over the frame, so the comparison says
what a selector gains over looking everywhere at a coarser stride.

Which k cells, on an H x W patch grid (deterministic, any H, W and 1 <= k <= H*W):

1. a lattice of ``r`` rows and ``c`` columns with the grid's aspect ratio: ``r = round(sqrt(k * H / W))``
   clamped to ``1..H``, ``c = ceil(k / r)``; if ``c > W`` then ``c = W`` and ``r = ceil(k / W)``;
2. row ``i`` sits at cell row ``floor((i + 1/2) * H / r)``, column ``j`` at ``floor((j + 1/2) * W / c)`` (the
   centres of r x c equal strips, so distinct cells);
3. when the lattice has more than k cells, keep the lattice points ``floor(t * r * c / k)``, t = 0..k-1, in
   row-major order (evenly thinned, the first one kept).

So k = H*W is every cell in order (the plain model exactly), and e.g. k=4 on 4x4 is cells (1,1), (1,3), (3,1),
(3,3). No selection cost: the indices are fixed per grid and computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lwbench.config import Stage
from lwbench.method import PatchSelectionMethod, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import grid_of, run_selected


def lattice_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """Rows and columns of the smallest aspect-matched lattice with at least ``k`` points (step 1 above)."""
    if not 1 <= k <= h * w:
        raise ValueError(f"k={k} outside 1..{h * w}")
    r = min(h, max(1, round(math.sqrt(k * h / w))))
    c = math.ceil(k / r)
    if c > w:
        c = w
        r = math.ceil(k / w)
    return r, c


def grid_indices(h: int, w: int, k: int) -> torch.Tensor:
    """The k cell indices (row-major, ascending) of the regular lattice on an ``h x w`` patch grid."""
    r, c = lattice_shape(h, w, k)
    rows = [int((i + 0.5) * h / r) for i in range(r)]
    cols = [int((j + 0.5) * w / c) for j in range(c)]
    points = [y * w + x for y in rows for x in cols]
    keep = [points[(t * len(points)) // k] for t in range(k)]
    return torch.tensor(sorted(keep), dtype=torch.long)


class GridPatchEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int):
        super().__init__()
        self.vit = vit
        self.k = k
        # (h, w, k, device) -> (k,) indices: built and copied to the device once, not every forward (a plain
        # attribute, not a buffer, so the state_dict keys stay those of the backbone)
        self._indices: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}

    def indices(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """:func:`grid_indices` on ``device``, cached."""
        key = (h, w, self.k, device)
        idx = self._indices.get(key)
        if idx is None:
            # Outside inference mode: a training forward may read it later (gather saves its index for backward).
            with torch.inference_mode(False):
                idx = grid_indices(h, w, self.k).to(device)
            self._indices[key] = idx
        return idx

    def forward(self, x: torch.Tensor) -> TokenOutput:
        h, w = grid_of(self.vit, x)
        return run_selected(self.vit, x, self.indices(h, w, x.device).expand(x.shape[0], -1))


@register_method("grid")
class GridPatches(PatchSelectionMethod):
    description = "k high-res patches on a regular lattice (uniform sampling, the same cells for every image)"
    style = ("#393b79", "p")
    training = "finetune"

    @dataclass(frozen=True)
    class Options:
        finetune: Stage = option(default_factory=Stage, help="fine-tuning at k (steps=0: none)")

    def build(self, vit):
        return GridPatchEncoder(detach_copy(vit), int(self.budget))

    def fit(self, ctx):
        # One fine-tuning at the budget, the method's own stage, which inherits the run's train.* recipe.
        return self.finetuned_once(ctx, tag=f"grid-{self.budget}")
