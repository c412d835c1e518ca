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
"""

from __future__ import annotations

import torch
from torch import nn


def attention_logits(block: nn.Module, x: torch.Tensor, n_prefix: int, queries: str = "patch") -> torch.Tensor:
    """``(B, N_patches)``: pre-softmax attention logits of ``block`` on its input ``x`` (before ``norm1``),
    averaged over heads and over the query rows (``"patch"``: all patch rows; ``"cls"``: the CLS row),
    for patch keys only."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, N, hd), as timm's Attention does
    rows = q[:, :, n_prefix:] if queries == "patch" else q[:, :, :1]
    q_mean = rows.mean(dim=2, keepdim=True) * attn.scale  # (B, heads, 1, hd)
    logits = (q_mean @ k[:, :, n_prefix:].transpose(-2, -1)).squeeze(2)  # (B, heads, N_patches)
    return logits.mean(dim=1)


class BlockInputs:
    """Context manager capturing the inputs of ``vit.blocks[i]`` for ``i`` in ``blocks`` (``None``: every
    block) during the forwards run inside it; ``logits()`` gives each captured block's attention logits."""

    def __init__(self, vit: nn.Module, blocks: list[int] | None = None):
        depth = len(vit.blocks)
        self.indices = list(range(depth)) if blocks is None else [b % depth for b in blocks]
        self.blocks = [vit.blocks[i] for i in self.indices]
        self.x: dict[int, torch.Tensor] = {}

    def __enter__(self) -> BlockInputs:
        self._hooks = [blk.register_forward_pre_hook(lambda _m, args, i=i: self.x.__setitem__(i, args[0]))
                       for i, blk in zip(self.indices, self.blocks)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    def logits(self, n_prefix: int, queries: str = "patch") -> dict[int, torch.Tensor]:
        """``{block index: (B, N_patches) logits}`` of the blocks captured by the last forward."""
        missing = [i for i in self.indices if i not in self.x]
        if missing:
            raise RuntimeError(f"BlockInputs: block(s) {missing} saw no forward inside the context")
        return {i: attention_logits(blk, self.x[i], n_prefix, queries) for i, blk in zip(self.indices, self.blocks)}


class LastBlockInput:
    """Context manager capturing the input of ``vit.blocks[-1]`` during the forwards run inside it."""

    def __init__(self, vit: nn.Module):
        self.block = vit.blocks[-1]
        self.x: torch.Tensor | None = None

    def __enter__(self) -> LastBlockInput:
        self._hook = self.block.register_forward_pre_hook(lambda _m, args: setattr(self, "x", args[0]))
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()

    def logits(self, n_prefix: int, queries: str = "patch") -> torch.Tensor:
        if self.x is None:
            raise RuntimeError("LastBlockInput: no forward ran inside the context")
        return attention_logits(self.block, self.x, n_prefix, queries)
