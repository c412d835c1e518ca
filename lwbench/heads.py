"""Task heads on a :class:`TokenOutput`, and the model = encoder + head pair every method returns.

One head class per task kind, shared by all methods, so that differences in accuracy come from
the tokens and not from the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.tokens import TokenOutput, densify


def default_pool(vit: nn.Module) -> str:
    """The classifier pooling of a model counted or timed outside a run: CLS when the backbone has one (timm's
    ``global_pool='token'``), else the mean of the patch tokens (SigLIP-style towers have no class token)."""
    return "token" if getattr(vit, "cls_token", None) is not None else "avg"


class ClassifierHead(nn.Module):
    """Linear classifier on pooled tokens, the same head for every method of a task.

    ``pool="token"`` reads CLS (timm's ``global_pool='token'``, the paper's setting). ``pool="max"`` takes the
    per-channel maximum over the surviving patch tokens (padding excluded): multiple-instance pooling, which lets
    a small CPU-trained teacher find a small object (a sign of a few patches among hundreds) in hundreds rather
    than thousands of steps. ``pool="avg"`` averages them (weighted by merge size when tokens were merged).
    ``pool="token+max"`` reads CLS and the max-pooled patches side by side (one linear layer on both): the
    max path learns fast, and the CLS path keeps the teacher's CLS attention trained on the task, which is
    what CLS-ranking methods (EViT, ATS, top-k) and LookWhere's "where" target read.
    """

    POOLS = ("token", "max", "avg", "token+max")

    def __init__(self, dim: int, num_classes: int, pool: str = "token"):
        super().__init__()
        if pool not in self.POOLS:
            from lwbench.errors import ConfigError

            raise ConfigError(f"head pool must be one of {', '.join(self.POOLS)}, not '{pool}'")
        self.pool = pool
        self.fc = nn.Linear(2 * dim if pool == "token+max" else dim, num_classes)

    def forward(self, out: TokenOutput, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits ``(B, classes)``; ``size`` (the input's, which dense heads upsample to) is unused here, so every
        head is called the same way."""
        if self.pool == "token":
            return self.fc(out.cls)
        pooled = pool_patches(out, "max" if self.pool == "token+max" else self.pool)
        if self.pool == "token+max":
            pooled = torch.cat([out.cls, pooled], dim=-1)
        return self.fc(pooled)


def pool_patches(out: TokenOutput, how: str) -> torch.Tensor:
    """``(B, D)``: the per-channel maximum (``how="max"``) or the merge-size weighted mean (``"avg"``) of the patch
    tokens that count: padding (``out.mask`` False) and tokens a straight-through ``out.keep`` dropped are left out.

    With ``out.keep`` the value is the same as with the hard mask, and the gradient reaching each decision is the
    first-order effect of that token entering or leaving the pool: for the mean, the exact derivative of a
    ``keep``-weighted mean; for the maximum (not differentiable in its members), the finite difference of toggling
    the token alone: a dropped token ``j`` would raise channel ``c`` by ``relu(x_jc - max_c)``, the kept arg-max
    would lower it to the second largest. Why: DynamicViT trains hard keep decisions by straight-through gradients.
    Its official head reads CLS, whose only view of the patches is attention, and the attention mask passes those
    gradients on; a max-pooled head reads the kept patches directly, and with a detached mask the task loss never
    reached the decisions. The keep-ratio loss alone then ranked the rare object cells last (billiards: object
    recall 0.00, 8.8% top-1; with this pooling the predictors recover recall 1.0 within 60 warm-up steps)."""
    x, keep = out.patches, out.keep
    counted = out.counted()
    if how == "avg":
        # keep is 0 for a dropped token in value but keeps its gradient; only padding is multiplied out
        w = counted.to(x.dtype) if keep is None else keep.to(x.dtype) * (out.mask if out.mask is not None else 1.0)
        w = w * (out.sizes.to(x.dtype) if out.sizes is not None else 1.0)
        return (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-6)
    masked = x.masked_fill(~counted.unsqueeze(-1), float("-inf"))
    if keep is None or x.shape[1] < 2:
        return masked.amax(1)
    top = masked.topk(2, dim=1)
    pooled, second = top.values[:, 0], top.values[:, 1]
    with torch.no_grad():
        enter = (x - pooled.unsqueeze(1)).clamp(min=0)  # a dropped token joining the pool
        drop = torch.where(torch.isfinite(second), second - pooled, torch.zeros_like(pooled))  # the arg-max leaving
        is_arg = torch.arange(x.shape[1], device=x.device)[None, :, None] == top.indices[:, :1]
        kept = (keep > 0.5).unsqueeze(-1)
        effect = torch.where(kept, torch.where(is_arg, -drop.unsqueeze(1), torch.zeros_like(x)), enter)
        effect = effect * (out.mask.unsqueeze(-1) if out.mask is not None else 1.0)  # padding never joins
    return pooled + ((keep - keep.detach()).unsqueeze(-1).to(x.dtype) * effect).sum(1)


