"""Shared machinery of the in-backbone reduction methods (``tome``, ``evit``/``topk``, ``ats``).

All three act *between the attention and the MLP* of a block: the attention of that block decides
which tokens survive (or merge), and only the survivors pay for the MLP. timm's ``Block.forward``
has no hook there, so a reducing block is re-sequenced with the block's own submodules
(``norm1 -> attn -> ls1 -> drop_path1``, then ``norm2 -> mlp -> ls2 -> drop_path2``); blocks that do
not reduce are called as they are. Attention stays timm's (fused ``scaled_dot_product_attention``);
what a method reads from it (keys, values, the CLS attention row) is recomputed on the side from the
``qkv`` projection output, which is captured with a forward hook rather than recomputed. A per-key logit
bias (the merging methods' proportional attention) is the exception: it is folded into the dot product
(:func:`lwbench.attention.biased_attention`), so that the block's attention still runs on a mask-free fused kernel.

A RoPE ``Eva`` (DINOv3, EVA-02) is split the same way by :mod:`lwbench.eva` (``gamma_1``/``gamma_2``
LayerScale, the block's ``rope`` argument); :func:`attention_step` hands methods q and k as that
attention used them, RoPE applied, so a CLS attention row is the one the fused kernel computed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lwbench import eva
from lwbench.attention import biased_attention
from lwbench.errors import ConfigError
from lwbench.vit import all_positions, assemble, call_block, embed_patches, grid_of, num_prefix, rope_of

__all__ = ["call_block", "rope_of"]  # re-exported for the methods: one import for the per-block seam

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def check_blocks(vit: nn.Module, method: str) -> None:
    """Refuse backbones whose blocks cannot be re-sequenced (not timm's pre-norm ``Block`` with ``attn.qkv``, nor
    timm's ``EvaBlock`` with ``EvaAttention``)."""
    if eva.is_eva(vit):
        for i, blk in enumerate(vit.blocks):
            why = eva.block_problem(blk)
            if why:
                raise ConfigError(f"{method}: block {i} of the Eva backbone is {why}; use vit_*_dinov3 or eva02_*")
        return
    for i, blk in enumerate(vit.blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
        if missing or not isinstance(getattr(blk.attn, "qkv", None), nn.Linear):
            raise ConfigError(
                f"{method}: block {i} of the backbone is a {type(blk).__name__}, not timm's pre-norm Block with a "
                f"fused qkv projection (missing {missing or ['attn.qkv']}); use a plain vit_* backbone"
            )
        if getattr(blk.attn, "gate", None) is not None:
            raise ConfigError(f"{method}: gated attention (block {i}) is not supported; use a plain vit_* backbone")


def embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Prefix + all patch tokens, ready for the first block (bit-identical to ``forward_features``)."""
    return assemble(vit, embed_patches(vit, x))


def start_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], int]:
    """Where every reduction starts: tokens for the first block (:func:`embed`), each patch token's grid cell
    ``(B, N)`` (a copy the method may rewrite as tokens go), the patch grid and the number of prefix tokens."""
    grid = grid_of(vit, x)
    return embed(vit, x), all_positions(x.shape[0], grid, x.device).clone(), grid, num_prefix(vit)


class _Tap:
    def __init__(self) -> None:
        self.out: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.out = out


@contextmanager
def tap(module: nn.Module) -> Iterator[_Tap]:
    """Capture ``module``'s output during the ``with`` body (registered per call, so deep copies stay clean)."""
    t = _Tap()
    handle = module.register_forward_hook(t)
    try:
        yield t
    finally:
        handle.remove()


def attention_residual(
    blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First half of a timm block (with LayerScale), and the block's ``qkv`` output for side computations."""
    with tap(blk.attn.qkv) as t:
        y = blk.attn(blk.norm1(x), attn_mask=attn_mask)
    return x + blk.drop_path1(blk.ls1(y)), t.out


def mlp_residual(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Second half of a timm block (with LayerScale); an ``EvaBlock``'s through :func:`lwbench.eva.mlp_half`."""
    if not hasattr(blk, "ls2"):
        return eva.mlp_half(blk, x)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def attention_step(blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   rope: torch.Tensor | None = None, need_v: bool = True, rotated: bool = True,
                   key_bias: torch.Tensor | None = None):
    """First half of a block and the q, k, v ``(B, H, T, hd)`` its attention used: ``(x, q, k, v)``.

    For a VisionTransformer this is :func:`attention_residual` + :func:`split_qkv`. For an Eva, q and k are
    read after the attention's q/k norms and rotated with ``rope`` as ``EvaAttention`` does (``rotated=False``:
    before the rotation, the tokens' content only); v only with ``need_v`` (else None).

    ``key_bias`` ``(B, T)``: a per-key logit bias (proportional attention), folded into the dot product by
    :func:`lwbench.attention.biased_attention` so that the fused kernel runs without a mask (``attn_mask`` is then
    not allowed); None: timm's attention as it is."""
    if key_bias is not None:
        if attn_mask is not None:
            raise ValueError("attention_step: give attn_mask or key_bias, not both")
        y, q, k, v = biased_attention(blk.attn, blk.norm1(x), key_bias, rope)
        out = eva.add_attention(blk, x, y) if eva.is_eva_block(blk) else x + blk.drop_path1(blk.ls1(y))
        if rotated and rope is not None:
            q, k = eva.rotate(blk.attn, q, rope, v), eva.rotate(blk.attn, k, rope, v)
        return out, q, k, (v if need_v else None)
    if eva.is_eva_block(blk):
        out, q, k, v = eva.attention_step(blk, x, rope, attn_mask, need_v=need_v, rotated=rotated)
        return out, q, k, v
    out, qkv = attention_residual(blk, x, attn_mask)
    q, k, v = split_qkv(blk.attn, qkv)
    return out, q, k, v


def biased_block(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                 key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One whole block: timm's own (:func:`call_block`) without ``key_bias``; with one (``(B, T)``, proportional
    attention), re-sequenced so that the bias is folded into the attention's dot product (:func:`attention_step`)."""
    if key_bias is None:
        return call_block(blk, x, rope)
    return mlp_residual(blk, attention_step(blk, x, rope=rope, need_v=False, rotated=False, key_bias=key_bias)[0])


def split_qkv(attn: nn.Module, qkv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, T, 3*H*hd)`` -> q, k, v ``(B, H, T, hd)``, with the module's q/k norms, as its attention sees them."""
    b, t, _ = qkv_out.shape
    q, k, v = qkv_out.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the CLS query over all keys, per head: ``(B, H, T)``.

    Only the CLS row (``O(T)`` per head); the full ``T x T`` matrix is never formed. ``key_bias``
    ``(B, T)`` is added to the logits (``-inf`` for padding)."""
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * scale
    if key_bias is not None:
        logits = logits + key_bias.unsqueeze(1)
    return logits.softmax(dim=-1)


def key_bias_from_mask(valid: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T_patches)`` bool -> ``(B, P + T)`` additive bias: 0 for real tokens, ``-inf`` for padding."""
    bias = torch.zeros(valid.shape[0], num_prefix + valid.shape[1], dtype=dtype, device=valid.device)
    bias[:, num_prefix:].masked_fill_(~valid, float("-inf"))
    return bias


def as_attn_mask(key_bias: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` per-key bias -> ``(B, 1, 1, T)`` float mask that timm's Attention passes to SDPA."""
    return None if key_bias is None else key_bias[:, None, None, :]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for ``(B, T, D)`` tokens and ``(B, K)`` indices."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def num_kept(keep_rate: float, n: int) -> int:
    """Tokens a pruning step keeps of ``n``: ``ceil(keep_rate * n)`` (EViT's rounding), at least 1, at most ``n``."""
    return min(n, max(1, math.ceil(keep_rate * n)))


def default_layers(depth: int) -> list[int]:
    """EViT's pruning blocks 3/6/9 of 12 (0-based), scaled to ``depth``: ``round(depth * {1/4, 1/2, 3/4})``."""
    return sorted({int(depth * f + 0.5) for f in (0.25, 0.5, 0.75)} & set(range(depth)))


def parse_layers(value: Any, depth: int, method: str, option: str) -> list[int]:
    """``None`` (default layers), a list of ints or ``"3,6,9"`` -> sorted unique block indices in ``[0, depth)``."""
    if value is None or value == "" or value == "default":
        return default_layers(depth)
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").strip("[]()").split(",") if v]
        except ValueError:
            raise ConfigError(f"{method}: option {option}={value!r} must be block indices like 3,6,9") from None
    if isinstance(value, int):
        value = [value]
    layers = sorted({int(v) for v in value})
    if not layers or layers[0] < 0 or layers[-1] >= depth:
        raise ConfigError(f"{method}: option {option}={list(value)} must be block indices in 0..{depth - 1}")
    return layers


def cells_per_token(assignment: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, num_tokens)`` long: how many grid cells each token absorbed, from a merging method's ``assignment``
    ``(B, H*W)`` (the token index of every cell)."""
    sizes = torch.zeros(assignment.shape[0], num_tokens, dtype=torch.long, device=assignment.device)
    return sizes.scatter_add_(1, assignment, torch.ones_like(assignment))


def tokens_per_layer(counts: Sequence[torch.Tensor | int], batch: int, device) -> torch.Tensor:
    """Patch tokens (non-prefix, padding excluded) leaving each block, ``(B, depth)`` long."""
    cols = [torch.as_tensor(c, device=device).long() for c in counts]  # ints, or 0-dim tensors under jit tracing
    return torch.stack([c.expand(batch) if c.dim() == 0 else c for c in cols], dim=1)
