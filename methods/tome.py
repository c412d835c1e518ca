"""``tome``: Token Merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT but Faster"). Budget = r.

In every block, between attention and MLP, ``r`` patch tokens are merged into their most similar
partner by bipartite soft matching, training-free. Following the official code
(facebookresearch/ToMe, ``tome/merge.py`` and ``tome/patch/timm.py``):

* similarity = cosine of the block's keys averaged over heads; tokens alternate into sets A and B
  by their index in the sequence; each A token proposes its most similar B token and the ``r``
  A tokens with the highest similarity are merged into their B partner; the new order is
  ``[unmerged A in order, B]``;
* merging is size-weighted (``merge_wavg``), sizes are carried from block to block, and attention
  is proportional: ``log(size)`` is added to the attention logits of every key. Here that bias is folded
  into the dot product (one more channel of q and k, :func:`lwbench.attention.sdpa_key_bias`) rather than handed
  to SDPA as a float ``attn_mask``: the same logits (float rounding aside), but no mask, so CUDA can run its
  flash kernel, which takes none;
* the source of every token is tracked, here as an ``assignment`` (the token every grid cell ended
  in) rather than the official dense source matrix, so ``densify`` un-merges at ``O(N)`` cost.

Generalised beyond the paper's ViT-B/16: any grid and any number of prefix tokens. CLS *and*
registers are kept out of both sets, so they are never merged nor merged into (the official code
protects CLS only). A/B parity still follows the sequence index (patch ``j`` is in A when
``num_prefix + j`` is even), so for a CLS-only ViT the matching is exactly the official one.

RoPE backbones (``Eva``: DINOv3, EVA-02): the bipartite metric is the block's keys *before* the rotary
embedding (after its k-norm), i.e. what the tokens contain, not where they are (rotated keys of equal
content at different cells differ by their rotation, which would stand in for similarity). A merged
token keeps its destination's (B token's) cell, as ``positions`` tracks it, and with it that cell's
RoPE in every later block (see :mod:`lwbench.eva`).

Per-layer ``r`` is capped at ``floor(tokens / 2)`` (bipartite matching cannot merge more than the
smaller set), so every layer keeps at least half its patch tokens and never fewer than one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

from ._reduction import (
    attention_step,
    biased_block,
    cells_per_token,
    check_blocks,
    gather_tokens,
    mlp_residual,
    rope_of,
    start_tokens,
    tokens_per_layer,
)

SCHEDULES = ("constant", "decreasing")


def tome_schedule(r: int, depth: int, schedule: str = "constant") -> list[int]:
    """Nominal tokens merged per block. ``decreasing`` is ToMe's ``(r, inflection=-1)``: linear from 2r to 0."""
    if schedule == "constant" or depth == 1:
        return [int(r)] * depth
    lo, hi = 2 * r, 0  # official parse_r with inflect = -1, same arithmetic (and truncation)
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def size_bias(size: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Proportional attention: ``(B, T, 1)`` patch sizes -> ``(B, P + T)`` additive logit bias ``log(size)`` per key
    (prefix tokens have size 1), the ``key_bias`` of :func:`~lwbench.methods._reduction.attention_step`."""
    log = size.squeeze(-1).log()
    return torch.cat([log.new_zeros(log.shape[0], num_prefix), log], dim=1)


class BipartiteMatcher(Overhead):
    """ToMe's bipartite soft matching plus size-weighted merge and source tracking, for one block."""

    def __init__(self, a_offset: int):
        super().__init__()
        self.a_offset = int(a_offset)  # 0: A = patches 0, 2, 4 ...; 1: A = patches 1, 3, ...

    def match(self, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices into A of the unmerged (sorted) and merged tokens, and the B partner of each merged one."""
        with torch.no_grad():
            m = metric / metric.norm(dim=-1, keepdim=True)
            a, b = m[:, self.a_offset :: 2], m[:, 1 - self.a_offset :: 2]
            scores = a @ b.transpose(-1, -2)  # (B, Ta, Tb)
            node_max, node_idx = scores.max(dim=-1)
            order = node_max.argsort(dim=-1, descending=True, stable=True)
            src = order[:, :r]
            unm = order[:, r:].sort(dim=-1).values  # keep the unmerged tokens in sequence order
            dst = node_idx.gather(1, src)
        return unm, src, dst

    def forward(self, x, metric, size, positions, assignment, r: int):
        """Merge ``r`` of the ``(B, T, D)`` patch tokens ``x`` (``size`` ``(B, T, 1)``, ``positions`` ``(B, T)``,
        ``assignment`` ``(B, N)``). Returns the same four for the ``T - r`` merged tokens."""
        unm, src, dst = self.match(metric, r)
        bsz, t, d = x.shape
        sa, sb = size[:, self.a_offset :: 2], size[:, 1 - self.a_offset :: 2]
        wx = x * size
        wa, wb = wx[:, self.a_offset :: 2], wx[:, 1 - self.a_offset :: 2]
        wb = wb.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, d), gather_tokens(wa, src))
        sb = sb.scatter_add(1, dst.unsqueeze(-1), gather_tokens(sa, src))
        new_size = torch.cat([gather_tokens(sa, unm), sb], dim=1)
        new_x = torch.cat([gather_tokens(wa, unm), wb], dim=1) / new_size

        pa, pb = positions[:, self.a_offset :: 2], positions[:, 1 - self.a_offset :: 2]
        new_pos = torch.cat([pa.gather(1, unm), pb], dim=1)  # a merged token keeps its B partner's cell

        # Where each current token goes, then compose with where each cell was.
        n_unm, n_b = unm.shape[1], pb.shape[1]
        ar = torch.arange(t, device=x.device)
        map_a = torch.empty_like(positions[:, self.a_offset :: 2])
        map_a.scatter_(1, unm, ar[:n_unm].expand(bsz, -1).contiguous())
        map_a.scatter_(1, src, n_unm + dst)
        new_index = torch.empty_like(positions)
        new_index[:, self.a_offset :: 2] = map_a
        new_index[:, 1 - self.a_offset :: 2] = n_unm + ar[:n_b].expand(bsz, -1)
        return new_x, new_size, new_pos, new_index.gather(1, assignment)


class ToMeEncoder(nn.Module):
    def __init__(self, vit: nn.Module, schedule: list[int], prop_attn: bool = True):
        super().__init__()
        self.vit = vit
        self.schedule = list(schedule)
        self.prop_attn = prop_attn
        p = num_prefix(vit)
        self.matchers = nn.ModuleList(BipartiteMatcher(a_offset=p % 2) for _ in vit.blocks)

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        assignment = positions.clone()
        size = None  # all ones until the first merge: no bias, so r=0 is the plain model bit for bit
        rope = rope_of(vit, grid)  # RoPE backbones: the grid's table until tokens merge, then at their cells
        counts = []
        for blk, matcher, r in zip(vit.blocks, self.matchers, self.schedule, strict=True):
            r = min(r, (h.shape[1] - p) // 2)
            bias = size_bias(size, p) if (self.prop_attn and size is not None) else None
            if r <= 0:
                h = biased_block(blk, h, rope, bias)
            else:
                h, _, k, _ = attention_step(blk, h, rope=rope, need_v=False, rotated=False, key_bias=bias)
                metric = k.mean(dim=1)[:, p:]  # keys averaged over heads, patch tokens only
                if size is None:
                    size = h.new_ones(bsz, h.shape[1] - p, 1)
                pat, size, positions, assignment = matcher(h[:, p:], metric, size, positions, assignment, r)
                h = mlp_residual(blk, torch.cat([h[:, :p], pat], dim=1))
                rope = rope_of(vit, grid, positions)
            counts.append(h.shape[1] - p)
        sizes = cells_per_token(assignment, h.shape[1] - p)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        return to_output(vit, h, positions, grid, assignment=assignment, sizes=sizes, aux=aux)


@register_method("tome")
class ToMe(Method):
    description = "Token Merging: r patch tokens merged per block by bipartite key matching (training-free)"
    style = ("#d62728", "s")
    kind = "reduction"
    budget_key = "r"
    budget_type = int
    default_budgets = ()  # scaled to the grid and depth by budget_grid() (ViT-B/16 at 224 px: 4, 8, 12, 15)
    training = "none"
    dense_output = True
    variable_length = False

    @dataclass(frozen=True)
    class Options:
        schedule: str = option("constant", "r per block: constant, or decreasing from 2r to 0", choices=SCHEDULES)
        prop_attn: bool = option(True, "proportional attention (log of merged sizes added to the logits)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 0  # r = 0: no block merges

    @classmethod
    def max_r(cls, spec, schedule: str = "constant") -> int:
        """Largest r the first block can honour: bipartite matching merges at most floor(N/2) of N tokens,
        and the decreasing schedule asks for 2r there."""
        half = spec.num_patches // 2
        return half if schedule == "constant" else half // 2

    @classmethod
    def budget_grid(cls, spec):
        """r removing about 1/4, 1/2, 3/4 and 9/10 of the patch tokens by the last block (r * depth / N)."""
        n, depth = spec.num_patches, spec.depth
        hi = cls.max_r(spec)
        return sorted({min(hi, max(1, round(f * n / depth))) for f in (0.25, 0.5, 0.75, 0.9)})

    @classmethod
    def default_budget(cls, spec):
        grid = cls.budget_grid(spec)
        return grid[(len(grid) - 1) // 2]  # about half the patch tokens merged away by the last block

    def check_budget(self):
        schedule = self.opts.schedule
        hi = self.max_r(self.spec, schedule)
        why = "bipartite matching merges at most half the tokens of a block"
        if schedule == "decreasing":
            why += "; the decreasing schedule merges 2r in the first block"
        self._require(0 <= self.budget <= hi, f"r=0..{hi} ({why})")

    def schedule(self) -> list[int]:
        return tome_schedule(int(self.budget), self.spec.depth, self.opts.schedule)

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "tome")
        return ToMeEncoder(vit, self.schedule(), prop_attn=self.opts.prop_attn)
