"""``saint``: Similarity-Aware Token Pruning (Jeddi, Baghbanzadeh, Dolatabadi and Taati, 2025, arXiv:2503.11549,
"Similarity-Aware Token Pruning: Your VLM but Faster"). Budget = ``threshold``, the similarity threshold of the
token graph. Training-free; drops (never merges) redundant patch tokens in the first half of the blocks.

Following the official code (github ArmenJeddi/saint, ``ViT/saint/prune.py`` ``saint_drop``,
``ViT/saint/patch/timm.py`` ``SaintBlock`` / ``SaintAttention`` / ``apply_patch``, ``ViT/saint/utils.py``
``parse_prune_mode`` / ``parse_sim_threshold``, the settings of ``ViT/example_timm.py``):

* **where**: between the attention and the MLP of a block (``SaintBlock.forward``: the attention residual, then the
  drop, then the MLP on the survivors), in the first ``depth // 2`` blocks (``count = len(model.blocks) // 2``,
  ``prune_mode = ['drop'] * count``; the other blocks are plain). Option ``prune_layers`` changes them;
* **the graph**: the block's keys averaged over heads (``SaintAttention`` returns ``k.mean(1)``), protected tokens
  left out, L2-normalised; the patch tokens alternate into A (sequence index 0, 2, 4 ...) and B (1, 3, ...) and
  every A-B pair is an edge weighted by its cosine similarity ``s_ij``, as ToMe's bipartite split;
* **votes** (the pruning rate): an edge is *valid* when ``s_ij >= threshold``; an A token votes when it has at least
  ``K`` valid edges (``K = 5``); ``r`` = the number of votes;
* **ranking**: an A token with ``c_i > 0`` valid edges scores ``c_i * exp(gamma * (mean of its valid s_ij -
  threshold))`` (``gamma = 10``), one without scores the mean of all its ``s_ij``; the ``r`` A tokens with the
  highest scores are **dropped** (B tokens never are). The new order is ``[the kept A tokens by descending score,
  B in order]`` (the official ``cat([unm, dst])`` with ``unm`` in ``argsort`` order), which decides who is in A in
  the next block; a block with ``r = 0`` leaves the order alone (the official identity ``drop_func``);
* no sizes, no proportional attention (tokens are dropped, not merged); the threshold is the official
  ``--sim_threshold`` (default 0.75), the same in every pruning block.

Departures (documented, tested where they matter):

* **Per image, not per batch** (option ``rate=image``, the default). The official ``r`` is one number for the batch,
  ``int(mean over images of the votes)``, so an image's tokens depend on its batch-mates and on the batch size.
  Here every image drops its own votes; at batch size 1 the two agree. Images then keep different numbers of
  tokens: they are packed to the batch maximum and padded; padding is a ``-inf`` key bias in every later attention
  (a float ``attn_mask``: fused SDPA kept), takes no part in the graph (no edge, no vote, not in a mean), is zeroed
  in the output and marked in ``TokenOutput.mask``, as :mod:`lwbench.methods.algm` does. ``rate=batch`` is the
  official batch-mean rate, the same for every image, so no padding.
* **Every prefix token is protected**: CLS *and* registers (the official code protects CLS and a DeiT distillation
  token; registers would enter the graph as patches). A/B parity counts patch tokens only, as the official code
  does after slicing CLS off, so for a CLS-only ViT the graph is exactly the official one.
* **``K`` and ``gamma`` are honoured**: the official ``apply_patch`` stores ``--K`` and ``--gamma`` but
  ``SaintBlock`` calls ``saint_drop`` without them, so the defaults (5, 10) always run; here the options reach the
  ranking (at their defaults the two are the same).
* **Fused attention**: the official ``SaintAttention`` recomputes attention by hand to return its keys; here timm's
  attention runs as it is (``scaled_dot_product_attention``) and the keys are read from the ``qkv`` projection output
  (:func:`lwbench.methods._reduction.attention_step`), after the module's k-norm (an identity on the official
  backbones). RoPE backbones (``Eva``): the keys before the rotary embedding, as :mod:`lwbench.methods.tome` does.
* **Ties** are broken by sequence index (a stable sort; the official ``argsort`` is not stable).
* **``threshold=1`` is the no-op**: nothing is dropped and the model is the plain backbone, bit for bit. The official
  code has no such setting (a cosine can reach 1 in floating point); lwbench's switch, as ALGM's.

The graph (normalisation, the ``A x B`` similarities, votes and scores) is an :class:`~lwbench.method.Overhead`
module, so ``lwbench flops`` books it as selection overhead. How much is dropped depends on the weights: ``lwbench
flops`` (random weights, random pixels) finds no key pair above 0.75 and drops nothing there (ViT-B/14-reg4 at 518
px: 152.30 GMACs, the plain 152.12 plus the graph's 0.18); on the quick traffic-signs teacher (``lw_vit_nano_p16``,
240 x 320, blocks 0 and 1) threshold 0.75 ran at 0.171 GMACs against the plain model's 0.365 (64 test images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import to_output

from ._reduction import (
    as_attn_mask,
    attention_step,
    call_block,
    check_blocks,
    gather_tokens,
    key_bias_from_mask,
    mlp_residual,
    parse_layers,
    rope_of,
    start_tokens,
    tokens_per_layer,
)

RATES = ("image", "batch")


def default_prune_layers(depth: int) -> list[int]:
    """The official pruning blocks: the first ``depth // 2`` (``count = len(model.blocks) // 2``), 0-based."""
    return list(range(max(1, depth // 2)))


@dataclass
class Plan:
    """One pruning step's decisions for ``(B, T)`` patch tokens (A = even, B = odd sequence index)."""

    index: torch.Tensor  # (B, M) the token in each new slot (an image with r = 0 keeps its order)
    valid: torch.Tensor  # (B, M) bool, False for padding
    padded: bool  # whether any image has padding
    dropped: torch.Tensor  # (B,) tokens dropped per image (r)
    votes: torch.Tensor  # (B,) A tokens with at least K valid edges
    scores: torch.Tensor  # (B, Ta) the ranking score of every A token (-inf for padding)


class SimilarityGraph(Overhead):
    """SAINT's bipartite similarity graph over the patch tokens of one block: votes, ranking and the drop plan."""

    def __init__(self, threshold: float, k: int = 5, gamma: float = 10.0, rate: str = "image"):
        super().__init__()
        self.threshold, self.k, self.gamma, self.rate = float(threshold), int(k), float(gamma), rate

    def forward(self, metric: torch.Tensor, valid: torch.Tensor) -> Plan:
        """``metric`` ``(B, T, C)`` (keys averaged over heads, patch tokens only), ``valid`` ``(B, T)`` (real tokens
        first, then padding) -> the plan: ``r`` A tokens dropped per image, the kept ones in the official order."""
        bsz, t, _ = metric.shape
        dev = metric.device
        ia = torch.arange(0, t, 2, device=dev)
        ib = torch.arange(1, t, 2, device=dev)
        thr = self.threshold
        with torch.no_grad():
            m = metric / metric.norm(dim=-1, keepdim=True)
            s = m[:, ia] @ m[:, ib].transpose(-1, -2)  # (B, Ta, Tb) edge weights
            va, vb = valid[:, ia], valid[:, ib]
            edge = (s >= thr) & vb[:, None, :] & va[:, :, None]  # valid edges (padding has none)
            cnt = edge.sum(dim=-1)  # (B, Ta)
            votes = (cnt >= self.k).sum(dim=-1)  # (B,)
            if self.rate == "batch":
                r = torch.full_like(votes, int(votes.float().mean().item()))  # the official batch-mean rate
            else:
                r = votes
            ef = edge.to(s.dtype)
            mean_valid = (s * ef).sum(dim=-1) / cnt.clamp(min=1)
            cand = cnt * torch.exp(self.gamma * (mean_valid - thr))
            vbf = vb.to(s.dtype)
            alt = (s * vbf[:, None, :]).sum(dim=-1) / vbf.sum(dim=-1, keepdim=True).clamp(min=1)
            score = torch.where(cnt > 0, cand, alt)
            score = torch.where(va, score, torch.full_like(score, float("-inf")))
            order = score.argsort(dim=-1, descending=True, stable=True)  # (B, Ta) A tokens, most redundant first
            n = valid.sum(dim=1)  # real tokens per image (a prefix of the sequence)
            na = (n + 1) // 2
            n_out = n - r
            # the one read-back a pruning step needs: the packed width (the largest per-image count), and whether any
            # image is padded (one image, or the batch rate: never)
            if bsz == 1 or self.rate == "batch":
                mout, padded = int(n_out.max()), False
            else:
                # one copy to the host, then two reads of it (tolist would read a CPU tensor without a dispatched op)
                extent = torch.stack([n_out.min(), n_out.max()]).cpu()
                lo, mout = int(extent[0]), int(extent[1])
                padded = lo < mout
            j = torch.arange(mout, device=dev)[None, :]
            n_unm = (na - r)[:, None]
            ta, tb = (t + 1) // 2, t // 2  # A and B sizes (python ints: no traced numel)
            a_pos = (r[:, None] + j).clamp(max=max(ta - 1, 0))
            a_idx = ia[order.gather(1, a_pos.expand(bsz, -1))]
            b_idx = ib[(j - n_unm).clamp(min=0, max=max(tb - 1, 0))] if tb else torch.zeros_like(j)
            index = torch.where(j < n_unm, a_idx, b_idx)
            index = torch.where((r > 0)[:, None], index, j.expand(bsz, -1))  # r = 0: the order is left alone
            new_valid = j < n_out[:, None]
            index = torch.where(new_valid, index, torch.zeros_like(index))
        return Plan(index, new_valid, padded, r, votes, score)


class SaintEncoder(nn.Module):
    def __init__(self, vit: nn.Module, threshold: float, layers: list[int], k: int = 5, gamma: float = 10.0,
                 rate: str = "image"):
        super().__init__()
        self.vit = vit
        self.active = threshold < 1  # threshold = 1: nothing dropped, the plain backbone
        self.layers = list(layers)
        self.graphs = nn.ModuleDict({str(i): SimilarityGraph(threshold, k, gamma, rate) for i in self.layers})

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        valid = torch.ones_like(positions, dtype=torch.bool)
        padded, mask = False, None  # the attention mask changes only where tokens are dropped: made there
        rope = rope_of(vit, grid)  # RoPE backbones: the grid's table until tokens are dropped, then at their cells
        counts, dropped = [], {}
        for i, blk in enumerate(vit.blocks):
            if self.active and str(i) in self.graphs and h.shape[1] - p >= 2:
                h, _, k, _ = attention_step(blk, h, mask, rope, need_v=False, rotated=False)
                plan = self.graphs[str(i)](k.mean(dim=1)[:, p:], valid)
                dropped[i] = plan.dropped
                # gathered even when nothing is dropped (the identity order): the tokens then depend on the graph, so
                # a traced MAC count (fvcore) keeps the graph's work, which is done either way
                h = torch.cat([h[:, :p], gather_tokens(h[:, p:], plan.index)], dim=1)
                positions = positions.gather(1, plan.index).masked_fill(~plan.valid, -1)
                valid, padded = plan.valid, plan.padded
                mask = as_attn_mask(key_bias_from_mask(valid, p, h.dtype)) if padded else None
                rope = rope_of(vit, grid, positions)  # padding (-1): identity rotation, and masked as a key
                h = mlp_residual(blk, h)
            else:
                h = call_block(blk, h, rope, mask)
            counts.append(valid.sum(dim=1))
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device), "dropped": dropped}
        mask = valid if padded else None
        out = to_output(vit, h, positions, grid, mask=mask, aux=aux)
        if mask is not None:
            out.patches = out.patches * mask.unsqueeze(-1).to(out.patches.dtype)  # padding reads as zeros
        return out


@register_method("saint")
class Saint(Method):
    description = ("SAINT: drop the patch tokens most redundant on a bipartite key-similarity graph (>= K neighbours "
                   "above a threshold) in the first half of the blocks, training-free, fused attention kept")
    style = ("#6a3d9a", r"$\bigstar$")  # a filled mathtext glyph no other method uses
    kind = "reduction"
    budget_key = "threshold"
    budget_type = float
    # 0.75: the official default (--sim_threshold, ViT/example_timm.py); lower drops more, 1 drops nothing
    default_budgets = (0.6, 0.75, 0.9)
    training = "none"
    dense_output = True
    variable_length = True

    @dataclass(frozen=True)
    class Options:
        prune_layers: str | list[int] | None = option(None, "0-based blocks that drop tokens, e.g. 0,1,2 (null: the "
                                                             "first depth // 2, as the official code)")
        k: int = option(5, "valid edges (similarity >= threshold) an A token needs to vote for dropping (official "
                           "K = 5)", min=1)
        gamma: float = option(10.0, "sharpness of the redundancy score c * exp(gamma * (mean sim - threshold)) "
                                    "(official 10)", min=0.0)
        rate: str = option("image", "tokens dropped: image, each image its own votes (padded); batch, the official "
                                    "int(batch mean of the votes) for every image", choices=RATES)

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 1.0  # threshold 1: no block drops a token

    def prune_layers(self) -> list[int]:
        """The 0-based blocks that drop tokens (option ``prune_layers``, default the first ``depth // 2``); a
        ``ConfigError`` when one is not a block of the backbone."""
        layers = self.opts.prune_layers
        depth = self.spec.depth
        if layers in (None, "", "default"):
            layers = default_prune_layers(depth)
        return parse_layers(layers, depth, self.name, "prune_layers")

    def check_budget(self):
        self.prune_layers()
        self._require(-1 <= self.budget <= 1, "threshold in [-1, 1] (cosine similarity of two tokens' keys; 1 = "
                                              "nothing dropped, the plain backbone)")

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, self.name)
        return SaintEncoder(vit, self.budget, self.prune_layers(), self.opts.k, self.opts.gamma, self.opts.rate)


__all__ = ["Saint", "SaintEncoder", "SimilarityGraph", "Plan", "default_prune_layers"]
