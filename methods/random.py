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
    #: The evaluation draw depends on the batch shape only, so its indices are drawn once per ``(batch, n,
    #: device)`` and reused (no host-to-device copy after the first forward). ``oracle`` ranks by the images.
    content_blind = True

    def __init__(self, vit: nn.Module, k: int, seed: int = 0):
        super().__init__()
        self.vit = vit
        self.k = k
        self.seed = seed
        # (batch, n, device) -> (B, k) indices of the evaluation draw: a plain attribute, not a buffer, so the
        # state_dict keys stay those of the backbone
        self._eval_indices: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def cell_scores(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, n)`` on the CPU: the k highest are kept. Uniform draws (``oracle`` raises its object cells)."""
        gen = None
        if not self.training:  # deterministic evaluation: same draw for the same batch position
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(x.shape[0], n, generator=gen)

    def top_k(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(self.k, dim=1).indices.sort(dim=1).values

    def cell_indices(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, k)`` sorted cell indices on ``x``'s device."""
        if not self.content_blind:
            return self.top_k(self.cell_scores(x, n).to(x.device))
        if self.training:
            if x.device.type == "cpu":  # the CPU draw as it always was (the global CPU stream, bit for bit)
                return self.top_k(self.cell_scores(x, n))
            # On an accelerator the draw is made there (its own generator), not copied from the host every step.
            return self.top_k(torch.rand(x.shape[0], n, device=x.device))
        key = (x.shape[0], n, x.device)
        idx = self._eval_indices.get(key)
        if idx is None:
            # The same seeded CPU draw and the same top-k on the device as ever (ties broken alike), done once.
            # Made outside inference mode: a forward with autograd on may read it later (gather saves it).
            with torch.inference_mode(False):
                idx = self.top_k(self.cell_scores(x, n).to(x.device))
            self._eval_indices[key] = idx
        return idx

    def forward(self, x: torch.Tensor) -> TokenOutput:
        grid = grid_of(self.vit, x)
        return run_selected(self.vit, x, self.cell_indices(x, grid[0] * grid[1]))


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
