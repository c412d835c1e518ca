"""What-where distillation: the student (selector + extractor) learns from a frozen teacher that sees
the whole high-res image.

loss = MSE(student CLS, teacher CLS)
     + MSE(densify(student patches), teacher patches)          over the whole high-res grid
     + 0.1 * KL(softmax(A) || softmax(where_map))              over the high-res patch cells

Targets are the teacher's final-normed tokens. ``A`` is the teacher's last-block pre-softmax
attention logits, averaged over heads and over query rows (patch queries, or the CLS row), keys
restricted to patches. The teacher keeps timm's fused attention; ``A`` is computed on the side
from the last block's ``qkv`` projection applied to that block's normed input, which a forward
pre-hook captures during the teacher's ordinary forward. Because a logit is linear in the query,
the mean over query rows is taken on the queries first (``mean_i q_i . k_j = (mean_i q_i) . k_j``),
so the side computation costs O(N d) instead of O(N^2 d) and never materialises an N x N matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lwbench.tokens import densify
from lwbench.vit import num_prefix

from .model import LookWhereEncoder

KL_WEIGHT = 0.1


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


@torch.no_grad()
def teacher_targets(vit: VisionTransformer, x: torch.Tensor, queries: str = "patch"):
    """Teacher ``(cls (B, D), patches (B, N, D), A (B, N))`` from one ordinary (fused) forward."""
    captured: dict[str, torch.Tensor] = {}
    last = vit.blocks[-1]
    hook = last.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    try:
        feats = vit.forward_features(x)
    finally:
        hook.remove()
    p = num_prefix(vit)
    return feats[:, 0], feats[:, p:], attention_logits(last, captured["x"], p, queries)


def where_kl(teacher_logits: torch.Tensor, where_map: torch.Tensor) -> torch.Tensor:
    """KL(softmax(A) || softmax(map)), summed over cells, averaged over the batch; 0 when equal."""
    return F.kl_div(F.log_softmax(where_map.float(), dim=1), F.log_softmax(teacher_logits.float(), dim=1),
                    log_target=True, reduction="batchmean")


class DistillStudent(nn.Module):
    """The part of the student that DDP wraps: returns plain tensors ``(cls, dense patches, where_map)``."""

    def __init__(self, encoder: LookWhereEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, k: int):
        out = self.encoder(x, k=k)
        return out.cls, densify(out), out.aux["where_map"]


def k_range(num_patches: int, min_k: int, max_k: int) -> tuple[int, int]:
    """Distillation k range capped to the grid (small quick-profile grids have fewer than 128 patches)."""
    hi = max(1, min(int(max_k), num_patches))
    return min(int(min_k), hi), hi


class WhatWhereLoss:
    """``loss_fn(model, images, targets)`` for :func:`lwbench.training.loop.train_loop` (labels unused).

    Args:
        teacher: the frozen teacher ViT at the high resolution.
        student: callable ``(x, k) -> (cls, dense, where_map)``; a :class:`DistillStudent`, possibly in DDP.
        min_k, max_k: per step, k is drawn uniformly in ``[min_k, max_k]`` (capped to the grid).
    """

    def __init__(self, teacher: VisionTransformer, student: nn.Module, min_k: int = 16, max_k: int = 128,
                 queries: str = "patch", kl_weight: float = KL_WEIGHT, seed: int = 0):
        self.teacher = teacher
        self.student = student
        self.min_k, self.max_k = int(min_k), int(max_k)
        self.queries = queries
        self.kl_weight = float(kl_weight)
        self.gen = torch.Generator().manual_seed(seed)

    def draw_k(self, num_patches: int) -> int:
        lo, hi = k_range(num_patches, self.min_k, self.max_k)
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        t_cls, t_patches, t_attn = teacher_targets(self.teacher, images, self.queries)
        k = self.draw_k(t_patches.shape[1])
        s_cls, s_dense, where_map = self.student(images, k)
        l_cls = F.mse_loss(s_cls, t_cls)
        l_patch = F.mse_loss(s_dense, t_patches)
        l_map = where_kl(t_attn, where_map)
        loss = l_cls + l_patch + self.kl_weight * l_map
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A NaN on one rank must stop every rank, or the others would hang in the gradient all-reduce.
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
            dist.all_reduce(bad)
            if bad.item() > 0:
                loss = loss * float("nan")
        return loss, {"cls": l_cls.item(), "patch": l_patch.item(), "kl": l_map.item(), "k": k}
