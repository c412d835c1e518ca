"""A block's attention over patch keys, computed on the side of an ordinary (fused) forward.

Three users read the same quantity, so it lives in one place: LookWhere's "where" target (the teacher's
last-layer attention, distilled into the selector), the quick teacher's attention loss (which teaches
the attention of the last block, or of every block, to cover the objects a task annotates, so that the
target is worth distilling and CLS-attention pruning methods have a signal to rank by), and the
diagnostics that measure how much of the objects each block's CLS attention covers.

The forward keeps timm's fused ``scaled_dot_product_attention``; the last block's input is captured
with a forward pre-hook and the logits are recomputed from that block's own ``norm1``/``qkv``/``q_norm``/
``k_norm``. A logit is linear in the query, so the mean over query rows is taken on the queries first
(``mean_i q_i . k_j = (mean_i q_i) . k_j``): O(N d), never an N x N matrix.

On a RoPE ``Eva`` (DINOv3, EVA-02) the logits are the ones its ``EvaAttention`` feeds the softmax: q and k
with the q/v biases, after ``q_norm``/``k_norm``, rotated by the block's RoPE (:func:`lwbench.eva.attention_logits`).
The captures record the RoPE each block was *called* with (timm's ``forward_features`` passes its grid
table as ``rope=``; lwbench's seam passes the table indexed at the kept cells), so the logits are the
model's own for every token subset. A ``VisionTransformer``'s blocks take no RoPE; their path is unchanged.

It is also where the merging methods' proportional attention (ToMe, PiToMe, MCTF: ``log size`` of every key added
to the logits) reaches the fused kernel: :func:`sdpa_key_bias` folds a per-key bias into the dot product instead of
handing SDPA a float ``attn_mask``, which on CUDA rules out the flash kernel (flash takes no mask), and
:func:`biased_attention` is a timm ``Attention``/``EvaAttention`` forward that calls it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lwbench import eva


def attention_logits(block: nn.Module, x: torch.Tensor, n_prefix: int, queries: str = "patch",
                     rope: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N_patches)``: pre-softmax attention logits of ``block`` on its input ``x`` (before ``norm1``),
    averaged over heads and over the query rows (``"patch"``: all patch rows; ``"cls"``: the CLS row),
    for patch keys only. ``rope``: what an Eva block was called with (``lwbench.vit.rope_of``); a
    ``VisionTransformer`` block has none."""
    if eva.is_eva_block(block):
        return eva.attention_logits(block, x, n_prefix, rope, queries)
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, N, hd), as timm's Attention does
    rows = q[:, :, n_prefix:] if queries == "patch" else q[:, :, :1]
    q_mean = rows.mean(dim=2, keepdim=True) * attn.scale  # (B, heads, 1, hd)
    logits = (q_mean @ k[:, :, n_prefix:].transpose(-2, -1)).squeeze(2)  # (B, heads, N_patches)
    return logits.mean(dim=1)


