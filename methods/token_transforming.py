"""``token_transforming``: Token Transforming (Zeng, Yu, Kong, Tang, arXiv:2506.05709, "Token Transforming: A Unified
and Training-Free Token Compression Framework for Vision Transformer Acceleration"; its workshop version is M2M-TAG,
NeurIPS 2024 workshop). Budget = r tokens removed per block, as ToMe. Training-free.

**Provenance, read first.** The official repository (github ``AuroraZengfh/TokenTransforming``) holds no code: at
its newest commit (dedcac5, 2025-06-29) it has a README ("We will gradually update the code for training and
inference") and a LICENSE, nothing else; no other public implementation was found, and the stored copies of the
paper reach only its abstract, Figure 1 and the start of its introduction. What those fix: token reduction is an
explicit matrix transformation ``Y = W X`` of the ``N`` tokens into ``M < N``; pruning is a ``W`` whose rows are
one-hot (one-to-one), merging one whose columns are one-hot (many-to-one, exclusive), and Token Transforming a
many-to-many ``W`` in which an original token contributes to several remaining tokens; it is training-free (DeiT-S:
-40% FLOPs, 1.5x, -0.1% top-1) and is applied to dense prediction too. Everything below that is not in that list
is this file's reconstruction in the conventions of the methods the paper generalises (EViT's selection, ToMe's
metric, sizes and proportional attention); each free choice is an option, and the file's version must change when
the official code appears and is compared. It is *not* verified against official code.

The transform, in every block with ``r > 0``, between attention and MLP (where ToMe and EViT act):

* **targets** (the remaining tokens): the ``M = n - r`` patch tokens the CLS token attends to most (its softmax
  row, with the proportional-attention bias the block used, averaged over heads), as EViT picks its attentive
  tokens; kept in sequence order. CLS and registers are never targets nor sources (always kept as they are);
* **similarity**: cosine of the block's keys averaged over heads (ToMe's metric), between every removed token and
  every target; for RoPE backbones (``Eva``) the keys before rotation, as :mod:`lwbench.methods.tome`;
* **transform matrix** ``W`` (``M x n``): a target keeps itself (weight = its size); each removed token ``j`` is
  spread over its ``k`` most similar targets with weights ``softmax(cos / tau)`` over those ``k`` (option ``k``,
  default 4; ``tau``, default 0.1), times its size ``s_j``. Rows are normalised: the new token is the
  weighted mean ``y_t = sum_j W_tj x_j / sum_j W_tj`` and its size ``s'_t = sum_j W_tj`` (mass is conserved, so
  sizes still add up to the number of cells). ``k = 1`` is merging (many-to-one into the nearest target), pruning
  is the limit with no weight on removed tokens; ``k > 1`` is the many-to-many case;
* **proportional attention**: ``log s'`` added to every key's logit in later blocks (fractional sizes), folded into
  the dot product (:func:`lwbench.attention.sdpa_key_bias`) so the attention stays on a mask-free, flash-eligible
  fused kernel; ``prop_attn=false`` turns it off;
* **schedule**: ToMe's, ``r`` per block in every block (or ToMe's decreasing schedule), with ToMe's cap of
  ``floor(n / 2)`` per block, so token counts per block, and backbone GMACs, equal ``tome``'s at the same r
  (the transform itself allows more; the cap keeps the comparison at equal cost);
* **sources for densify**: each grid cell follows its token's largest weight (the nearest target for a removed
  token), so ``assignment`` is a partition and :func:`~lwbench.tokens.densify` un-merges at ``O(N)`` cost; the
  many-to-many weights themselves are not kept.

Overhead counted by ``lwbench flops``: the CLS attention row and the removed-by-target similarity products
(matrix products inside :class:`TransformMatrix`); the top-k, softmax and weighted sums are elementwise and, as
ToMe's scatter merge, not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench import eva
from lwbench.method import Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

from ._reduction import (
    attention_step,
    biased_block,
    cells_per_token,
    check_blocks,
    cls_attention,
    gather_tokens,
    mlp_residual,
    rope_of,
    start_tokens,
    tokens_per_layer,
)
from .tome import SCHEDULES, ToMe, size_bias


class TransformMatrix(Overhead):
    """One block's many-to-many transform: target selection by CLS attention, the removed tokens' top-k soft
    assignment to targets by key similarity, and the size-weighted transform with source tracking."""

    def __init__(self, scale: float, num_prefix: int, k: int, tau: float):
        super().__init__()
        self.scale, self.num_prefix, self.k, self.tau = float(scale), int(num_prefix), int(k), float(tau)

    def plan(self, q: torch.Tensor, k: torch.Tensor, metric: torch.Tensor, key_bias: torch.Tensor | None, r: int):
        """Indices of the targets ``(B, M)`` (sequence order) and of the removed tokens ``(B, r)``; each removed
        token's ``k`` targets (indices into the targets) and their weights ``(B, r, k)``, summing to 1."""
        with torch.no_grad():
            row = cls_attention(q, k, self.scale, key_bias).mean(dim=1)[:, self.num_prefix :]  # (B, n)
            order = row.argsort(dim=-1, descending=True, stable=True)
            n = row.shape[1]
            tgt, rem = order[:, : n - r].sort(dim=-1).values, order[:, n - r :].sort(dim=-1).values
            m = metric / metric.norm(dim=-1, keepdim=True)
            sim = gather_tokens(m, rem) @ gather_tokens(m, tgt).transpose(-1, -2)  # (B, r, M)
            top, idx = sim.topk(min(self.k, n - r), dim=-1)
            w = (top / self.tau).softmax(dim=-1)
        return tgt, rem, idx, w

    def forward(self, x, q, k, metric, key_bias, size, positions, assignment, r: int):
        """Transform the ``(B, n, D)`` patch tokens ``x`` into ``n - r`` (``size`` ``(B, n, 1)``, ``positions``
        ``(B, n)``, ``assignment`` ``(B, N)``; ``q``, ``k`` ``(B, H, T, hd)`` as the attention used them, ``metric``
        ``(B, n, hd)``). Returns the same four for the new tokens."""
        tgt, rem, idx, w = self.plan(q, k, metric, key_bias, r)
        bsz, n, d = x.shape
        kk = idx.shape[-1]
        mass = w * gather_tokens(size, rem)  # (B, r, k): s_j * W_tj / s_j split over j's k targets
        xr = gather_tokens(x, rem)  # (B, r, D)
        contrib = (mass.unsqueeze(-1) * xr.unsqueeze(2)).reshape(bsz, r * kk, d)
        flat = idx.reshape(bsz, r * kk)
        st = gather_tokens(size, tgt)
        new_size = st.scatter_add(1, flat.unsqueeze(-1), mass.reshape(bsz, r * kk, 1))
        wx = (gather_tokens(x, tgt) * st).scatter_add(1, flat.unsqueeze(-1).expand(-1, -1, d), contrib)
        new_x = wx / new_size

        # Source tracking: a target stays itself, a removed token follows its largest weight (its nearest target).
        m_count = tgt.shape[1]
        new_index = torch.empty_like(positions)
        new_index.scatter_(1, tgt, torch.arange(m_count, device=x.device).expand(bsz, -1).contiguous())
        new_index.scatter_(1, rem, idx[:, :, 0].contiguous())
        return new_x, new_size, positions.gather(1, tgt), new_index.gather(1, assignment)


