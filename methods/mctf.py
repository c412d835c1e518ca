"""``mctf``: Multi-criteria Token Fusion (Lee, Choi & Kim, CVPR 2024, "Multi-criteria Token Fusion with
One-step-ahead Attention for Efficient Vision Transformers", arXiv 2403.10030). Budget = r tokens fused per block.

Like ToMe, ``r`` patch tokens per block are fused by bipartite soft matching, but the attraction between an A
token i and a B token j multiplies three criteria (paper Sec. 3.2; official code mlvlab/MCTF, ``utils/mctf.py``:
``bipartite_soft_matching``, ``merge_wavg``; ``models/modules/blocks.py``; ``models/SA/MHSA.py``)::

    W_sim(i, j)  = ((cos(x_i, x_j) + 1) / 2) ** (1 / tau_sim)        x = the tokens themselves (residual stream)
    W_info(i, j) = (a~_i a~_j) ** (1 / tau_info)     a~ = (1 / a) / max(1 / a), a = attention the token receives
    W_size(i, j) = (s~_i s~_j) ** (1 / tau_size)     s~ = (1 / s) / max(1 / s), s = cells a token holds
    W = W_sim * W_info * W_size

so similar, uninformative (little attended) and small tokens attract. ``a`` is the softmax attention averaged over
heads and over *all* query rows (the official ``attn.mean(dim=[1, 2])``). A criterion whose tau is 0 is off
(official: ``if tau_sim`` / ``tau_info > 0`` / ``if tau_size``). The max-normalisations scale every entry of W by
one constant per image, so they never change the matching; they are kept for the paper's form (the max is taken
over the patch tokens here, over all tokens officially: the same matching).

**Bidirectional matching** (official ``bidirection=1``): ``r1 = r // 2`` A tokens with the highest best
attraction fuse into their B partner, then ``r2 = r - r1`` B tokens (with what they absorbed) fuse into their
best *unfused* A partner, ranked with the same W (it is not recomputed between the two steps). A fused token can
therefore hold a chain (A -> B -> A'). New order, as the official ``merge``: ``[unfused A in sequence order,
unfused B in descending order of their step-2 score]``; A/B alternate by sequence index (patch ``j`` is in A when
``num_prefix + j`` is even), so the next block's sets are the official ones on a CLS-only ViT. Without
bidirection the order is ToMe's ``[unfused A, B]``.

**Fusion weights** (official ``pooling_type=1``): ``x = sum_i a_i s_i x_i / sum_i a_i s_i`` over
the tokens fused (``a`` the raw attention received, ``s`` sizes); sizes add up (``s = sum_i s_i``), so the sizes of
the output count the grid cells each token absorbed. ``pooling="size"`` (official 0, ToMe's ``merge_wavg``) and
``"mean"`` (official 3) are options; the official max-pooling (2) is not offered.

**One-step-ahead attention** (official ``one_step_ahead``, paper Sec. 3.3): block ``l`` fuses its *input* tokens
before its own attention, with ``a`` from block ``l``'s attention map on those (unfused) tokens, i.e. the attention
of the block the fused tokens are about to enter, not the stale one of block ``l - 1``. Option ``one_step_ahead``
names the official modes (``models/modules/blocks.py``, ``Block_DEIT.forward``; ``utils/mctf.py``, ``merge_wavg``;
``models/SA/MHSA.py``, ``MHSA.forward``, read at mlvlab/MCTF 2004da0):

* ``approx`` (official 1, the default of ``main.py``'s ``--mctf_type`` and of every released command: the fifth
  entry of ``[16,0,0,1,1,...]``): the block computes its q, k and its softmax attention map ``A`` ``(H, T, T)`` on
  its unfused input (log-size bias added: ``MHSA.forward(norm1(x), size, _attn=True)``), the tokens are fused by
  ``A``'s mean over heads and queries, and ``A`` *pooled to the fused tokens* is the block's attention
  (``merge_wavg``: a fused key's column is the sum of its members' columns, a fused query's row the mean of its
  members' rows weighted by the fusion weights ``a_i s_i``; :func:`pool_attention`). Only v is computed, on the
  normed fused tokens, then ``A' v``, ``proj``, the residual and the MLP (:func:`pooled_attention_block`). Cost per
  fusing block with ``T`` tokens in and ``T' = T - r`` out: ``2 T d^2`` (q, k) + ``T^2 d`` (``q k^T``) on the
  unfused tokens, then ``T' d^2`` (v) + ``T'^2 d`` (``A' v``) + ``T' d^2`` (proj) + ``8 T' d^2`` (MLP), plus the
  similarity ``Ta Tb d``; the pooling is index work (scatter-adds, 0 MACs). Since ``A`` is the block's own
  attention, its q, k and logits are booked as backbone; the overhead line is the similarity alone.
* ``precise`` (official 2, "Precise" in the code): the same map on the unfused tokens is computed without
  gradient, used only to fuse, and the block's attention is recomputed on the fused tokens with timm's fused kernel
  and proportional attention (``log size`` added to the logits, official ``prop_attn=1``, folded into the dot
  product: one more channel of q and k, :func:`lwbench.attention.sdpa_key_bias`, so flash on CUDA stays eligible).
  The side map (``2 T d^2 + T^2 d``, computed by :class:`MultiCriteriaMerger`) is pure overhead here: ``2 T' d^2
  + T'^2 d`` more per fusing block than ``approx`` (plus the padded channels of the fold).
* ``off`` (official 0): the block runs on unfused tokens with its own attention (read from its ``qkv`` output),
  which fuses its *output* tokens after the MLP.

``approx`` and ``precise`` fuse the same tokens in a block (the same map decides) and differ in that block's
attention on the fused tokens: the pooled map is an approximation of the recomputed one (it averages the fused
queries' attention rows instead of attending from the fused query), so the outputs differ slightly and every later
block's fusion with them. lwbench ran ``precise`` as its only mode until ``version`` 2; ``approx`` is the default
since, as officially. Measured with ``lwbench flops`` at the default grids (random weights; the token counts are
fixed by r): ``vit_small_patch16_224`` (DeiT-S layout) at 224 px, r = 4 / 9 / 13 / 16: ``approx`` 4.11 / 3.46 / 2.96
/ 2.59 GMACs, ``precise`` 4.83 / 4.04 / 3.43 / 2.99 (full 4.60; the abstract's "about 44 %" fewer FLOPs for DeiT-S
at r=16 is 2.6); the quick profile's ``lw_vit_nano_p16`` at 240x320, r = 25 / 50 / 75 / 90: ``approx`` 0.329 /
0.288 / 0.250 / 0.234, ``precise`` 0.392 / 0.333 / 0.281 / 0.260 (full 0.365).

Official defaults, used here (README fine-tuning / ``run/eval_deit_s_mctf.sh``: ``mctf_type
[16,*,0,1,1,1,20,40,1,1,0]``, ``activate_layer [1..11]``): ``tau_sim=1``, ``tau_info=20``, ``tau_size=40``,
one-step-ahead ``approx``, bidirectional on, attention-and-size pooling, proportional attention on, a constant ``r``
in every block but the first (``layers`` null = blocks ``1 .. depth-1``; block 0 for a 1-block ViT), and a per-block
cap that keeps at least 10 tokens (official ``if t - r < 10: r = t - 10``, ``t`` counting the prefix) and fuses
at most ``floor(patches / 2)``.

Departures (deliberate):

* Gradients (the ``finetuned`` regime): as officially, no gradient flows through the matching, and in ``approx``
  the pooled map carries the gradient of the block's q and k. The fusion weights ``a_i s_i`` carry none here;
  officially (``merge_wavg``, pooling 1) the weighted sum's numerator carries one and its normaliser none.
* CLS *and* registers are kept out of both sets (never fused nor fused into); the official code sets the rows of
  the first ``num_protected`` A tokens to ``-inf``, which protects CLS only. Their attention still counts in
  ``a`` (as keys and as queries) exactly as officially.
* Ties in the rankings are broken by sequence index (stable sorts); the official sorts are unstable.
* The fractional ``r`` of MCTF-Fast (a share of the tokens, ``layers`` 3,6,9) is not a budget here; ``layers``
  is an option.
* Fine-tuning: the paper (Sec. 3.4) fine-tunes with token-reduction consistency: officially (``models/deit.py``,
  ``engine.py``, README ``--mctf_type [16,8,...] --task_type [1,1,0.4] --task_weight [1.0,1.0,3.0]``) a second
  forward of the same network at a random r in ``[0, 8)`` also gets the task loss, and the MSE between the two
  final CLS tokens (the low-r one detached) is added with weight 3 for the images whose true-class confidence
  exceeds 0.4. lwbench's ``finetuned`` regime gives every method the same task-loss fine-tune, steps and recipe
  from the same backbone (:meth:`lwbench.method.Method.fit`); the second forward per step and the extra loss
  would change that recipe (and double its cost) for this method only, so they are left out: the ``finetuned``
  rows are MCTF fine-tuned with the task loss alone. The ``off_the_shelf`` regime is the paper's training-free
  use of MCTF.
* Backbones: timm ``VisionTransformer`` and RoPE ``Eva`` (DINOv3, EVA-02), with or without CLS, any grid, any
  number of registers. On an Eva the side q, k get the block's q/k norms and its RoPE at the tokens' cells (as
  :mod:`lwbench.eva` rotates them); a fused token keeps the cell, and so the RoPE, of the token it was fused into.

Source tracking is an ``assignment`` (the token every grid cell ended in), as in :mod:`lwbench.methods.tome`; a
fused token keeps the cell of the token it was fused into (the B token in step 1, the A token in step 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench import eva
from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

from ._reduction import (
    attention_step,
    biased_block,
    cells_per_token,
    check_blocks,
    mlp_residual,
    parse_layers,
    rope_of,
    start_tokens,
    tokens_per_layer,
)
from .tome import size_bias

POOLINGS = ("attention", "size", "mean")
AHEAD_MODES = ("approx", "precise", "off")  # official one_step_ahead 1, 2, 0
MIN_TOKENS = 10  # official: a block never leaves fewer than 10 tokens (prefix included)


def default_layers(depth: int) -> list[int]:
    """The official ``activate_layer`` (1..11 of 12): every block but the first; block 0 for a 1-block ViT."""
    return list(range(1, depth)) or [0]


def block_r(r: int, num_patches: int, num_prefix: int) -> int:
    """Tokens one block actually fuses: at most half its patch tokens, never leaving fewer than 10 tokens."""
    return max(0, min(int(r), num_patches // 2, num_prefix + num_patches - MIN_TOKENS))


def attention_received(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, H, T, hd)`` q, k -> ``(B, T)``: softmax attention each key receives, averaged over heads and all queries
    (every row is needed, so a ``T x T`` map is formed, one head at a time to bound the memory). ``key_bias``
    ``(B, T)`` is added to the logits of every key."""
    total = None
    for h in range(q.shape[1]):
        logits = (q[:, h] @ k[:, h].transpose(-2, -1)) * scale  # (B, T, T)
        if key_bias is not None:
            logits = logits + key_bias[:, None, :]
        received = logits.softmax(dim=-1).mean(dim=1)
        total = received if total is None else total + received
    return total / q.shape[1]