def _rope_arg(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The RoPE an Eva block was called with (``EvaBlock.forward(x, rope=None, attn_mask=None)``); None for
    any other block."""
    if not eva.is_eva_block(block):
        return None
    if "rope" in kwargs:
        return kwargs["rope"]
    return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None


class BlockInputs:
    """Context manager capturing the inputs of ``vit.blocks[i]`` for ``i`` in ``blocks`` (``None``: every
    block) during the forwards run inside it; ``logits()`` gives each captured block's attention logits."""

    def __init__(self, vit: nn.Module, blocks: list[int] | None = None):
        depth = len(vit.blocks)
        self.indices = list(range(depth)) if blocks is None else [b % depth for b in blocks]
        self.blocks = [vit.blocks[i] for i in self.indices]
        self.x: dict[int, torch.Tensor] = {}
        self.rope: dict[int, torch.Tensor | None] = {}

    def _capture(self, i: int, blk: nn.Module, args: tuple, kwargs: dict) -> None:
        self.x[i], self.rope[i] = args[0], _rope_arg(blk, args, kwargs)

    def __enter__(self) -> BlockInputs:
        self._hooks = [blk.register_forward_pre_hook(lambda m, args, kw, i=i: self._capture(i, m, args, kw),
                                                     with_kwargs=True)
                       for i, blk in zip(self.indices, self.blocks, strict=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    def logits(self, n_prefix: int, queries: str = "patch") -> dict[int, torch.Tensor]:
        """``{block index: (B, N_patches) logits}`` of the blocks captured by the last forward."""
        missing = [i for i in self.indices if i not in self.x]
        if missing:
            raise RuntimeError(f"BlockInputs: block(s) {missing} saw no forward inside the context")
        return {i: attention_logits(blk, self.x[i], n_prefix, queries, self.rope.get(i))
                for i, blk in zip(self.indices, self.blocks, strict=True)}


class LastBlockInput:
    """Context manager capturing the input of ``vit.blocks[-1]`` during the forwards run inside it."""

    def __init__(self, vit: nn.Module):
        self.block = vit.blocks[-1]
        self.x: torch.Tensor | None = None
        self.rope: torch.Tensor | None = None

    def _capture(self, args: tuple, kwargs: dict) -> None:
        self.x, self.rope = args[0], _rope_arg(self.block, args, kwargs)

    def __enter__(self) -> LastBlockInput:
        self._hook = self.block.register_forward_pre_hook(lambda _m, args, kw: self._capture(args, kw),
                                                          with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()

    def logits(self, n_prefix: int, queries: str = "patch") -> torch.Tensor:
        if self.x is None:
            raise RuntimeError("LastBlockInput: no forward ran inside the context")
        return attention_logits(self.block, self.x, n_prefix, queries, self.rope)


# -- proportional attention on the flash kernel ------------------------------------------------------------------
#: Devices on which :func:`sdpa_key_bias` folds the bias into the dot product. CUDA: its flash kernel takes no mask,
#: so a float ``attn_mask`` would send SDPA to a slower kernel. CPU: PyTorch's CPU flash kernel takes the float mask
#: itself (the profiler names ``cpu_flash`` either way) at the cost of no mask, while the fold widens the head dim
#: (64 -> 72) and copies q, k and v: measured at ViT-B's 12 heads of 64 on 2 threads, batch 1, 150 / 190 / 1100
#: tokens, 1.44 / 1.70 / 49.7 ms folded against 1.15 / 1.39 / 40.5 ms masked and 1.08 / 1.40 / 36.0 ms without
#: any bias (2026-12-07; ToMe r=8 on ViT-B/16 at 224 px spent 31% of its forward in those attention calls). So CPU
#: gets the mask, and the padded channels are counted only where they run.
FOLD_DEVICES = frozenset({"cuda"})


def sdpa_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor,
                  scale: float | None = None, dropout_p: float = 0.0, multiple: int = 8,
                  fold: bool | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + key_bias) v`` in one ``scaled_dot_product_attention`` call with no mask.

    ``q``, ``k``, ``v`` ``(B, H, T, d)``; ``key_bias`` ``(B, T)``, one additive logit per key, the same for every
    head and query (ToMe's proportional attention: ``log size``); ``scale`` defaults to ``1 / sqrt(d)``, SDPA's own.
    The bias is folded into the dot product: one more channel, ``q' = [q, 1 / scale]`` and ``k' = [k, key_bias]``,
    so that ``q' . k' * scale = q . k * scale + key_bias``. The constant sits on q and the bias on k unscaled (not
    ``[q, 1]``, ``[k, key_bias / scale]``, the same algebra), so k carries the bias rounded exactly as a float
    mask of k's dtype would be, and ``1 / scale = sqrt(d)`` is exact for d = 16, 64, 256. q, k and v are padded
    with zeros to a multiple of ``multiple`` (flash kernels take head dims that are multiples of 8, and every
    kernel needs q, k and v of one width), SDPA gets the *original* d's ``scale``, and the output is sliced back
    to v's width. A float mask would send CUDA SDPA to the memory-efficient or the math kernel; without one,
    flash is eligible. Measured against the masked call on CPU (``tests/test_attention_fold.py``): 0.0 at d = 64
    and a few 1e-6 at d = 48 and 32 in fp32 (the ``sqrt(d)`` product rounds and the sum gains a term), and at
    most one bf16 rounding step of the output in bfloat16.

    ``fold``: None (default) folds on the devices of :data:`FOLD_DEVICES` and hands SDPA the bias as a float mask
    ``(B, 1, 1, T)`` elsewhere (CPU, where the flash kernel takes it); True or False forces one path."""
    d, dv = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (q.device.type in FOLD_DEVICES if fold is None else fold):
        mask = key_bias.to(q.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    width = -(-max(d + 1, dv) // multiple) * multiple
    lead = k.shape[:-1]
    q = torch.cat([q, q.new_full((*q.shape[:-1], 1), 1.0 / scale), q.new_zeros((*q.shape[:-1], width - d - 1))], -1)
    k = torch.cat([k, key_bias.to(k.dtype)[:, None, :, None].expand(*lead, 1), k.new_zeros((*lead, width - d - 1))],
                  -1)
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, width - dv)), dropout_p=dropout_p, scale=scale)
    return out[..., :dv]


def biased_attention(attn: nn.Module, x: torch.Tensor, key_bias: torch.Tensor, rope: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn(x, attn_mask=key_bias[:, None, None, :])`` (``rope=rope`` for an Eva) of a timm ``Attention`` or
    ``EvaAttention``, with the per-key bias ``(B, T)`` folded into the dot product (:func:`sdpa_key_bias`). Returns
    the output and the q, k, v ``(B, H, T, hd)`` it used, q and k after the attention's q/k norms and before RoPE.

    The attention's own modules compute everything, in timm's order: the ``qkv`` projection (an Eva's q/k/v
    biases, or its separate projections), ``q_norm``/``k_norm``, RoPE on the patch rows, the gate, the
    attention ``norm``, ``proj`` and ``proj_drop``; only the masked SDPA call is replaced. An attention on timm's
    non-fused path (``fused_attn = False``) keeps it, the bias added to its explicit logits."""
    b, t, _ = x.shape
    if eva.is_eva_attention(attn):
        q, k, v = eva.project(attn, x)
    else:
        qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qr, kr = (q, k) if rope is None else (eva.rotate(attn, q, rope, v), eva.rotate(attn, k, rope, v))
    drop = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        y = sdpa_key_bias(qr, kr, v, key_bias, dropout_p=drop)
    else:
        logits = (qr * attn.scale) @ kr.transpose(-2, -1) + key_bias[:, None, None, :]
        y = attn.attn_drop(logits.softmax(dim=-1)) @ v
    y = attn.norm(y.transpose(1, 2).reshape(b, t, -1))
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y)), q, k, v
