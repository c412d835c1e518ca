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
"""

from __future__ import annotations

import torch
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
