"""``apt``: Adaptive Patch Transformers (Choudhury, Kim, Park, Yang, Jeni and Kitani, arXiv:2510.18091, "Accelerating
Vision Transformers with Adaptive Patch Sizes"). Budget = ``entropy``, the entropy threshold in bits. Input-side:
the tokens are built before the backbone, with mixed patch sizes; fine-tuned once; variable length.

Plain regions of the image become one token per large patch (``2p`` and ``4p`` for a base patch ``p``, by default),
detailed regions keep base-size patches. Follows the official code (github ``delude729/apt``, a fork of the authors'
release; the algorithm as released in its commit c4ed466): the entropy and the quadtree of
``src/models/entropy_utils.py`` (``compute_patch_entropy_vectorized``, the one the data loader
``src/data/transforms.py`` ``ImageFolderWithEntropy`` runs, and ``select_patches_by_threshold``), the token layout of
``src/models/patch_tokenizer.py`` (``PatchTokenizer.construct_masks`` / ``construct_patch_groups``) and the
embedding of ``src/models/patch_embed.py`` (``TokenizedZeroConvPatchAttn.forward``, the class the released configs
name):

* **entropy** per patch at every scale ``s = 2^i p``, ``i = 0 .. scales - 1``, on the 8-bit grey image
  (``0.2989 R + 0.5870 G + 0.1140 B`` of the 0-255 RGB levels): a histogram of ``bins`` (512) equal bins over
  ``[0, 255]`` (``torch.histc``: bin ``floor(v * bins / 255)``, 255 in the last), ``p_k = count_k / s^2``,
  ``H = -sum_k p_k log2(p_k + 1e-10)`` bits;
* **quadtree**, coarsest scale first: a patch of scale ``i >= 1`` is kept whole when its entropy is ``< threshold``
  and no larger patch around it was kept; every base cell not covered by a kept large patch is a base-size token.
  Patches that do not fit inside the grid are never kept (the official code pads them and gives them entropy 1e6);
* **one token per large patch**: the image downsampled by ``2^i`` (bilinear, no antialias, the official
  ``F.interpolate(scale_factor=0.5 ** i)``) cut at the base patch size and embedded with the backbone's own patch
  embedding, plus the position embedding resampled to the scale's grid (bicubic, antialiased: timm's
  ``resample_abs_pos_embed``), plus the **patch aggregation**: the patch's ``2^i x 2^i`` base cells embedded with
  the same patch embedding, merged by a ``2 x 2`` stride-2 convolution ``D -> D`` applied ``i`` times (one
  convolution shared by the scales), then a **zero-initialised** linear layer ``D -> D`` (the official
  ``zero_conv``), so that before fine-tuning a large token is its downsampled patch alone. Base tokens are the
  backbone's own (patch embedding + position embedding);
* **order**: per image, the prefix, then the base tokens in grid order, then each larger scale's tokens in its grid
  order (the official ``output_mask`` layout). The count is the image's own;
* **fine-tuning**: the whole model (backbone, aggregation, head) with the task loss (the official trains every
  parameter with AdamW; its paper reports convergence in one epoch). Here one fine-tuning at the budget, the run's
  ``train.*`` recipe (``Method.finetuned_once``).

The budget is the official knob: the entropy threshold (``thresholds``). Valid: ``0 <= entropy <= log2(bins)`` (9
bits for 512 bins; no patch has more). ``entropy=0`` is the plain backbone, bit for bit: every patch at the base
size, no entropy computed (the official ``num_scales=1``; a constant patch's entropy is -1.4e-10, so the switch is
explicit). Larger thresholds keep more large patches: fewer tokens.

Departures, each for a reason:

* **One threshold for every scale.** The official takes one per scale above the base (``thresholds``, length
  ``num_scales - 1``); its visualisation default is one value, ``[6.0, 6.0]`` (3 scales), its README example
  ``[6.0, 4.0]`` and its validation config ``[4.5]`` (2 scales). lwbench's budget is one number.
* **The entropy is computed from the model's input.** The official computes it in the data loader on the 8-bit image
  before normalisation. The encoder here gets the normalised image, so it undoes lwbench's normalisation (ImageNet
  mean and std, :func:`lwbench.task.normalize`, every task's) and rounds to 8-bit levels: the official input for an
  8-bit image, exactly. ``log2`` is computed as ``log / ln 2`` (a float rounding apart: at most 1e-6 bits in the
  tests), because ``aten::log2`` is not among the elementwise ops lwbench's MAC counter books.
* **Any grid.** The official tokenizer needs the image to be a multiple of every patch size; here a large patch
  exists where it fits whole, and its position embedding is the base grid's resampled by exactly ``2^-i``
  (``F.interpolate(scale_factor=...)``, the same as timm's resampling to the scale's grid when the grid divides).
  The base grid's embedding is the backbone's at the input grid (:func:`lwbench.vit.patch_pos_embed`).
* **Batches are padded, not packed.** The official packs a batch into one sequence for flash attention's
  ``varlen`` kernel (``cu_seqlens``); here images of different counts are padded to the batch's largest and
  padding is a ``-inf`` key bias in every block (a float ``attn_mask``), zeroed in the output and marked in
  ``TokenOutput.mask``, as :mod:`lwbench.methods.algm` does. Each image attends to its own tokens either way; at
  batch 1 (latency) or when the counts agree there is no mask. Tested: an image's output is the same in a padded
  batch as alone.
* **Prefix**: CLS and registers are the backbone's (the official adds CLS only; it has no registers).
* **RoPE backbones** (``Eva``: DINOv3, EVA-02): the official builds a RoPE table on each scale's grid
  (``src/models/eva.py``, ``rope_28``/``rope_56``); here a large token takes the rotation of its top-left base cell,
  which is what a coarse-grid table with EVA-02's coordinates (scaled to ``ref_feat_shape``) gives when the grid
  divides; DINOv3's centred coordinates would put it at the patch centre instead. Not compared with the official.
* **Initialisation**: the zero linear as the official; the convolution PyTorch's default, drawn from ``seed``. The
  official runs the aggregation on zeros when no large patch is kept (so that DDP sees every parameter used); lwbench
  averages gradients itself and skips it.

Cost: the entropy and the quadtree are one :class:`~lwbench.method.Overhead` (elementwise work, counted one MAC per
element: about 2 x 3 histogram passes over the pixels); the aggregation (the large patches' base cells embedded, the
convolutions, the zero linear) another. The backbone's share is the plain ViT on the tokens (each token embedded
once). Dense tasks: ``assignment`` maps every base cell to the token of the patch covering it, so
:func:`lwbench.tokens.densify` copies a large patch's token to all its cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.config import Stage
from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD
from lwbench.tokens import TokenOutput
from lwbench.vit import (
    all_positions,
    assemble,
    call_block,
    embed_patches,
    gather_patches,
    grid_of,
    num_prefix,
    patch_cells,
    patch_pos_embed,
    patch_size,
    rope_of,
    run_tokens,
    to_output,
)

from ._reduction import as_attn_mask, gather_tokens, key_bias_from_mask

GREY = (0.2989, 0.5870, 0.1140)  # the official RGB -> grey weights
EPS = 1e-10  # the official epsilon inside log2
LN2 = math.log(2.0)


def grey_levels(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised images -> ``(B, H, W)`` grey levels in ``[0, 255]`` of their 8-bit RGB levels."""
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    rgb = ((x.float() * s + m) * 255.0).clamp(0.0, 255.0).round()
    return GREY[0] * rgb[:, 0] + GREY[1] * rgb[:, 1] + GREY[2] * rgb[:, 2]