def _inverse_normalised(v: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / v.clamp_min(torch.finfo(v.dtype).tiny)
    return inv / inv.amax(dim=1, keepdim=True)


def criteria(
    metric: torch.Tensor,
    info: torch.Tensor | None,
    size: torch.Tensor | None,
    a_offset: int,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> dict[str, torch.Tensor | float]:
    """The three attractions between sets A (patches ``a_offset, a_offset + 2, ...``) and B (the others).

    ``metric`` ``(B, T, D)`` (the tokens), ``info`` ``(B, T)`` (attention received) and ``size`` ``(B, T, 1)``; a
    criterion whose tau is 0, or whose input is None, is the constant 1. Returns ``{"sim", "info", "size"}``, each
    ``(B, Ta, Tb)`` or ``1.0``."""
    sl_a, sl_b = slice(a_offset, None, 2), slice(1 - a_offset, None, 2)
    out: dict[str, torch.Tensor | float] = {"sim": 1.0, "info": 1.0, "size": 1.0}
    if tau_sim:
        m = F.normalize(metric, p=2, dim=-1)
        cos = m[:, sl_a] @ m[:, sl_b].transpose(-1, -2)
        out["sim"] = ((cos + 1) / 2).clamp_min(0) ** (1 / tau_sim)
    if tau_info > 0 and info is not None:
        w = _inverse_normalised(info)
        out["info"] = (w[:, sl_a, None] * w[:, None, sl_b]) ** (1 / tau_info)
    if tau_size and size is not None:
        w = _inverse_normalised(size.squeeze(-1))
        out["size"] = (w[:, sl_a, None] * w[:, None, sl_b]) ** (1 / tau_size)
    return out


def attraction(metric, info, size, a_offset: int, tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """``W = W_sim * W_info * W_size``, ``(B, Ta, Tb)``."""
    c = criteria(metric, info, size, a_offset, tau_sim, tau_info, tau_size)
    w = c["sim"] * c["info"] * c["size"]
    if not torch.is_tensor(w):  # every criterion off: all pairs attract equally
        ta, tb = (metric.shape[1] + 1 - a_offset) // 2, (metric.shape[1] + a_offset) // 2
        w = metric.new_ones(metric.shape[0], ta, tb)
    return w


def plan_fusion(
    scores: torch.Tensor, r: int, a_offset: int, bidirection: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite matching on ``scores`` ``(B, Ta, Tb)`` fusing ``r`` of the ``T = Ta + Tb`` tokens.

    Returns ``keep`` ``(B, T - r)`` (the token, in ``0..T-1``, whose cell each new token keeps, in the new order)
    and ``dest`` ``(B, T)`` (the new token every current token goes into)."""
    bsz, ta, tb = scores.shape
    dev = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    ar = torch.arange(ta + tb, device=dev)
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src1, unm1 = order[:, :r1], order[:, r1:].sort(dim=-1).values
    dst1 = node_idx.gather(1, src1)  # into B
    n_unm = ta - r1
    dest_a = torch.empty(bsz, ta, dtype=torch.long, device=dev)
    dest_a.scatter_(1, unm1, ar[:n_unm].expand(bsz, -1).contiguous())
    if r2 > 0:
        s2 = scores.gather(1, unm1.unsqueeze(-1).expand(-1, -1, tb)).transpose(1, 2)  # (B, Tb, n_unm)
        best2, partner2 = s2.max(dim=-1)
        order2 = best2.argsort(dim=-1, descending=True, stable=True)
        src2, unm2 = order2[:, :r2], order2[:, r2:]  # unfused B stay in score order, as the official merge
        dest_b = torch.empty(bsz, tb, dtype=torch.long, device=dev)
        dest_b.scatter_(1, unm2, n_unm + ar[: tb - r2].expand(bsz, -1).contiguous())
        dest_b.scatter_(1, src2, partner2.gather(1, src2))  # the slot of its A partner (unm1 is in slot order)
    else:
        unm2 = ar[:tb].expand(bsz, -1)
        dest_b = n_unm + unm2
    dest_a.scatter_(1, src1, dest_b.gather(1, dst1))  # an A token goes wherever its B partner went
    idx_a, idx_b = a_offset + 2 * ar[:ta], (1 - a_offset) + 2 * ar[:tb]
    keep = torch.cat([idx_a[unm1], idx_b[unm2]], dim=1)
    dest = torch.empty(bsz, ta + tb, dtype=torch.long, device=dev)
    dest[:, a_offset::2] = dest_a
    dest[:, 1 - a_offset :: 2] = dest_b
    return keep, dest


def fuse(
    x: torch.Tensor, weight: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, n_new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of the ``(B, T, D)`` tokens going into each of ``n_new`` slots (``weight`` ``(B, T, 1)``),
    and the slots' sizes (the sum of ``size``)."""
    bsz, _, d = x.shape
    weight = weight.to(x.dtype)
    idx = dest.unsqueeze(-1)
    total = x.new_zeros(bsz, n_new, 1).scatter_add(1, idx, weight)
    summed = x.new_zeros(bsz, n_new, d).scatter_add(1, idx.expand(-1, -1, d), x * weight)
    new_size = size.new_zeros(bsz, n_new, 1).scatter_add(1, idx, size)
    return summed / total, new_size


def block_qk(attn: nn.Module, xn: torch.Tensor, rope: torch.Tensor | None = None):
    """q, k ``(B, H, T, hd)`` that ``attn`` would use on the normed tokens ``xn`` (``F.linear`` on its weights, v
    left out). A timm ``Attention`` (fused ``qkv``) or an ``EvaAttention`` (fused ``qkv`` with ``q_bias``/
    ``k_bias``, or ``q_proj``/``k_proj``; its q/k norms, then ``rope`` on the patch rows as the block rotates
    them)."""
    heads = attn.num_heads
    b, t, _ = xn.shape
    if getattr(attn, "qkv", None) is not None:
        n = attn.qkv.weight.shape[0] // 3
        bias = attn.qkv.bias[: 2 * n] if attn.qkv.bias is not None else None
        if getattr(attn, "q_bias", None) is not None:  # Eva: q, k (zero) and v biases beside the fused weight
            extra = torch.cat((attn.q_bias, attn.k_bias))
            bias = extra if bias is None else bias + extra
        qk = F.linear(xn, attn.qkv.weight[: 2 * n], bias)
        q, k = qk.reshape(b, t, 2, heads, n // heads).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # Eva with separate projections
        q = F.linear(xn, attn.q_proj.weight, attn.q_proj.bias).reshape(b, t, heads, -1).transpose(1, 2)
        k = F.linear(xn, attn.k_proj.weight, attn.k_proj.bias).reshape(b, t, heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = eva.rotate(attn, q, rope, xn), eva.rotate(attn, k, rope, xn)
    return q, k


def block_v(attn: nn.Module, xn: torch.Tensor) -> torch.Tensor:
    """v ``(B, H, T, hd)`` that ``attn`` would use on the normed tokens ``xn``, alone (q and k not computed): the
    value slice of a fused ``qkv`` (an Eva's ``v_bias`` added) or an Eva's ``v_proj``."""
    heads = attn.num_heads
    b, t, _ = xn.shape
    if getattr(attn, "qkv", None) is not None:
        n = attn.qkv.weight.shape[0] // 3
        bias = attn.qkv.bias[2 * n :] if attn.qkv.bias is not None else None
        if getattr(attn, "v_bias", None) is not None:
            bias = attn.v_bias if bias is None else bias + attn.v_bias
        v = F.linear(xn, attn.qkv.weight[2 * n :], bias)
    else:
        v = attn.v_proj(xn)
    return v.reshape(b, t, heads, -1).transpose(1, 2)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, H, T, hd)`` q, k -> the ``(B, H, T, T)`` softmax attention map, ``key_bias`` ``(B, T)`` (``log size``)
    added to the logits of every key (the official ``MHSA.forward(..., _attn=True)``)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    return logits.softmax(dim=-1)


def pool_attention(probs: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, n_new: int) -> torch.Tensor:
    """The attention map ``probs`` ``(B, H, T, T)`` of the unfused tokens pooled to the ``n_new`` fused ones (the
    official ``merge_wavg`` with ``one_step_ahead=1``): the keys of one fused token are summed, its query rows
    averaged with the fusion weights, ``A'[g, g'] = sum_{i in g} w_i sum_{j in g'} A[i, j] / sum_{i in g} w_i``.
    ``dest`` ``(B, T)``: the fused token every token goes into; ``weight`` ``(B, T)``: its fusion weight. Rows
    still sum to one. Index and elementwise work only (scatter-adds), no matrix product."""
    b, heads, t, _ = probs.shape
    keys = probs.new_zeros(b, heads, t, n_new).scatter_add(3, dest[:, None, None, :].expand(b, heads, t, t), probs)
    w = weight.to(probs.dtype)
    rows = probs.new_zeros(b, heads, n_new, n_new).scatter_add(
        2, dest[:, None, :, None].expand(b, heads, t, n_new), keys * w[:, None, :, None]
    )
    total = w.new_zeros(b, n_new).scatter_add(1, dest, w)
    return rows / total[:, None, :, None]


def pooled_attention_block(blk: nn.Module, h: torch.Tensor, attn_map: torch.Tensor) -> torch.Tensor:
    """One block on the fused tokens ``h`` ``(B, T', D)`` with ``attn_map`` ``(B, H, T', T')`` as its attention
    weights (official approximate one-step-ahead: ``MHSA.forward(x, _attn=attn_n)``): only v is computed, on
    ``norm1(h)``; then ``attn_drop``, the attention's ``norm`` and ``proj``, LayerScale, the residual and the MLP
    half, with the block's own modules (a timm ``Block`` or an ``EvaBlock``)."""
    attn = blk.attn
    b, t, _ = h.shape
    v = block_v(attn, blk.norm1(h))
    y = (attn.attn_drop(attn_map).to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1)
    y = attn.proj_drop(attn.proj(attn.norm(y)))
    h = eva.add_attention(blk, h, y) if eva.is_eva_block(blk) else h + blk.drop_path1(blk.ls1(y))
    return mlp_residual(blk, h)


class MultiCriteriaMerger(Overhead):
    """One block's MCTF step: the side attention (one-step-ahead), the multi-criteria attraction, bidirectional
    matching, the weighted fusion and source tracking. Everything it computes is selection overhead."""

    def __init__(
        self,
        a_offset: int,
        num_prefix: int,
        tau_sim: float,
        tau_info: float,
        tau_size: float,
        bidirection: bool,
        pooling: str,
    ):
        super().__init__()
        self.a_offset, self.num_prefix = int(a_offset), int(num_prefix)
        self.taus = (float(tau_sim), float(tau_info), float(tau_size))
        self.bidirection, self.pooling = bool(bidirection), pooling

    def side_qk(self, attn: nn.Module, xn: torch.Tensor, rope: torch.Tensor | None = None):
        """:func:`block_qk` run inside this module, so its MACs are booked as this module's overhead (precise mode)."""
        return block_qk(attn, xn, rope)

    def weights(self, info: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Fusion weight of each patch token ``(B, T, 1)``: attention received x size (official pooling 1)."""
        if self.pooling == "attention":
            return info.unsqueeze(-1).clamp_min(torch.finfo(info.dtype).tiny) * size
        if self.pooling == "size":
            return size
        return torch.ones_like(size)

    def forward(self, h, blk, bias, size, positions, assignment, r: int, qk=None, rope=None, probs=None):
        """Fuse ``r`` of the patch tokens of the sequence ``h`` ``(B, P + T, D)`` entering (or leaving) the timm block
        ``blk``. Informativeness is the attention of ``blk`` with the per-key logit bias ``bias`` ``(B, P + T)``: from
        ``probs`` (its ``(B, H, P+T, P+T)`` attention map, approximate mode), from ``qk`` (its q, k ``(B, H, P+T, hd)``
        as it computed them) or, when both are None, from q, k computed here on ``norm1(h)`` (precise mode). ``size``
        ``(B, T, 1)`` or None (all ones). Returns the new sequence, sizes, positions ``(B, T - r)``, assignment
        ``(B, N)`` and, with ``probs``, that map pooled to the fused tokens (:func:`pool_attention`; else None)."""
        p = self.num_prefix
        x = h[:, p:]
        bsz, t, _ = x.shape
        with torch.no_grad():  # as the official code: the matching and the fusion weights carry no gradient
            if probs is not None:
                info = probs.mean(dim=(1, 2))[:, p:].float()
            else:
                q, k = self.side_qk(blk.attn, blk.norm1(h), rope) if qk is None else qk
                info = attention_received(q, k, blk.attn.scale, bias)[:, p:].float()
            scores = attraction(x.float(), info, None if size is None else size.float(), self.a_offset, *self.taus)
            keep, dest = plan_fusion(scores, r, self.a_offset, self.bidirection)
            size = x.new_ones(bsz, t, 1) if size is None else size
            w = self.weights(info, size.float())
        new_x, new_size = fuse(x, w, size, dest, t - r)
        pooled = None
        if probs is not None:  # the prefix tokens are groups of one (their weight cancels)
            full_dest = torch.cat([torch.arange(p, device=dest.device).expand(bsz, -1), p + dest], dim=1)
            full_w = torch.cat([w.new_ones(bsz, p), w.squeeze(-1)], dim=1)
            pooled = pool_attention(probs, full_dest, full_w, p + t - r)
        out = torch.cat([h[:, :p], new_x], dim=1)
        return out, new_size, positions.gather(1, keep), dest.gather(1, assignment), pooled


class MCTFEncoder(nn.Module):
    def __init__(
        self,
        vit: nn.Module,
        r: int,
        layers: list[int],
        taus: tuple[float, float, float],
        one_step_ahead: str = "approx",
        bidirection: bool = True,
        pooling: str = "attention",
        prop_attn: bool = True,
    ):
        super().__init__()
        if one_step_ahead not in AHEAD_MODES:
            raise ValueError(f"one_step_ahead: {one_step_ahead!r} is not one of {', '.join(AHEAD_MODES)}")
        self.vit = vit
        self.r = int(r)
        self.layers = set(layers)
        self.one_step_ahead, self.prop_attn = one_step_ahead, bool(prop_attn)
        p = num_prefix(vit)
        self.mergers = nn.ModuleDict(
            {str(i): MultiCriteriaMerger(p % 2, p, *taus, bidirection=bidirection, pooling=pooling) for i in layers}
        )

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        assignment = positions.clone()
        size = None  # all ones until the first fusion: no bias, so r=0 is the plain model bit for bit
        rope = rope_of(vit, grid)  # RoPE backbones: the grid's table until tokens fuse, then at their cells
        counts = []
        for i, blk in enumerate(vit.blocks):
            r = block_r(self.r, h.shape[1] - p, p) if i in self.layers else 0
            bias = size_bias(size, p) if (self.prop_attn and size is not None) else None
            merger = self.mergers[str(i)] if r > 0 else None
            if merger is None:
                h = biased_block(blk, h, rope, bias)
            elif self.one_step_ahead == "approx":
                # the block's own q, k and attention map on its unfused input (backbone work, done here), fused
                # tokens and that map pooled to them by the merger, then only v, attn @ v, proj and the MLP
                q, k = block_qk(blk.attn, blk.norm1(h), rope)
                probs = attention_probs(q, k, blk.attn.scale, bias)
                h, size, positions, assignment, pooled = merger(
                    h, blk, bias, size, positions, assignment, r, probs=probs
                )
                rope = rope_of(vit, grid, positions)
                h = pooled_attention_block(blk, h, pooled)
            elif self.one_step_ahead == "precise":
                h, size, positions, assignment, _ = merger(h, blk, bias, size, positions, assignment, r, rope=rope)
                rope = rope_of(vit, grid, positions)
                bias = size_bias(size, p) if self.prop_attn else None
                h = biased_block(blk, h, rope, bias)
            else:
                h, q, k, _ = attention_step(blk, h, rope=rope, need_v=False, key_bias=bias)
                h = mlp_residual(blk, h)
                h, size, positions, assignment, _ = merger(h, blk, bias, size, positions, assignment, r, qk=(q, k))
                rope = rope_of(vit, grid, positions)
            counts.append(h.shape[1] - p)
        sizes = cells_per_token(assignment, h.shape[1] - p)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        return to_output(vit, h, positions, grid, assignment=assignment, sizes=sizes, aux=aux)


@register_method("mctf")
class MCTF(Method):
    description = (
        "MCTF: r tokens fused per block by bipartite matching on similarity x informativeness x size, "
        "one-step-ahead attention"
    )
    style = ("#843c39", ">")
    kind = "reduction"
    budget_key = "r"
    budget_type = int
    default_budgets = ()  # scaled to the grid and the merging blocks by budget_grid() (DeiT-S at 224 px: 16)
    version = 2  # 2: the official default one-step-ahead (approximate: the side map pooled as the block's attention)
    training = "none"  # training-free off the shelf; the finetuned regime fine-tunes it with the task loss
    dense_output = True
    variable_length = False
    attention_map = "full"  # informativeness = the attention each token receives, averaged over every query row

    @dataclass(frozen=True)
    class Options:
        layers: str | list[int] | None = option(
            None, "0-based blocks that fuse, e.g. 1,2,3 (null: every block but the first, the official activate_layer)"
        )
        tau_sim: float = option(1.0, "temperature of the similarity criterion (official 1; 0: off)", min=0)
        tau_info: float = option(20.0, "temperature of the informativeness criterion (official 20; 0: off)", min=0)
        tau_size: float = option(40.0, "temperature of the size criterion (official 40; 0: off)", min=0)
        one_step_ahead: str = option(
            "approx",
            "approx (official default, one_step_ahead=1): fuse a block's input by that block's attention map, pooled "
            "to the fused tokens as the block's attention; precise (2): the same fusion, the block's attention "
            "recomputed on the fused tokens; off (0): fuse the block's output after the MLP by its own attention",
            choices=AHEAD_MODES,
        )
        bidirection: bool = option(True, "bidirectional matching: r//2 A->B, then the rest B->A (official on)")
        pooling: str = option(
            "attention", "fusion weights: attention received x size (official), size, or mean", choices=POOLINGS
        )
        prop_attn: bool = option(True, "proportional attention (log of fused sizes added to the logits)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 0  # r = 0: no block fuses tokens

    def fusing_layers(self) -> list[int]:
        """The 0-based blocks that fuse tokens (option ``layers``, default ``default_layers``); a ``ConfigError``
        when one is not a block of the backbone."""
        if self.opts.layers is None or self.opts.layers in ("", "default"):
            return default_layers(self.spec.depth)
        return parse_layers(self.opts.layers, self.spec.depth, self.name, "layers")

    @classmethod
    def max_r(cls, spec) -> int:
        """Largest r the first fusing block can honour: bipartite matching fuses at most floor(N/2) of N tokens."""
        return spec.num_patches // 2

    @classmethod
    def budget_grid(cls, spec):
        """r removing about 1/4, 1/2, 3/4 and 9/10 of the patch tokens by the last block (r * fusing blocks / N)."""
        n, blocks = spec.num_patches, len(default_layers(spec.depth))
        hi = cls.max_r(spec)
        return sorted({min(hi, max(1, round(f * n / blocks))) for f in (0.25, 0.5, 0.75, 0.9)})

    @classmethod
    def default_budget(cls, spec):
        grid = cls.budget_grid(spec)
        return grid[(len(grid) - 1) // 2]

    def check_budget(self):
        self.fusing_layers()
        hi = self.max_r(self.spec)
        self._require(
            0 <= self.budget <= hi, f"r=0..{hi} (bipartite matching fuses at most half the tokens of a block)"
        )

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "mctf")
        o = self.opts
        return MCTFEncoder(
            vit,
            int(self.budget),
            self.fusing_layers(),
            (o.tau_sim, o.tau_info, o.tau_size),
            one_step_ahead=o.one_step_ahead,
            bidirection=o.bidirection,
            pooling=o.pooling,
            prop_attn=o.prop_attn,
        )


__all__ = [
    "AHEAD_MODES",
    "MCTF",
    "MCTFEncoder",
    "MultiCriteriaMerger",
    "attention_received",
    "attention_probs",
    "attraction",
    "block_qk",
    "block_r",
    "block_v",
    "criteria",
    "fuse",
    "plan_fusion",
    "pool_attention",
    "pooled_attention_block",
]