class TokenTransformingEncoder(nn.Module):
    def __init__(self, vit: nn.Module, schedule: list[int], k: int, tau: float, prop_attn: bool = True):
        super().__init__()
        self.vit = vit
        self.schedule = list(schedule)
        self.prop_attn = prop_attn
        p = num_prefix(vit)
        self.transforms = nn.ModuleList(TransformMatrix(blk.attn.scale, p, k, tau) for blk in vit.blocks)

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        assignment = positions.clone()
        size = None  # all ones until the first transform: no bias, so r=0 is the plain model bit for bit
        rope = rope_of(vit, grid)
        counts = []
        for blk, transform, r in zip(vit.blocks, self.transforms, self.schedule, strict=True):
            r = min(r, (h.shape[1] - p) // 2)
            bias = size_bias(size, p) if (self.prop_attn and size is not None) else None
            if r <= 0:
                h = biased_block(blk, h, rope, bias)
            else:
                h, q, k, _ = attention_step(blk, h, rope=rope, need_v=False, rotated=False, key_bias=bias)
                metric = k.mean(dim=1)[:, p:]  # keys before RoPE, averaged over heads, patch tokens only
                if rope is not None:  # the CLS row as the attention computed it: q and k rotated
                    q, k = eva.rotate(blk.attn, q, rope, q), eva.rotate(blk.attn, k, rope, k)
                if size is None:
                    size = h.new_ones(bsz, h.shape[1] - p, 1)
                pat, size, positions, assignment = transform(
                    h[:, p:], q, k, metric, bias, size, positions, assignment, r)
                h = mlp_residual(blk, torch.cat([h[:, :p], pat], dim=1))
                rope = rope_of(vit, grid, positions)
            counts.append(h.shape[1] - p)
        sizes = cells_per_token(assignment, h.shape[1] - p)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        return to_output(vit, h, positions, grid, assignment=assignment, sizes=sizes, aux=aux)


@register_method("token_transforming")
class TokenTransforming(ToMe):
    """ToMe's budget (r per block, its grid, range and defaults); a many-to-many transform instead of matching."""

    description = ("Token Transforming: per block, r tokens spread over their k most similar CLS-attentive tokens "
                   "(many-to-many, training-free; reconstruction, official code unreleased)")
    style = ("#7b4173", "$\u2665$")  # a black heart: every filled letter marker is taken; a solid glyph of its own
    families = ("vit", "eva")
    families_note = "its remaining tokens are the ones the CLS token attends to most"
    attention_map = "cls"  # its targets are the tokens the CLS attention row ranks highest

    @dataclass(frozen=True)
    class Options:
        k: int = option(4, "targets each removed token is spread over (1: many-to-one merging)", min=1)
        tau: float = option(0.1, "softmax temperature of the weights over a removed token's k targets (on cosine "
                            "similarity)", min=0, min_exclusive=True)
        schedule: str = option("constant", "r per block: constant, or decreasing from 2r to 0", choices=SCHEDULES)
        prop_attn: bool = option(True, "proportional attention (log of the transformed sizes added to the logits)")

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "token_transforming")
        o = self.opts
        return TokenTransformingEncoder(vit, self.schedule(), o.k, o.tau, prop_attn=o.prop_attn)


__all__ = ["TokenTransforming", "TokenTransformingEncoder", "TransformMatrix"]