class LinearSegHead(nn.Module):
    """Per-patch linear classifier on the densified tokens, upsampled to the label size (as in LookWhere)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.fc = nn.Conv2d(dim, num_classes, 1)

    def forward(self, out: TokenOutput, size: tuple[int, int] | None = None) -> torch.Tensor:
        dense = densify(out)  # (B, N, D)
        h, w = out.grid
        fmap = dense.transpose(1, 2).reshape(dense.shape[0], -1, h, w)
        logits = self.fc(self.bn(fmap))
        if size is not None:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


DECODERS = ("linear", "uper")  # segmentation decoders (``head.decoder``); uper: mmseg's UPerHead, lwbench[seg]


def check_decoder(kind: str, decoder: str, task: str = "this task") -> None:
    """One line, before any work: :class:`ConfigError` for a decoder that is unknown or does not fit the task's
    kind, :class:`lwbench.mmseg_compat.MmsegUnavailableError` for ``uper`` without a supported mmseg install."""
    from lwbench.errors import ConfigError

    if decoder not in DECODERS:
        raise ConfigError(f"decoder '{decoder}' is unknown; known: {', '.join(DECODERS)}")
    if kind != "segmentation" and decoder != "linear":
        raise ConfigError(f"decoder '{decoder}' is a segmentation decoder but {task} is a {kind} task; "
                          "drop head.decoder (classification heads are chosen with head.pool)")
    if decoder == "uper":
        from lwbench import mmseg_compat

        mmseg_compat.check_versions()


def make_seg_head(dim: int, num_classes: int, decoder: str = "linear") -> nn.Module:
    """The segmentation decoder ``decoder`` on ``dim``-wide tokens: ``linear`` (:class:`LinearSegHead`, built in) or
    ``uper`` (mmseg's UPerHead on a simple feature pyramid, :class:`lwbench.mmseg_compat.UperSegHead`; needs
    ``pip install 'lwbench[seg]'``, checked in one line)."""
    check_decoder("segmentation", decoder)
    if decoder == "linear":
        return LinearSegHead(dim, num_classes)
    from lwbench.mmseg_compat import UperSegHead

    return UperSegHead(dim, num_classes)


def make_head(kind: str, dim: int, num_classes: int, pool: str = "token", decoder: str = "linear",
              task: str = "this task") -> nn.Module:
    """The head of a task of ``kind``: a classifier pooled by ``pool``, or the segmentation ``decoder``."""
    check_decoder(kind, decoder, task)
    return ClassifierHead(dim, num_classes, pool) if kind == "classification" else make_seg_head(dim, num_classes,
                                                                                                  decoder)


class TaskModel(nn.Module):
    """``encoder`` (x -> TokenOutput) followed by a task ``head``. ``forward`` returns logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_tokens(self, x: torch.Tensor) -> TokenOutput:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x), size=x.shape[-2:])