def patch_entropy(grey: torch.Tensor, size: int, bins: int = 512) -> torch.Tensor:
    """``(B, H // size, W // size)`` entropy in bits of each whole ``size x size`` patch of ``(B, H, W)`` grey levels:
    ``bins`` equal bins over ``[0, 255]`` as ``torch.histc`` bins them, ``-sum p log2(p + 1e-10)``."""
    b, h, w = grey.shape
    gh, gw = h // size, w // size
    pix = grey[:, : gh * size, : gw * size].reshape(b, gh, size, gw, size).permute(0, 1, 3, 2, 4)
    pix = pix.reshape(b * gh * gw, size * size)
    idx = (pix * bins / 255.0).long().clamp(0, bins - 1)  # histc: (v - min) * bins / (max - min), truncated
    counts = pix.new_zeros(pix.shape[0], bins).scatter_add_(1, idx, torch.ones_like(pix))
    prob = counts / float(size * size)
    ent = -(prob * torch.log(prob + EPS)).sum(dim=1) / LN2
    return ent.reshape(b, gh, gw)


def quadtree(entropies: list[torch.Tensor], base: tuple[int, int], threshold: float) -> list[torch.Tensor]:
    """The kept patches of every scale, ``[(B, gh, gw), (B, gh // 2, gw // 2), ...]`` bool, from the entropies of
    scales ``1 ..`` (``entropies[i - 1]``): coarsest first, a patch is kept when its entropy is below ``threshold``
    and no larger kept patch covers it; base cells no kept patch covers are kept at the base size."""
    covered = None  # cells of the current scale inside a kept larger patch
    kept: list[torch.Tensor] = []
    for i in range(len(entropies), 0, -1):
        ent = entropies[i - 1]
        keep = ent < threshold
        if covered is not None:
            keep = keep & ~covered
            taken = keep | covered
        else:
            taken = keep
        kept.append(keep)
        h, w = base[0] // (1 << (i - 1)), base[1] // (1 << (i - 1))  # the next finer scale's grid
        up = taken.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        covered = torch.zeros(ent.shape[0], h, w, dtype=torch.bool, device=ent.device)
        covered[:, : up.shape[1], : up.shape[2]] = up
    if covered is None:
        raise ValueError("quadtree needs the entropies of at least one scale above the base")
    return [~covered, *reversed(kept)]


