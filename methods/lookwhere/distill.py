"""What-where distillation: the student (selector + extractor) learns from a frozen teacher that sees
the whole high-res image.

loss = MSE(student CLS, teacher CLS)
     + MSE(densify(student patches), teacher patches)          over the whole high-res grid
     + 0.1 * KL(softmax(A) || softmax(where_map))              over the high-res patch cells

Targets are the teacher's final-normed tokens. ``A`` is the teacher's last-block pre-softmax
attention logits, averaged over heads and over query rows (patch queries, or the CLS row), keys
restricted to patches, computed on the side of the teacher's ordinary fused forward
(:mod:`lwbench.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lwbench import eva
from lwbench.attention import LastBlockInput, attention_logits  # noqa: F401  (re-exported)
from lwbench.tokens import densify
from lwbench.vit import grid_of, num_prefix, rope_of

from .model import LookWhereEncoder

KL_WEIGHT = 0.1


@torch.no_grad()
def teacher_targets(vit: VisionTransformer, x: torch.Tensor, queries: str = "patch"):
    """Teacher ``(cls (B, D), patches (B, N, D), A (B, N))`` from one ordinary (fused) forward."""
    with LastBlockInput(vit) as last:
        feats = vit.forward_features(x)
    p = num_prefix(vit)
    if eva.is_eva(vit):  # RoPE on q and k, as the block's attention (lwbench.eva)
        logits = eva.attention_logits(last.block, last.x, p, rope_of(vit, grid_of(vit, x)), queries)
    else:
        logits = last.logits(p, queries)
    return feats[:, 0], feats[:, p:], logits


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

    def state_dict(self) -> dict:
        """The k generator's state, so that a resumed distillation draws the k an uninterrupted one would."""
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

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
        # A NaN on one rank stops every rank: train_loop checks the loss on all of them (training/distributed.py).
        # Loss parts stay on the device: train_loop reads them only for its progress bar.
        return loss, {"cls": l_cls.detach(), "patch": l_patch.detach(), "kl": l_map.detach(), "k": k}
