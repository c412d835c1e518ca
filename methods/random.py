"""``random``: k high-res patches drawn uniformly at random, through the backbone. Budget = k.

The floor every learned selector must beat. Indices are sorted so that k = all patches is the
plain model exactly. Only the drawn patches are embedded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench.config import Stage
from lwbench.method import PatchSelectionMethod, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import grid_of, run_selected


class RandomPatchEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int, seed: int = 0):
        super().__init__()
        self.vit = vit
        self.k = k
        self.seed = seed

    def cell_scores(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, n)`` on the CPU: the k highest are kept. Uniform draws (``oracle`` raises its object cells)."""
        gen = None
        if not self.training:  # deterministic evaluation: same draw for the same batch position
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(x.shape[0], n, generator=gen)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        grid = grid_of(self.vit, x)
        scores = self.cell_scores(x, grid[0] * grid[1]).to(x.device)
        idx = scores.topk(self.k, dim=1).indices.sort(dim=1).values
        return run_selected(self.vit, x, idx)


@register_method("random")
class RandomPatches(PatchSelectionMethod):
    description = "k uniformly random high-res patches through the backbone"
    style = ("#8c8c8c", "X")
    training = "finetune"
    version = 2  # 2: one fine-tuning at the budget (1 ran the default train.* fine-tuning and then its own again)

    @dataclass(frozen=True)
    class Options:
        seed: int = option(0, "seed of the evaluation-time draw", min=0)
        finetune: Stage = option(default_factory=Stage, help="fine-tuning at k (steps=0: none)")

    def build(self, vit):
        return RandomPatchEncoder(detach_copy(vit), int(self.budget), seed=self.opts.seed)

    def fit(self, ctx):
        # One fine-tuning at the budget: the method's own stage, which inherits the run's train.* recipe. (Before
        # version 2 the default fit's train.* fine-tuning ran first and this stage again on top: twice the steps
        # the row reported and every other method got.)
        return self.finetuned_once(ctx, tag=f"random-{self.budget}")
