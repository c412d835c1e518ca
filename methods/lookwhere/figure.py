"""A figure like the paper's Figure 3: per image, the image, the selector's where-map, and the k
high-res patches the extractor sees (the rest greyed out).

``lwbench show`` draws the generic figure of any method from the run caches (:mod:`lwbench.show`);
:func:`show` here draws the paper's version for a LookWhere ``TaskModel`` already in hand (softmax
where-map over the image, unselected patches greyed), with the same kept-cell mask and figure helpers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lwbench.show import clear_ticks, kept_mask, pyplot, save_figure
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD


def _unnormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp(0, 1)


def _encoder(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", model)
    if not hasattr(enc, "selector"):
        raise TypeError("show() needs a LookWhere model (a TaskModel whose encoder has a selector)")
    return enc


@torch.no_grad()
def selection(model: nn.Module, images: torch.Tensor, k: int | None = None):
    """``(where_map (B, H, W), keep mask (B, H, W) bool, grid)`` of a LookWhere model on ``images``."""
    enc = _encoder(model)
    was = enc.training
    enc.eval()
    try:
        out = enc(images, k=k)
    finally:
        enc.train(was)
    h, w = out.grid
    b = images.shape[0]
    keep = torch.stack([kept_mask(out, i) for i in range(b)])
    return out.aux["where_map"].float().cpu().reshape(b, h, w), keep.reshape(b, h, w), (h, w)


def show(model: nn.Module, images: torch.Tensor, out_png: str | Path, max_images: int = 4, k: int | None = None,
         mean=IMAGENET_MEAN, std=IMAGENET_STD, title: str | None = None) -> Path:
    """Write the figure for the first ``max_images`` of ``images`` (normalised, as the task gives them)."""
    plt = pyplot()
    images = images[:max_images]
    device = next(_encoder(model).parameters()).device
    where, keep, (gh, gw) = selection(model, images.to(device), k=k)
    rgb = _unnormalize(images, mean, std)  # (B, 3, H, W)
    b, _, ih, iw = rgb.shape
    ph, pw = ih // gh, iw // gw
    kk = int(keep[0].sum())
    fig, axes = plt.subplots(b, 3, figsize=(9, 3 * b), squeeze=False)
    for i in range(b):
        img = rgb[i].permute(1, 2, 0).numpy()
        ax = axes[i]
        ax[0].imshow(img)
        ax[1].imshow(img)
        ax[1].imshow(torch.softmax(where[i].flatten(), 0).reshape(gh, gw).numpy(), cmap="magma", alpha=0.65,
                     extent=(0, gw * pw, gh * ph, 0), interpolation="bilinear")
        mask = keep[i].repeat_interleave(ph, 0).repeat_interleave(pw, 1)
        mask = torch.nn.functional.pad(mask, (0, iw - mask.shape[1], 0, ih - mask.shape[0]))
        grey = rgb[i].mean(0, keepdim=True).expand(3, -1, -1) * 0.35 + 0.5
        shown = torch.where(mask.unsqueeze(0), rgb[i], grey)
        ax[2].imshow(shown.permute(1, 2, 0).numpy())
        clear_ticks(ax)
        if i == 0:
            ax[0].set_title("image")
            ax[1].set_title("selector map (softmax)")
            ax[2].set_title(f"extractor sees k={kk} of {gh * gw} patches")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)
