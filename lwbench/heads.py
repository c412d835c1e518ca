"""Task heads on a :class:`TokenOutput`, and the model = encoder + head pair every method returns.

One head class per task kind, shared by all methods, so that differences in accuracy come from
the tokens and not from the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.tokens import TokenOutput, densify


class ClassifierHead(nn.Module):
    """Linear classifier on the CLS token (timm's ``global_pool='token'``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, out: TokenOutput) -> torch.Tensor:
        return self.fc(out.cls)


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


def make_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    return ClassifierHead(dim, num_classes) if kind == "classification" else LinearSegHead(dim, num_classes)


class TaskModel(nn.Module):
    """``encoder`` (x -> TokenOutput) followed by a task ``head``. ``forward`` returns logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_tokens(self, x: torch.Tensor) -> TokenOutput:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x)
        if isinstance(self.head, LinearSegHead):
            return self.head(out, size=x.shape[-2:])
        return self.head(out)
