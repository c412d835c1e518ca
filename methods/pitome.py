"""``pitome``: Protect Informative Tokens before Merging (Tran et al., NeurIPS 2024, "Accelerating Transformers
with Spectrum-Preserving Token Merging"). Budget = r tokens merged per block, as ToMe. Training-free.

In every block, between attention and MLP, following the official code (hchautran/PiToMe,
``algo/pitome/merge.py``: ``pitome_vision`` and ``pitome`` with its default ``use_bsm_pitome=False``;
``patch/timm.py``):

* metric = the block's keys averaged over heads, patch tokens only (CLS and registers excluded), L2-normalised;
  ``sim`` their cosine matrix (self-similarity 1 included);
* **energy** of token i: ``E_i = mean_j ELU(sim_ij - margin, alpha)`` with the official ``margin = 0.5``,
  ``alpha = 1``. A token in a large cluster of similar tokens has high energy; a unique, isolated one low;
* tokens sorted by energy, highest first: the first ``2r`` are *mergeable*, the rest are **protected**
  (kept as they are: the low-energy, informative tokens). The mergeable ones alternate into A (ranks 0, 2, ...)
  and B (1, 3, ...), and **every** A token merges into its most similar B token (unlike ToMe, no second
  ranking: the energy order already chose them);
* merging is size-weighted (the official ``merge_wavg``), sizes are carried, and attention is proportional
  (``log size`` added to the logits as a float mask, fused attention kept), as in ToMe;
* the new order is ``[protected, B]``; here the protected tokens keep their sequence order (the official code
  keeps them in energy order; attention is permutation-equivariant, so the outputs agree up to order).

Departures (documented): CLS *and* registers are kept out of the metric and never merged (the official code
protects CLS only); ``margin`` is one value for every block (the official default of ``init_margin``; the
model wrappers may set per-block margins, which were not checked here), an option; merged tokens keep their
B token's cell and RoPE (Eva backbones) as in :mod:`lwbench.methods.tome`. The issue text that asked for this
method says "protecting high-energy tokens"; the paper and the code protect the *low*-energy ones, and so does
this file. Per-block r is capped at ``floor(tokens / 2)`` (2r mergeable tokens at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.method import Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method

from ._reduction import check_blocks, gather_tokens
from .tome import SCHEDULES, ToMe, ToMeEncoder


def energy_scores(metric: torch.Tensor, margin: float = 0.5, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy ``(B, T)``: ``mean_j ELU(cos(x_i, x_j) - margin, alpha)`` over all T tokens, i included."""
    m = F.normalize(metric, p=2, dim=-1)
    return F.elu(m @ m.transpose(-1, -2) - margin, alpha=alpha).mean(dim=-1)


class EnergyMerger(Overhead):
    """Energy scores, the mergeable/protected split, the A->B merge (size-weighted) and source tracking."""

    def __init__(self, margin: float, alpha: float):
        super().__init__()
        self.margin, self.alpha = float(margin), float(alpha)

    def plan(self, metric: torch.Tensor, r: int):
        """Indices of the protected tokens (sequence order), of A and B, and each A token's B partner."""
        with torch.no_grad():
            order = energy_scores(metric, self.margin, self.alpha).argsort(dim=-1, descending=True, stable=True)
            merge, protected = order[:, : 2 * r], order[:, 2 * r :].sort(dim=-1).values
            a, b = merge[:, 0::2], merge[:, 1::2]
            m = F.normalize(metric, p=2, dim=-1)
            sim = gather_tokens(m, a) @ gather_tokens(m, b).transpose(-1, -2)  # (B, r, r)
            dst = sim.argmax(dim=-1)  # into b
        return protected, a, b, dst

    def forward(self, x, metric, size, positions, assignment, r: int):
        """Merge ``r`` of the ``(B, T, D)`` patch tokens; returns tokens, sizes, positions, assignment."""
        protected, a, b, dst = self.plan(metric, r)
        bsz, t, d = x.shape
        wx = x * size
        wb = gather_tokens(wx, b).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, d), gather_tokens(wx, a))
        sb = gather_tokens(size, b).scatter_add(1, dst.unsqueeze(-1), gather_tokens(size, a))
        new_size = torch.cat([gather_tokens(size, protected), sb], dim=1)
        new_x = torch.cat([gather_tokens(wx, protected), wb], dim=1) / new_size
        new_pos = torch.cat([positions.gather(1, protected), positions.gather(1, b)], dim=1)

        n_p = protected.shape[1]
        ar = torch.arange(t, device=x.device).expand(bsz, -1)
        new_index = torch.empty_like(positions)
        new_index.scatter_(1, protected, ar[:, :n_p].contiguous())
        new_index.scatter_(1, b, n_p + ar[:, :r].contiguous())
        new_index.scatter_(1, a, n_p + dst)  # an A token now lives in its B partner
        return new_x, new_size, new_pos, new_index.gather(1, assignment)


class PiToMeEncoder(ToMeEncoder):
    """ToMe's block loop (attention, merge between attention and MLP, proportional attention, source tracking)
    with PiToMe's :class:`EnergyMerger` in place of bipartite matching in every block."""

    def __init__(self, vit: nn.Module, schedule: list[int], margin: float, alpha: float, prop_attn: bool = True):
        super().__init__(vit, schedule, prop_attn=prop_attn)
        self.matchers = nn.ModuleList(EnergyMerger(margin, alpha) for _ in vit.blocks)


@register_method("pitome")
class PiToMe(ToMe):
    """ToMe's budget (r per block, its grid and range); PiToMe's energy-guided choice of what merges."""

    description = "PiToMe: merge the 2r highest-energy (most redundant) tokens per block, protect the rest"

    @dataclass(frozen=True)
    class Options:
        margin: float = option(0.5, "energy margin m in ELU(cos - m) (official default 0.5)", min=-1, max=1)
        alpha: float = option(1.0, "ELU alpha of the energy (official 1.0)", min=0, min_exclusive=True)
        schedule: str = option("constant", "r per block: constant, or decreasing from 2r to 0", choices=SCHEDULES)
        prop_attn: bool = option(True, "proportional attention (log of merged sizes added to the logits)")

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "pitome")
        return PiToMeEncoder(vit, self.schedule(), self.opts.margin, self.opts.alpha, prop_attn=self.opts.prop_attn)


__all__ = ["PiToMe", "PiToMeEncoder", "EnergyMerger", "energy_scores"]
