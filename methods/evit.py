"""``evit`` and ``topk``: keep the patch tokens the CLS token attends to most. Budget = keep_rate.

EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need: Expediting Vision Transformers
via Token Reorganizations"; official code youweiliang/evit, ``evit.py``): at a few blocks (ViT-B:
blocks 3, 6, 9 of 12, 0-based), after attention and before the MLP, the ``ceil(keep_rate * n)`` of
the ``n`` non-prefix tokens with the highest CLS attention (softmax row of the CLS query, averaged
over heads) are kept, and the inattentive rest is fused into one token, ``sum_i a_i x_i`` with ``a_i``
their CLS attention (the official weighting: attention probabilities, not renormalised), appended
after the kept ones. As in the official code, ``n`` counts every non-prefix token including an
earlier fused token, which may be kept or fused again. ``topk`` is the same without fusion (EViT's
``fuse_token=False`` ablation, the usual "attention top-k" baseline).

Generalised: pruning blocks scale with depth (``round(depth * {1/4, 1/2, 3/4})``, option
``keep_layers``); CLS and registers are never pruned; the CLS row is computed on the side from the
block's q and k (one row, never the full matrix), so timm's fused attention is untouched. Kept
tokens are re-ordered by grid index (attention is permutation-equivariant, so this only changes
rounding). RoPE backbones (``Eva``: DINOv3, EVA-02): the CLS row uses q and k rotated as the block's
attention rotates them (the CLS query is a prefix token, never rotated; patch keys carry their cell's RoPE);
kept tokens keep their cells' RoPE, the fused token has no cell and gets the identity rotation, like a
prefix token (:mod:`lwbench.eva`). Training-free by default; ``finetune=true`` fine-tunes the pruned model
with the task loss, as the EViT paper does.

``evit_random`` and ``topk_random`` are each method's own random-pruning baseline: the same blocks, the same
number of tokens kept at each, (for EViT) the same fusion of the rest by attention; only *which* tokens are kept is
uniformly random (fixed seed in evaluation). Their rows say whether ranking by CLS attention beats dropping as many
tokens at random (arXiv:2510.07143 finds many reducers do not), at identical GMACs.
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
    call_block,
    check_blocks,
    cls_attention,
    gather_tokens,
    mlp_residual,
    num_kept,
    parse_layers,
    rope_of,
    start_tokens,
    tokens_per_layer,
)


def select_attentive(
    x: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor, keep: int, fuse: bool,
    rank: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` tokens of ``x`` ``(B, n, D)`` with the highest ``attn`` ``(B, n)`` (or ``rank`` when given),
    in index order; with ``fuse`` append ``sum a_i x_i`` over the rest (position -1, ``a`` = ``attn``)."""
    idx = (attn if rank is None else rank).topk(keep, dim=1, largest=True, sorted=False).indices.sort(dim=1).values
    kept, pos = gather_tokens(x, idx), positions.gather(1, idx)
    if not fuse:
        return kept, pos
    n = x.shape[1]
    # scatter a tensor, not a scalar: jit tracing (fvcore) cannot alias-analyse scatter.value
    dropped_mask = torch.ones_like(attn, dtype=torch.bool).scatter(1, idx, torch.zeros_like(idx, dtype=torch.bool))
    rest = dropped_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, : n - keep]
    w = attn.gather(1, rest)
    fused = torch.einsum("bn,bnd->bd", w, gather_tokens(x, rest)).unsqueeze(1)
    return torch.cat([kept, fused], dim=1), torch.cat([pos, pos.new_full((pos.shape[0], 1), -1)], dim=1)


