"""The last block's attention over patch keys, computed on the side of an ordinary (fused) forward.

Two users read the same quantity, so it lives in one place: LookWhere's "where" target (the teacher's
last-layer attention, distilled into the selector) and the quick teacher's attention loss (which teaches
that attention to cover the objects a task annotates, so that the target is worth distilling).

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