class EntropyQuadtree(Overhead):
    """APT's patch-size decision: the entropy of every patch at every scale, then the quadtree. Its work is
    elementwise (histograms), so it asks to be counted (``counts_elementwise``)."""

    counts_elementwise = True

    def __init__(self, patch: int, scales: int, threshold: float, bins: int = 512):
        super().__init__()
        self.patch, self.scales, self.threshold, self.bins = int(patch), int(scales), float(threshold), int(bins)

    def entropy_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Entropy ``(B, gh // 2^i, gw // 2^i)`` of the patches of scales ``i = 1 .. scales - 1`` of ``x``."""
        grey = grey_levels(x)
        return [patch_entropy(grey, self.patch << i, self.bins) for i in range(1, self.scales)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
            return quadtree(self.entropy_maps(x), grid, self.threshold)


def coarse_cells(idx: torch.Tensor, level: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, K)`` flat indices on scale ``level``'s grid -> ``(B, K, n, n)`` flat base cells they cover (``n =
    2^level``), row-major inside the patch."""
    n = 1 << level
    wi = grid[1] // n
    r, c = torch.div(idx, wi, rounding_mode="floor") * n, (idx % wi) * n
    ar = torch.arange(n, device=idx.device)
    rows = r[..., None, None] + ar[:, None]
    cols = c[..., None, None] + ar[None, :]
    return rows * grid[1] + cols


class PatchAggregator(Overhead):
    """APT's patch aggregation: a large patch's base cells embedded with the backbone's patch embedding (its weights
    are passed in, so they stay the backbone's), merged by a 2x2 stride-2 convolution once per doubling, then a
    zero-initialised linear layer (the official ``patch_attn`` and ``zero_conv``)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2)
        self.zero = nn.Linear(dim, dim)
        with torch.no_grad():  # the convolution as nn.Conv2d initialises itself, from a seeded generator
            gen = torch.Generator().manual_seed(seed)
            nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(self.conv.weight[0].numel())
            nn.init.uniform_(self.conv.bias, -bound, bound, generator=gen)
            nn.init.zeros_(self.zero.weight)
            nn.init.zeros_(self.zero.bias)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, level: int, patch_embed: nn.Module) -> torch.Tensor:
        """``(B, K, D)`` for the scale-``level`` patches ``idx`` ``(B, K)`` of ``x`` (cropped to the base grid)."""
        p = int(patch_embed.patch_size[0])
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        b, k = idx.shape
        n = 1 << level
        cells = patch_cells(x, p).flatten(1, 2)  # (B, N, C, p, p)
        flat = coarse_cells(idx, level, grid).reshape(b, k * n * n)
        pix = cells[torch.arange(b, device=x.device)[:, None], flat].reshape(b, k * n * n, x.shape[1] * p * p)
        proj = patch_embed.proj
        emb = patch_embed.norm(F.linear(pix, proj.weight.flatten(1), proj.bias))  # the backbone's forward_patch
        d = emb.shape[-1]
        emb = emb.reshape(b * k, n, n, d).permute(0, 3, 1, 2)
        for _ in range(level):
            emb = self.conv(emb)
        return self.zero(emb.reshape(b, k, d))


