"""``ats``: Adaptive Token Sampling (Fayyaz et al., ECCV 2022). Budget = keep_rate. Variable length.

At a few blocks (default: EViT's, blocks ``round(depth * {1/4, 1/2, 3/4})``; option ``stages``),
after attention and before the MLP, each patch token gets a significance score
``S_j = a_cls,j * ||v_j|| / sum_i a_cls,i * ||v_i||`` (``a`` = CLS attention row summed over heads,
``v_j`` the token's value vector over all heads), and tokens are drawn by inverse transform
sampling: with tokens sorted by score and ``F`` their normalised CDF, ``K`` evenly spaced values
``y_1..y_K`` from the smallest positive ``F`` to 1 each pick the token whose ``F`` is nearest;
duplicates are dropped, so an image keeps ``K' <= K`` tokens, fewer when attention is peaked. The
scoring, CDF, the ``y`` grid and the nearest-CDF pick follow the official code
(``AdaptiveTokenSampler.score_assignment_step`` / ``create_ys`` / ``inverse_transform_sampling``).

The published setting and lwbench's generalisation (option ``samples``; tested):

* ``samples=initial`` is ATS as published: ``K = ceil(keep_rate * N0)`` samples at every sampling block, ``N0``
  the image's initial patch count, duplicates dropped, so the kept count adapts per image and per stage;
  ``keep_rate=1`` with ``stages=published`` (blocks ``round(depth/4)..depth-1``, the official DeiT-S config's
  3-11) is the official model. Its kept count is never the budget: it is whatever the sampling keeps.
* ``samples=current`` (the default, lwbench's generalisation, so ATS sits on the same keep-rate axis as EViT and
  top-k): ``K = ceil(keep_rate * n)`` of the image's *current* count ``n`` (the official code has no such budget
  and cannot draw fewer than ``N0``; its floor of 8 tokens is not kept). When ``K >= n`` the image keeps all its
  tokens, so ``keep_rate=1`` is the plain backbone, bit for bit. Default stages: EViT's three blocks
  ``round(depth * {1/4, 1/2, 3/4})``, so the keep-rate budgets mean the same token schedule as theirs.
* The CLS attention row is the official eps-smoothed softmax ``(e_j + eps/N) / (sum_i e_i + eps)`` (``e`` the
  max-shifted exponentials, ``eps`` 1e-6, ``N`` the number of real keys): it lifts near-zero entries, which
  changes the pick of a near-zero token in peaked models.
* Images in a batch keep different numbers of tokens: survivors are packed to the batch maximum and
  padded; padding is masked out of every later attention as keys by a ``-inf`` float ``attn_mask``
  (fused attention kept), never sampled, zeroed in the output, and ``TokenOutput.mask`` marks it. An
  image's result does not depend on its batch-mates: a deliberate improvement on the official code, whose
  padded tokens stay keys of later attention, so its output for one image changes with its batch-mates.
* Survivors are ordered by grid index (official: by score); attention is permutation-equivariant.
* RoPE backbones (``Eva``): the CLS row uses q and k rotated as the block's attention rotates them;
  survivors keep their cells' RoPE. EVA-02's attention projects q/k/v with ``F.linear`` on the fused
  weight (a bias path no hook sees), so there v is recomputed from the attention's input (``T d^2`` MACs
  per sampling block, counted); DINOv3's v is read from the ``qkv`` projection as for a ViT.
* The selecting block computes attention for all its queries and then keeps the survivors' rows,
  whereas the paper computes only the sampled rows of ``A V``; the difference is that block's
  ``A V`` and output projection for the dropped rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.vit import num_prefix, to_output

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

SAMPLES = ("current", "initial")
SOFTMAX_EPS = 1e-6  # the official ``softmax_with_policy`` eps


def smoothed_cls_attention(q, k, scale: float, key_bias: torch.Tensor | None, eps: float = SOFTMAX_EPS):
    """The official eps-smoothed softmax of the CLS row, per head ``(B, H, T)``: ``(e_j + eps/N)/(sum e + eps)``
    with ``e`` the max-shifted exponentials of the logits and ``N`` the real (unpadded) keys; padding gets
    ``eps/N / (sum e + eps)`` and is excluded by the caller."""
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * scale
    if key_bias is not None:
        logits = logits + key_bias.unsqueeze(1)
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # padding: exp(-inf) = 0
    n = (torch.isfinite(key_bias).sum(dim=-1).view(-1, 1, 1).to(e.dtype) if key_bias is not None
         else torch.full((), float(e.shape[-1]), dtype=e.dtype, device=e.device))
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def samples_per_image(keep_rate: float, n: torch.Tensor) -> torch.Tensor:
    """``K = ceil(keep_rate * n)`` (at least 1) for ``(B,)`` token counts ``n``."""
    return torch.clamp(torch.ceil(n.double() * keep_rate).long(), min=1)


def inverse_transform_sample(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor,
                             kmax: int | None = None) -> torch.Tensor:
    """ATS sampling: ``(B, T)`` significance ``scores`` (normalised over ``valid``), ``(B,)`` sample counts ``k``
    -> ``(B, T)`` bool of the distinct tokens picked.

    ``kmax``: any bound ``>= max(k)`` known on the host (the sample slots past an image's ``k`` are unused, so a
    larger bound picks the same tokens); None reads ``max(k)`` from the device.

    Tokens are sorted by score (padding first, excluded), ``F`` = min-max normalised cumulative score,
    and each of ``k`` evenly spaced ``y`` in ``[min positive F, 1]`` picks the token with the nearest ``F``
    (first one on ties, as ``argmin`` in the official code); picking a token twice keeps it once.
    """
    bsz, t = scores.shape
    key = torch.where(valid, scores, scores.new_full((), -1.0))
    sorted_key, order = key.sort(dim=1, stable=True)  # padding (-1) first, then ascending significance
    ok = sorted_key >= 0
    cdf = sorted_key.clamp(min=0).cumsum(dim=1)
    inf = torch.tensor(float("inf"), dtype=cdf.dtype, device=cdf.device)
    lo = torch.where(ok, cdf, inf).min(dim=1, keepdim=True).values
    hi = cdf[:, -1:]
    ncdf = (cdf - lo) / (hi - lo).clamp(min=torch.finfo(cdf.dtype).tiny)
    ncdf = torch.where(ok, ncdf, -inf).contiguous()  # padding sorts below every y: never nearest

    y0 = torch.where(ok & (ncdf > 0), ncdf, inf).min(dim=1, keepdim=True).values
    y0 = torch.where(torch.isinf(y0), torch.zeros_like(y0), y0)  # a single token (or equal scores): start at 0
    kmax = int(k.max()) if kmax is None else int(kmax)
    j = torch.arange(kmax, device=scores.device, dtype=cdf.dtype).expand(bsz, -1)
    denom = (k - 1).clamp(min=1).unsqueeze(1).to(cdf.dtype)
    frac = torch.where(k.unsqueeze(1) > 1, j / denom, torch.ones_like(j))  # K = 1: the single y is 1
    ys = (y0 + (1 - y0) * frac).contiguous()  # (B, kmax)

    # Nearest F to each y (F is sorted): compare the neighbours around the insertion point.
    hi_i = torch.searchsorted(ncdf, ys, side="left").clamp(max=t - 1)
    lo_i = (hi_i - 1).clamp(min=0)
    d_hi = (ncdf.gather(1, hi_i) - ys).abs()
    d_lo = (ys - ncdf.gather(1, lo_i)).abs()
    pick = torch.where((d_lo <= d_hi) & (hi_i > 0), lo_i, hi_i)
    pick = torch.searchsorted(ncdf, ncdf.gather(1, pick), side="left")  # first of equal F values, like argmin

    tok = order.gather(1, pick)
    tok = torch.where(j < k.unsqueeze(1).to(j.dtype), tok, torch.full_like(tok, t))  # unused sample slots
    chosen = torch.zeros(bsz, t + 1, dtype=torch.bool, device=scores.device)
    chosen = chosen.scatter(1, tok, torch.ones_like(tok, dtype=torch.bool))[:, :t]  # tensor src: jit-traceable
    return chosen & valid


class TokenSampler(Overhead):
    """ATS for one block: significance scores from the CLS row and value norms, inverse transform sampling,
    and packing the survivors (padded) in grid order."""

    def __init__(self, scale: float, num_prefix: int, keep_rate: float, samples: str = "current"):
        super().__init__()
        self.scale, self.num_prefix, self.keep_rate = float(scale), int(num_prefix), float(keep_rate)
        self.samples = samples

    def significance(self, q, k, v, valid: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        """``S_j = a_cls,j ||v_j|| / sum_i a_cls,i ||v_i||`` over the valid patch tokens, ``(B, T)``."""
        p = self.num_prefix
        a = smoothed_cls_attention(q, k, self.scale, key_bias).sum(dim=1)[:, p:]  # summed over heads (official)
        vnorm = v.transpose(1, 2).flatten(2).norm(dim=-1)[:, p:]  # value vector over all heads
        s = torch.where(valid, a * vnorm, torch.zeros_like(a))
        return s / s.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)

    def forward(self, x, q, k, v, positions, valid, key_bias, n0: int):
        n = valid.sum(dim=1)
        # The most samples an image draws, from what the host knows (no read-back): K grows with the count, and no
        # image has more than the T = valid.shape[1] tokens of the padded width (as many as the fullest one)
        most = int(n0) if self.samples == "initial" else valid.shape[1]
        kmax = max(1, math.ceil(most * self.keep_rate))  # samples_per_image's ceil(n * keep_rate), in float64
        if self.samples == "initial":  # as published: K from the initial count, duplicates dropped, every stage
            kk = samples_per_image(self.keep_rate, torch.full_like(n, int(n0)))
            chosen = inverse_transform_sample(self.significance(q, k, v, valid, key_bias), valid, kk, kmax)
        else:
            kk = samples_per_image(self.keep_rate, n)
            chosen = inverse_transform_sample(self.significance(q, k, v, valid, key_bias), valid, kk, kmax)
            chosen = torch.where((kk >= n).unsqueeze(1), valid, chosen)  # at most K tokens: already true
        count = chosen.sum(dim=1)
        # A read-back the padded representation needs: the tokens are packed into a (B, max count) tensor, whose
        # width is the largest per-image count (data-dependent; padding to a host-side bound would change outputs)
        m = int(count.max())
        idx = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :m]  # chosen first, in grid order
        new_valid = torch.arange(m, device=x.device).unsqueeze(0) < count.unsqueeze(1)
        tokens = gather_tokens(x, idx) * new_valid.unsqueeze(-1).to(x.dtype)
        pos = torch.where(new_valid, positions.gather(1, idx), torch.full_like(idx, -1))
        return tokens, pos, new_valid


class ATSEncoder(nn.Module):
    def __init__(self, vit: nn.Module, keep_rate: float, stages: list[int], samples: str = "current"):
        super().__init__()
        self.vit = vit
        self.keep_rate = float(keep_rate)
        p = num_prefix(vit)
        # samples=current, keep_rate = 1: K >= n for every image, nothing to sample
        active = stages if keep_rate < 1 or samples == "initial" else []
        self.samplers = nn.ModuleDict({str(i): TokenSampler(vit.blocks[i].attn.scale, p, keep_rate, samples)
                                       for i in active})

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz = x.shape[0]
        valid = torch.ones_like(positions, dtype=torch.bool)
        key_bias = None  # no padding yet: plain attention, bit for bit
        counts = []
        rope = rope_of(vit, grid)  # RoPE backbones: the grid's table until tokens are sampled, then at their cells
        for i, blk in enumerate(vit.blocks):
            if str(i) in self.samplers:
                h, q, k, v = attention_step(blk, h, as_attn_mask(key_bias), rope)
                pat, positions, valid = self.samplers[str(i)](h[:, p:], q, k, v, positions, valid, key_bias,
                                                              grid[0] * grid[1])
                h = mlp_residual(blk, torch.cat([h[:, :p], pat], dim=1))
                # One image (latency): valid is all true by construction (width = its count), no read-back; a batch
                # reads whether any image is padded, to keep the plain attention (bit for bit) where none is
                full = bsz == 1 or bool(valid.all())
                key_bias = None if full else key_bias_from_mask(valid, p, h.dtype)
                rope = rope_of(vit, grid, positions)  # padding (-1): identity rotation, and masked as a key
            else:
                h = call_block(blk, h, rope, as_attn_mask(key_bias))
            counts.append(valid.sum(dim=1))
        out = to_output(
            vit, h, positions, grid, mask=valid, aux={"tokens_per_layer": tokens_per_layer(counts, bsz, x.device)}
        )
        out.patches = out.patches * valid.unsqueeze(-1).to(out.patches.dtype)  # padding reads as zeros
        return out


@register_method("ats")
class ATS(Method):
    description = "Adaptive Token Sampling: inverse-transform sampling of tokens by CLS attention x value norm"
    style = ("#ff7f0e", "^")
    kind = "reduction"
    budget_key = "keep_rate"
    budget_type = float
    default_budgets = (0.3, 0.5, 0.7, 0.9)
    training = "none"
    dense_output = True
    variable_length = True
    attention_map = "cls"  # significance = the CLS attention row x value norm
    families = ("vit", "eva")
    families_note = "its significance score is the CLS token's attention"
    version = 2  # 2: the official eps-smoothed CLS softmax; samples=initial and stages=published (ATS as published)

    @dataclass(frozen=True)
    class Options:
        stages: str | list[int] | None = option(None, "0-based blocks that sample, e.g. 3,6,9 (null: depth/4, "
                                                      "depth/2, 3 depth/4; published: depth/4 .. depth-1, the "
                                                      "official DeiT-S 3-11)")
        samples: str = option("current", "current: K = ceil(keep_rate x current tokens), lwbench's budget "
                              "(keep_rate=1 = plain model); initial: K = ceil(keep_rate x initial patches) at "
                              "every stage, as published (keep_rate=1 with stages=published: official ATS)",
                              choices=SAMPLES)

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 1.0  # K = every current token at every stage (the default samples=current): no sampling

    def sampling_stages(self) -> list[int]:
        """The 0-based blocks that sample (option ``stages``; ``published``: depth/4 .. depth-1); a ``ConfigError``
        when one is not a block of the backbone."""
        if self.opts.stages == "published":
            return list(range(round(self.spec.depth / 4), self.spec.depth))
        return parse_layers(self.opts.stages, self.spec.depth, "ats", "stages")

    def check_budget(self):
        self.sampling_stages()
        self._require(
            0 < self.budget <= 1,
            "keep_rate in (0, 1] (K = ceil(keep_rate * tokens) samples per stage; 1 = no sampling)",
        )

    def build(self, vit):
        vit = detach_copy(vit)
        check_blocks(vit, "ats")
        return ATSEncoder(vit, self.budget, self.sampling_stages(), self.opts.samples)
