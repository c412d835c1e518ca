"""LookWhere's two networks: a cheap low-res *selector* that says where to look, and a full-depth
*extractor* that sees only the chosen high-res patches.

Both are wraps around (copies of) the teacher's timm ViT; no timm forward body is copied. The
selector runs timm's own ``forward_features`` on a truncated copy at a low resolution; the
extractor embeds only the selected pixels (``lwbench.vit.embed_patches``) and runs the teacher's
blocks on them, with the selector's CLS + register tokens as its prefix (the official code does
the same: the selector has seen the whole image, cheaply, and its global tokens carry that context).

Grid conventions. The selector's low-res grid is ``(h, w)`` and the high-res patch grid ``(H, W)``.
The where-head emits ``r_h * r_w`` logits per low-res token with ``r_h = ceil(H / h)`` and
``r_w = ceil(W / w)``: one ``r`` *per axis*, so non-square images get a map that covers both
axes at (at least) high-res density without wasting logits on the short axis. For square grids this
is the official ``r = ceil(G_high / G_low)``. The ``r_h x r_w`` blocks tile an ``(h*r_h, w*r_w)`` map
which is bilinearly resized (``align_corners=False``, as the official code) to ``(H, W)``. Released
checkpoints fix ``r`` (the official head has 16 = 4 x 4 outputs, computed for 518 px), so ``r`` can
be given explicitly and the map is then resized to whatever high-res grid the task uses.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lwbench.method import Overhead
from lwbench.tokens import TokenOutput
from lwbench.vit import grid_of, num_prefix, run_selected


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def where_ratio(high_grid: tuple[int, int], low_grid: tuple[int, int]) -> tuple[int, int]:
    """``(r_h, r_w)``: where-logits per low-res token along each axis (see the module docstring)."""
    return (math.ceil(high_grid[0] / low_grid[0]), math.ceil(high_grid[1] / low_grid[1]))


def truncated_copy(vit: VisionTransformer, depth: int) -> VisionTransformer:
    """A deep copy of ``vit`` with only its first ``depth`` blocks (later blocks are never copied)."""
    memo = {id(b): b for b in list(vit.blocks)[depth:]}  # share, then drop: avoids copying the deep part
    sel = copy.deepcopy(vit, memo)
    sel.blocks = sel.blocks[:depth]
    return sel


class WhereHead(nn.Module):
    """Per low-res token: Linear d->4d, GELU, Linear 4d->r_h*r_w. Names ``w1``/``w2`` match the release."""

    def __init__(self, dim: int, num_out: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim)
        self.w2 = nn.Linear(4 * dim, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Selector(Overhead):
    """First ``depth`` blocks of the teacher at ``low_size`` px plus the where-head.

    ``forward(x, high_grid)`` returns ``(prefix, where_map)``: the final-normed CLS + register tokens
    ``(B, P, D)`` and the map ``(B, H*W)`` of logits on the high-res patch grid (row-major).
    """

    def __init__(self, vit: VisionTransformer, depth: int, low_size, high_grid, r=None, antialias: bool = True):
        super().__init__()
        # Downsizing the image to the selector's input and the tiled map to the high-res grid: the JAX
        # pretraining antialiases both, the released PyTorch inference does neither (18-21% input difference
        # on natural images at 518 -> 154). Only a downsizing is affected.
        self.antialias = bool(antialias)
        self.vit = truncated_copy(vit, depth)
        self.low_size = _pair(low_size)
        self.vit.set_input_size(img_size=self.low_size)  # timm resamples the position embedding to the low grid
        self.low_grid = tuple(int(g) for g in self.vit.patch_embed.grid_size)
        self.high_grid = _pair(high_grid)
        self.r = _pair(r) if r is not None else where_ratio(self.high_grid, self.low_grid)
        self.head = WhereHead(int(self.vit.embed_dim), self.r[0] * self.r[1])

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def where_map(self, patch_tokens: torch.Tensor, high_grid: tuple[int, int]) -> torch.Tensor:
        b = patch_tokens.shape[0]
        (h, w), (rh, rw) = self.low_grid, self.r
        # (B, h*w, rh*rw), each row an rh x rw block, row-major; float32 also under bfloat16 autocast, where the
        # antialiased resize has no kernel and the top-k would break ties on rounded scores
        logits = self.head(patch_tokens).float()
        tiles = logits.reshape(b, h, w, rh, rw).permute(0, 1, 3, 2, 4).reshape(b, 1, h * rh, w * rw)
        if (h * rh, w * rw) != tuple(high_grid):
            tiles = F.interpolate(tiles, size=tuple(high_grid), mode="bilinear", align_corners=False,
                                  antialias=self.antialias and (h * rh > high_grid[0] or w * rw > high_grid[1]))
        return tiles.flatten(1)

    def forward(self, x: torch.Tensor, high_grid: tuple[int, int] | None = None):
        down = x.shape[-2] > self.low_size[0] or x.shape[-1] > self.low_size[1]
        low = F.interpolate(x, size=self.low_size, mode="bilinear", align_corners=False,
                            antialias=self.antialias and down)
        feats = self.vit.forward_features(low)
        p = num_prefix(self.vit)
        return feats[:, :p], self.where_map(feats[:, p:], high_grid or self.high_grid)


class Extractor(nn.Module):
    """The full teacher ViT on ``k`` selected high-res patches, prefixed by tokens from elsewhere.

    Its own CLS/register parameters are unused (the selector's replace them) and are frozen so
    that DDP and the optimizer never see parameters without gradients."""

    def __init__(self, vit: VisionTransformer, img_size=None):
        super().__init__()
        self.vit = copy.deepcopy(vit)
        if img_size is not None and tuple(self.vit.patch_embed.img_size) != _pair(img_size):
            self.vit.set_input_size(img_size=_pair(img_size))  # resample high-res position embeddings once
        self.freeze_unused()

    def freeze_unused(self) -> None:
        for t in (self.vit.cls_token, self.vit.reg_token):
            if t is not None:
                t.requires_grad_(False)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, prefix: torch.Tensor) -> TokenOutput:
        return run_selected(self.vit, x, idx, prefix=prefix)


class LookWhereEncoder(nn.Module):
    """Selector -> hard top-k on the where-map -> extractor. ``forward(x, k=None) -> TokenOutput``.

    The indices are sorted by grid position after top-k, so k = all patches processes the patches
    in the plain model's order. No gradient flows through the indices (hard selection); the selector
    learns from the map loss and through the prefix it hands the extractor. When every selector
    parameter is frozen (fine-tuning) the selector runs without autograd.
    """

    def __init__(self, selector: Selector, extractor: Extractor, k: int):
        super().__init__()
        self.selector = selector
        self.extractor = extractor
        self.k = int(k)

    def selector_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.selector.parameters())

    def set_trainable(self, selector: bool, extractor: bool) -> None:
        """Distillation trains both; fine-tuning freezes the selector. (Copies of a frozen teacher start frozen.)"""
        for p in self.selector.parameters():
            p.requires_grad_(selector)
        for p in self.extractor.parameters():
            p.requires_grad_(extractor)
        self.extractor.freeze_unused()

    def select(self, where_map: torch.Tensor, k: int) -> torch.Tensor:
        return where_map.detach().topk(k, dim=1).indices.sort(dim=1).values

    def forward(self, x: torch.Tensor, k: int | None = None) -> TokenOutput:
        k = int(k or self.k)
        high_grid = grid_of(self.extractor.vit, x)
        n = high_grid[0] * high_grid[1]
        if not 1 <= k <= n:
            from lwbench.errors import BudgetError

            raise BudgetError(f"lookwhere: k={k} is impossible on a {high_grid[0]}x{high_grid[1]} grid; "
                              f"valid: k=1..{n}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.selector_frozen()):
            prefix, where_map = self.selector(x, high_grid)
        idx = self.select(where_map, k)
        out = self.extractor(x, idx, prefix)
        out.aux["where_map"] = where_map
        out.aux["selected"] = idx
        return out


def build_encoder(vit: VisionTransformer, k: int, depth: int, selector_size, img_size, r=None) -> LookWhereEncoder:
    """Initialise as the paper does: extractor = the teacher; selector = the teacher's first ``depth``
    blocks, embeddings, tokens and final norm at ``selector_size``; where-head random."""
    extractor = Extractor(vit, img_size)
    high_grid = tuple(int(g) for g in extractor.vit.patch_embed.grid_size)
    selector = Selector(vit, depth, selector_size, high_grid, r=r)
    return LookWhereEncoder(selector, extractor, k)