class AttentivePruner(Overhead):
    """CLS attention row of one block (on the side) and EViT's keep/fuse step. ``random_seed`` set: which tokens
    are kept is drawn uniformly at random instead (the same number at the same block; EViT still fuses the rest by
    their attention), the per-method random-pruning baseline; in evaluation the draw is fixed by the seed."""

    def __init__(self, scale: float, num_prefix: int, keep_rate: float, fuse: bool, random_seed: int | None = None):
        super().__init__()
        self.scale, self.num_prefix, self.keep_rate, self.fuse = float(scale), int(num_prefix), keep_rate, fuse
        self.random_seed = random_seed

    def cls_row(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Head-averaged CLS attention over the non-prefix tokens ``(B, n)`` (softmax over all keys, as EViT)."""
        return cls_attention(q, k, self.scale).mean(dim=1)[:, self.num_prefix :]

    def forward(self, x, q, k, positions):
        row = self.cls_row(q, k)
        rank = None
        if self.random_seed is not None:
            gen = None if self.training else torch.Generator().manual_seed(self.random_seed)
            rank = torch.rand(row.shape, generator=gen).to(row.device)
        keep = num_kept(self.keep_rate, x.shape[1])
        return (*select_attentive(x, row, positions, keep, self.fuse, rank=rank), row)


class EViTEncoder(nn.Module):
    def __init__(self, vit: nn.Module, keep_rate: float, layers: list[int], fuse: bool, random_seed: int | None = None):
        super().__init__()
        self.vit = vit
        self.keep_rate = float(keep_rate)
        self.layers = list(layers)
        p = num_prefix(vit)
        self.pruners = nn.ModuleDict({
            str(i): AttentivePruner(vit.blocks[i].attn.scale, p, keep_rate, fuse,
                                    None if random_seed is None else random_seed + i)
            for i in self.layers})

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        counts, cls_rows = [], {}
        rope = rope_of(vit, grid)  # RoPE backbones: the grid's table until tokens are pruned, then at their cells
        for i, blk in enumerate(vit.blocks):
            n = h.shape[1] - p
            if str(i) in self.pruners and num_kept(self.keep_rate, n) < n:
                h, q, k, _ = attention_step(blk, h, None, rope, need_v=False)
                pat, positions, cls_rows[i] = self.pruners[str(i)](h[:, p:], q, k, positions)
                h = mlp_residual(blk, torch.cat([h[:, :p], pat], dim=1))
                rope = rope_of(vit, grid, positions)
            else:
                h = call_block(blk, h, rope)
            counts.append(h.shape[1] - p)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device), "cls_attention": cls_rows}
        return to_output(vit, h, positions, grid, aux=aux)


@register_method("evit")
class EViT(Method):
    description = "EViT: keep the top keep_rate tokens by CLS attention at 3 blocks, fuse the rest into one"
    style = ("#2ca02c", "D")
    kind = "reduction"
    budget_key = "keep_rate"
    budget_type = float
    default_budgets = (0.5, 0.7, 0.9)
    training = "none"
    dense_output = True
    variable_length = False
    attention_map = "cls"  # ranks (and fuses by) the CLS attention row
    fuse = True
    random_ranking = False  # True: keep random tokens instead (evit_random, topk_random)
    families = ("vit", "eva")
    families_note = "it ranks patch tokens by the CLS token's attention"

    @dataclass(frozen=True)
    class Options:
        keep_layers: str | list[int] | None = option(None, "0-based blocks that prune, e.g. 3,6,9 (null: depth/4, "
                                                           "depth/2, 3 depth/4)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 1.0  # keep every token at every pruning block

    def pruning_layers(self) -> list[int]:
        """The 0-based blocks that prune (option ``keep_layers``, default depth/4, depth/2, 3 depth/4); a
        ``ConfigError`` when one is not a block of the backbone."""
        return parse_layers(self.opts.keep_layers, self.spec.depth, self.name, "keep_layers")

    def check_budget(self):
        self.pruning_layers()
        self._require(0 < self.budget <= 1, "keep_rate in (0, 1] (fraction of tokens kept at each pruning block)")

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, self.name)
        seed = 0 if self.random_ranking else None
        return EViTEncoder(vit, self.budget, self.pruning_layers(), fuse=self.fuse, random_seed=seed)



@register_method("topk")
class TopK(EViT):
    description = "keep the top keep_rate tokens by CLS attention at 3 blocks, drop the rest (EViT without fusion)"
    style = ("#bcbd22", "d")
    fuse = False


@register_method("evit_random")
class EViTRandom(EViT):
    description = "EViT's schedule and fusion with the kept tokens drawn at random (EViT's random-pruning baseline)"
    style = ("#98df8a", "D")  # the light shade of EViT's colour, the same marker
    random_ranking = True


@register_method("topk_random")
class TopKRandom(TopK):
    description = "top-k's schedule with the kept tokens drawn at random (random pruning at the same blocks)"
    style = ("#dbdb8d", "d")  # the light shade of top-k's colour, the same marker
    random_ranking = True
    attention_map = "none"  # random ranks, no fusion: the CLS row it computes only goes to aux (diagnostics)