def level_pos_embed(pos: torch.Tensor, grid: tuple[int, int], level: int) -> torch.Tensor:
    """``(1, gh * gw, D)`` base position embedding -> ``(1, (gh // 2^level) * (gw // 2^level), D)`` on scale ``level``'s
    grid: bicubic, antialiased, at exactly ``2^-level`` (timm's ``resample_abs_pos_embed`` when the grid divides)."""
    d = pos.shape[-1]
    g = pos.float().reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, scale_factor=0.5 ** level, mode="bicubic", align_corners=False, antialias=True)
    return g.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)


class APTEncoder(nn.Module):
    def __init__(self, vit: nn.Module, threshold: float, scales: int = 3, bins: int = 512, seed: int = 0):
        super().__init__()
        self.vit = vit
        self.active = threshold > 0  # 0: every patch at the base size, the plain backbone
        self.scales = int(scales)
        self.scorer = EntropyQuadtree(patch_size(vit), scales, threshold, bins)
        w = vit.patch_embed.proj.weight
        self.aggregator = PatchAggregator(int(vit.embed_dim), seed).to(device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        vit = self.vit
        grid = grid_of(vit, x)
        bsz = x.shape[0]
        if not self.active:
            return run_tokens(vit, embed_patches(vit, x), all_positions(bsz, grid, x.device), grid)
        p = patch_size(vit)
        gh, gw = grid
        x = x[:, :, : gh * p, : gw * p]  # the pixels the patch embedding reads
        kept = self.scorer(x)
        counts = torch.stack([k.flatten(1).sum(dim=1) for k in kept], dim=1)  # (B, scales)
        # The one read-back: each image's token count per scale (the packed width; the official reads its seqlens)
        per_image = [[int(v) for v in row] for row in counts.cpu()]  # one copy to the host, then reads of it
        widths = [max(c[i] for c in per_image) for i in range(self.scales)]
        _, pos = patch_pos_embed(vit, grid)
        pe = vit.patch_embed
        toks, valid, cells, sizes = [], [], [], []
        for level, keep in enumerate(kept):
            if widths[level] == 0:  # no image keeps a patch of this size
                continue
            flat = keep.flatten(1)
            idx = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, : widths[level]]  # kept first
            ok = torch.arange(widths[level], device=x.device)[None, :] < counts[:, level : level + 1]
            if level == 0:
                tok, cell = embed_patches(vit, x, idx), idx
            else:
                small = F.interpolate(x, scale_factor=0.5 ** level, mode="bilinear", align_corners=False)
                tok = pe.norm(F.linear(gather_patches(vit, small, idx), pe.proj.weight.flatten(1), pe.proj.bias))
                tok = self.aggregator(x, idx, level, pe) + tok
                if pos is not None:
                    tok = tok + gather_tokens(level_pos_embed(pos, grid, level).expand(bsz, -1, -1), idx)
                cell = coarse_cells(idx, level, grid)[..., 0, 0]  # the top-left base cell
            toks.append(tok)
            valid.append(ok)
            cells.append(torch.where(ok, cell, torch.full_like(cell, -1)))
            sizes.append(torch.where(ok, torch.full_like(cell, 1 << (2 * level)), torch.zeros_like(cell)))
        tokens, ok, positions, size = (torch.cat(t, dim=1) for t in (toks, valid, cells, sizes))
        total = [sum(c) for c in per_image]
        mask = None
        if any(t != tokens.shape[1] for t in total):  # images differ: pack each image's tokens first, then padding
            width = max(total)
            order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :width]
            tokens = gather_tokens(tokens, order)
            ok, positions, size = (torch.gather(t, 1, order) for t in (ok, positions, size))
            mask = ok
        h = assemble(vit, tokens)
        rope = rope_of(vit, grid, positions)  # a large token: its top-left cell's; padding (-1): identity
        bias = None if mask is None else as_attn_mask(key_bias_from_mask(mask, num_prefix(vit), h.dtype))
        for blk in vit.blocks:
            h = call_block(blk, h, rope, bias)
        aux = {"tokens_per_scale": counts}
        out = to_output(vit, h, positions, grid, assignment=self.assignment(kept, counts, grid), sizes=size,
                        mask=mask, aux=aux)
        if mask is not None:
            out.patches = out.patches * mask.unsqueeze(-1).to(out.patches.dtype)  # padding reads as zeros
        return out

    @staticmethod
    def assignment(kept: list[torch.Tensor], counts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, gh * gw)``: the index of the token covering each base cell (tokens ordered by scale, then grid)."""
        bsz = counts.shape[0]
        start = torch.cumsum(counts, dim=1) - counts  # each scale's first token, per image
        out = torch.full((bsz, grid[0], grid[1]), -1, dtype=torch.long, device=counts.device)
        for level, keep in enumerate(kept):
            n = 1 << level
            rank = keep.flatten(1).long().cumsum(dim=1) - 1 + start[:, level : level + 1]
            tok = torch.where(keep.flatten(1), rank, torch.full_like(rank, -1)).reshape(keep.shape)
            tok = tok.repeat_interleave(n, dim=1).repeat_interleave(n, dim=2)
            region = out[:, : tok.shape[1], : tok.shape[2]]
            out[:, : tok.shape[1], : tok.shape[2]] = torch.where(tok >= 0, tok, region)
        return out.flatten(1)


@register_method("apt")
class APT(Method):
    description = ("adaptive patch sizes: an entropy quadtree makes plain regions one token per 2x/4x patch "
                   "(downsampled + zero-init aggregation of its cells), detail stays at the base size")
    style = ("#e6550d", r"$\boxplus$")  # a patch split into four: a mathtext glyph no other method uses
    kind = "selection"
    budget_key = "entropy"
    budget_type = float
    # Entropy thresholds in bits (the official values: 4.5 in its validation config, 6.0 / 4.0 in its README and
    # visualisation defaults); 0 = every patch at the base size.
    default_budgets = (4.0, 5.0, 6.0)
    training = "finetune"
    variable_length = True
    dense_output = True

    @dataclass(frozen=True)
    class Options:
        scales: int = option(3, "patch sizes p, 2p, .., 2^(scales-1) p (the official num_scales)", min=2, max=4)
        bins: int = option(512, "histogram bins over the grey levels 0-255 (official 512)", min=2)
        seed: int = option(0, "seed of the aggregation convolution's initialisation", min=0)
        finetune: Stage = option(default_factory=Stage, help="fine-tuning at this threshold (steps=0: none)")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 0.0  # no large patch: the plain backbone

    def check_budget(self):
        top = math.log2(self.opts.bins)
        self._require(0 <= self.budget <= top, f"entropy in [0, {top:g}] bits (log2 of the {self.opts.bins} "
                                               "histogram bins); 0 = every patch at the base size, the plain backbone")

    def build(self, vit):
        return APTEncoder(detach_copy(vit), self.budget, self.opts.scales, self.opts.bins, self.opts.seed)

    def fit(self, ctx):
        return self.finetuned_once(ctx, tag=f"apt-{self.budget:g}")


__all__ = ["APT", "APTEncoder", "EntropyQuadtree", "PatchAggregator", "grey_levels", "patch_entropy", "quadtree",
           "level_pos_embed"]
