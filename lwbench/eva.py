"""The RoPE half of the seam: timm's ``Eva`` (DINOv3 ``vit_*_dinov3``, EVA-02 ``eva02_*``) in lwbench's forward order.

:mod:`lwbench.vit` is the one seam every method calls; for an ``Eva`` it defers here for what differs from
``VisionTransformer``: the rotary position embedding and the block's signature. timm's ``Eva.forward_features``
is ``patch_embed -> _pos_embed (prefix tokens, absolute position embedding if any, pos_drop, patch_drop) ->
norm_pre -> blocks(x, rope=rot_pos_embed) -> norm``, where ``rot_pos_embed = rope.get_embed(...)`` is one
``(H*W, 2*hd)`` table of ``[sin, cos]`` for the grid, handed to every block; each block's ``EvaAttention``
rotates the *patch* queries and keys with it (prefix tokens are never rotated).

Tokens that are a subset of the grid, or reordered (selection, pruning, merging), carry their grid cells
(``positions``, as everywhere in lwbench); their RoPE is the grid's table indexed at those cells, per sample:
``(B, 1, K, 2*hd)``, which is what timm itself does after its patch dropout (``apply_keep_indices_nlc``).
A token with no cell (``position == -1``: EViT's fused token, ATS padding) gets the identity rotation
(``sin = 0, cos = 1``), i.e. it is treated like a prefix token. A ToMe merged token keeps the cell of the
token it was merged into (the destination, ToMe's ``B`` token, as ``positions`` already tracks it), and so
its RoPE: the table is indexed at cells, and a size-weighted mean of rotations is not a rotation.

Side computations (EViT's CLS attention row, ToMe's keys, ATS's values) read q and k from forward hooks on
the attention's own ``q_norm``/``k_norm`` modules (so fused attention is untouched), and apply the same
rotation the attention applies (:func:`rotate`). Tested against timm in ``tests/test_vit_seam.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # timm always has it; guarded so lwbench imports without the Eva module
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import Eva, EvaAttention, EvaBlock
except ImportError:  # pragma: no cover
    Eva = EvaAttention = EvaBlock = ()  # type: ignore[assignment,misc]


def is_eva(model: nn.Module) -> bool:
    return isinstance(model, Eva) if Eva else False


def is_eva_block(blk: nn.Module) -> bool:
    return isinstance(blk, EvaBlock) if EvaBlock else False


def is_eva_attention(attn: nn.Module) -> bool:
    return isinstance(attn, EvaAttention) if EvaAttention else False


def unsupported_variant(model: nn.Module) -> str | None:
    """Why this Eva cannot go through the seam, or None: per-block ('mixed') RoPE and patch dropout."""
    if getattr(model, "rope_mixed", False):
        return "it has per-block (mixed) RoPE"
    if getattr(model, "patch_drop", None) is not None:
        return "it has patch dropout"
    rope = getattr(model, "rope", None)
    if rope is not None and not hasattr(rope, "get_embed"):
        return f"its RoPE module {type(rope).__name__} has no get_embed()"
    return None


def rope_table(vit: nn.Module, grid: tuple[int, int]) -> torch.Tensor | None:
    """``(H*W, 2*hd)`` ``[sin, cos]`` table for ``grid``, computed as ``Eva._pos_embed`` does; None without RoPE."""
    rope = getattr(vit, "rope", None)
    if rope is None:
        return None
    if vit.dynamic_img_size:
        table = rope.get_embed(shape=list(grid))
    elif hasattr(rope, "feat_shape"):
        table = rope.get_embed()
    else:
        table = rope.get_embed(shape=list(vit.patch_embed.grid_size))
    if table.shape[-2] != grid[0] * grid[1]:
        from lwbench.errors import ConfigError

        raise ConfigError(f"Eva backbone built for a {tuple(vit.patch_embed.grid_size)} grid got a {tuple(grid)} "
                          "grid; build it at this image size (set_input_size) or with dynamic_img_size=True")
    return table


def rope_at(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B, 1, K, 2*hd)``: the table at each token's cell; ``-1`` (no cell) gets the identity rotation."""
    n, e = table.shape
    identity = torch.cat([table.new_zeros(1, e // 2), table.new_ones(1, e // 2)], dim=1)  # sin 0, cos 1
    ext = torch.cat([table, identity], dim=0)
    idx = torch.where(positions < 0, torch.full_like(positions, n), positions)
    return ext[idx].unsqueeze(1)


def rope_of(vit: nn.Module, grid: tuple[int, int], positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """The RoPE the blocks get for patch tokens at ``positions`` ``(B, K)`` (None: every cell in grid order,
    timm's own table); None for a model without RoPE (every ``VisionTransformer``)."""
    if not is_eva(vit):
        return None
    table = rope_table(vit, grid)
    if table is None or positions is None:
        return table
    return rope_at(table, positions)


def run_blocks(vit: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every block of an Eva, in order, each with ``rope`` (timm's ``forward_features`` loop)."""
    for blk in vit.blocks:
        x = blk(x, rope=rope, attn_mask=attn_mask)
    return x


# -- one block, split between attention and MLP (reduction methods) ------------------------------------
def attention_half(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """First half of ``EvaBlock.forward`` (LayerScale ``gamma_1``)."""
    return add_attention(blk, x, blk.attn(blk.norm1(x), rope=rope, attn_mask=attn_mask))


def add_attention(blk: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The residual of ``EvaBlock.forward``'s first half: ``x`` plus the attention output ``y`` (``gamma_1``)."""
    if blk.gamma_1 is not None:
        y = blk.gamma_1 * y
    return x + blk.drop_path1(y)


def project(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, T, hd)`` as ``EvaAttention.forward`` computes them from its input ``x``, after ``q_norm``/
    ``k_norm`` and before RoPE: the fused ``qkv`` (with the q/k/v biases, added after it or through ``F.linear``
    on its weight, as timm does) or the separate ``q_proj``/``k_proj``/``v_proj``."""
    b, t, _ = x.shape
    heads = attn.num_heads
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, t, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, t, heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, t, heads, -1).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), v


def mlp_half(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Second half of ``EvaBlock.forward`` (LayerScale ``gamma_2``)."""
    y = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        y = blk.gamma_2 * y
    return x + blk.drop_path2(y)


def block_problem(blk: nn.Module) -> str | None:
    """Why ``blk`` cannot be split for a reduction method, or None (timm's pre-norm ``EvaBlock`` with
    ``EvaAttention``, ungated)."""
    if not isinstance(blk, EvaBlock) or not isinstance(getattr(blk, "attn", None), EvaAttention):
        return f"a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}, not timm's EvaBlock"
    if blk.attn.gate is not None:
        return "gated attention"
    return None


def rotate(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, H, T, hd)`` rotated as ``EvaAttention.forward`` rotates q and k (prefix rows untouched)."""
    if rope is None:
        return t
    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


class _Out:
    def __init__(self) -> None:
        self.value: Any = None

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        self.value = out


@contextmanager
def _hooks(pairs) -> Iterator[list[_Out]]:
    taps, handles = [], []
    for module, pre in pairs:
        t = _Out()
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, a, t=t: t(m, None, a[0])))
        else:
            handles.append(module.register_forward_hook(t))
        taps.append(t)
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


def attention_step(blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                   attn_mask: torch.Tensor | None = None, need_v: bool = False, rotated: bool = True):
    """:func:`attention_half` plus the q, k (after q/k norm and RoPE, as the attention used them) and, with
    ``need_v``, v ``(B, H, T, hd)``.

    v is the ``qkv`` projection's output when timm calls that module (no q/v bias, DINOv3); with the
    bias path (EVA-02 calls ``F.linear`` on the weight) the value projection is recomputed from the
    attention's input (``T d^2`` MACs, counted)."""
    attn = blk.attn
    direct_v = attn.qkv is not None and attn.q_bias is None
    pairs = [(attn.q_norm, False), (attn.k_norm, False)]
    if need_v:
        pairs.append((attn.qkv, False) if direct_v else (attn.v_proj, False) if attn.v_proj is not None
                     else (attn, True))
    with _hooks(pairs) as taps:
        out = attention_half(blk, x, rope, attn_mask)
    q, k = taps[0].value, taps[1].value
    v = None
    if need_v:
        got = taps[2].value
        b, t = x.shape[:2]
        h = attn.num_heads
        if direct_v:
            v = got.reshape(b, t, 3, h, -1)[:, :, 2].transpose(1, 2)
        elif attn.v_proj is not None:
            v = got.reshape(b, t, h, -1).transpose(1, 2)
        else:
            c = attn.qkv.weight.shape[0] // 3
            v = F.linear(got, attn.qkv.weight[2 * c:], attn.v_bias).reshape(b, t, h, -1).transpose(1, 2)
    if not rotated:
        return out, q, k, v
    like = v if v is not None else q
    return out, rotate(attn, q, rope, like), rotate(attn, k, rope, like), v


def attention_logits(block: nn.Module, x: torch.Tensor, n_prefix: int, rope: torch.Tensor | None,
                     queries: str = "patch") -> torch.Tensor:
    """:func:`lwbench.attention.attention_logits` for an Eva block: ``(B, N_patches)`` pre-softmax logits
    averaged over heads and query rows, with the block's RoPE on q and k (LookWhere's where-target)."""
    attn = block.attn
    with _hooks([(attn.q_norm, False), (attn.k_norm, False)]) as taps:
        attn(block.norm1(x), rope=rope)
    q, k = rotate(attn, taps[0].value, rope, x), rotate(attn, taps[1].value, rope, x)
    rows = q[:, :, n_prefix:] if queries == "patch" else q[:, :, :1]
    q_mean = rows.mean(dim=2, keepdim=True) * attn.scale
    return (q_mean @ k[:, :, n_prefix:].transpose(-2, -1)).squeeze(2).mean(dim=1)
