"""``hourglass``: token clustering and reconstruction (Liang, Yuan, Ding, Luo, Lin, Jia, Zhang, Zhang and Hu, NeurIPS
2022, "Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning"). Budget = ``k``, the
number of cluster tokens the blocks after the clustering layer process. Training-free; the dense baseline beside ALGM.

The backbone runs at full resolution for ``alpha`` blocks; a **token clustering layer** then turns the ``N = H x W``
patch tokens into ``M = h x w`` cluster centres, the remaining blocks run on the prefix tokens and the centres only,
and a **token reconstruction layer** after the last block gives back ``N`` tokens, each a weighted sum of the final
cluster tokens (the "hourglass"), before the backbone's final norm. Following the official code (github
``Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter``, the ADE20K/Segmenter release the README's tables come
from: ``mmseg/ops/cluster.py`` ``TokenClusteringBlock``, ``mmseg/ops/reconstruction.py``
``TokenReconstructionBlock``, ``mmseg/models/backbones/hourglass_vit.py`` ``HourglassVisionTransformer``, the
configs ``configs/segmenter_hourglass_vit/*.py``; the DPT, SWAG and SAM releases of the same organisation carry the
same two operators):

* **where**: after the whole block ``cluster_cfg.location`` (0-based; ``alpha = location + 1`` blocks run at full
  resolution, the README's ``alpha``), on that block's output tokens with the CLS token set aside (``cluster``:
  ``x[:, 1:]``, then ``cat((cls_tokens, x_cluster))``). Here every prefix token (CLS and registers) is set aside;
* **initial centres**: ``adaptive_avg_pool2d`` of the ``H x W`` token map to ``h x w`` (``calc_init_centroid``);
  every token's initial cluster is the ``h x w`` label map resized to ``H x W`` with ``mode="nearest"``;
* **clustering** (``TokenClusteringBlock.forward``), ``n_iters`` times: squared Euclidean distances ``d(m, n) =
  ||c_m||^2 + ||x_n||^2 - 2 c_m . x_n`` between every centre and every token, centres outside the token's local window
  removed (``|dx|, |dy| <= window // 2`` on the ``h x w`` grid of cluster indices, around the token's initial
  cluster; the official ``+ 1e16``), affinity ``A = softmax over clusters of (-temperature * d)``, and new centres
  ``c_m = sum_n A(m, n) x_n / max(sum_n A(m, n), 1e-16)``. The centres after the last iteration are the cluster
  tokens. The official layer also returns ``argmin`` hard labels, used only by ``NaiveUnpooling``, not here;
* **reconstruction** (``TokenReconstructionBlock._forward``): from the tokens saved before clustering ``f_n`` and
  the centres ``c_m`` (both at the clustering layer, not updated later), ``w(n, m) = exp(-temperature *
  ||f_n - c_m||^2)``, kept where ``w(n, m)`` is at least the ``k``-th largest of the row (the official ``topk`` then
  ``ge(min)``: ties with the ``k``-th are kept), ``F.normalize``-d over clusters (**L2**), and the output token
  ``n = sum_m w(n, m) z_m`` with ``z`` the cluster tokens out of the last block;
* **defaults** as the ADE20K config (ViT-L/16, 24 blocks, 640 px, 40 x 40 patches): ``location=9`` (``alpha = 10``),
  ``num_spixels=784`` (28 x 28, 0.7 of each side), ``n_iters=5``, ``window_size=5``, clustering ``temperture=0.02``,
  reconstruction ``k=20`` and ``temperture=0.02``. Other depths take ``alpha = round(depth * 10 / 24)`` (5 of 12,
  2 of 4), kept in ``1..depth - 1`` (option ``alpha`` takes ``0..depth - 1``; 0 clusters the embedded patches, the
  DPT release's ``cluster_after_output=False``); the default ``k`` is the grid at 0.7 of each side (ViT-B/14 at
  518 px: 26 x 26 of 37 x 37 = 676), the default sweep 0.5, 0.7 and 0.85 of each side (the official settings span 0.5
  to 0.72 of a side: 28 and 20 of 40 on ADE20K, 32 and 24 of 48 on Cityscapes, 20 and 15 of 30 on Pascal Context, 23
  and 16 of 32 on SWAG).

The budget ``k`` is a token count realised as the grid of the patch grid's aspect that holds about ``k`` cells:
``h = round(H sqrt(k / N))``, ``w = round(W sqrt(k / N))`` (:func:`cluster_grid`; the default budgets are exact
products ``h x w``). ``k = N`` is the no-op: **no clustering layer** and the model is the plain backbone, bit for bit
(any ``k`` whose grid rounds to ``H x W`` too: a clustering into as many clusters as tokens would save nothing). The
official code has no such setting (its plain model is the ``VisionTransformer`` config); lwbench's switch.

Departures (documented, tested where they matter):

* **What is reconstructed, and where**: the official Segmenter release runs its decoder (the mask transformer) on the
  cluster tokens and reconstructs the *decoder's output* (``EncoderDecoder.encode_decode`` calls the backbone's
  ``reconstructer`` on the masks); the DPT release reconstructs the hooked *block outputs* before its decoder
  (``get_activation_with_reconstruction``). lwbench's heads are its own and read the encoder's tokens, so the
  reconstruction is applied, as in the DPT release, to the last block's output tokens, and the backbone's final norm
  follows on the prefix and the ``N`` reconstructed tokens together (one sequence, as in the plain backbone). The method
  returns the **reconstructed full set**: ``N`` patch tokens, ``positions`` every cell in grid order, no
  ``assignment`` or ``sizes``, which :func:`lwbench.tokens.densify` passes through as an un-reduced output. A soft
  reconstruction (each token a mixture of up to ``k`` clusters) has no hard assignment to fit lwbench's un-merging
  convention, and the official hard alternative (``NaiveUnpooling``, argmin labels) is not the method's. The output
  (:class:`HourglassOutput`) reports the cluster count as the tokens processed (``realised_tokens``), not ``N``.
  (The reconstruction also feeds the CLS token's final norm call, so a MAC count traced for a head that reads only
  CLS still counts it, as it runs.)
* **L2 normalisation** of the reconstruction weights is the official ``F.normalize`` (the weights do not sum to 1: a
  token's scale grows by up to ``sqrt(k)`` when its weights are flat). The final LayerNorm after it removes that
  per-token scale (up to its ``eps``), as the argmax removes it on the official Segmenter's class scores. Option
  ``normalize=l1`` makes the weights a convex combination instead.
* **Numerics**: ``exp(-temperature * d)`` is computed as ``exp(-temperature * (d - min_m d))``, the same weights up
  to a positive factor per row, which both normalisations remove; the official form underflows to all zeros (an
  all-zero token) when every distance of a row exceeds about ``87 / temperature``. ``k`` larger than the number of
  clusters keeps them all (the official ``topk`` would raise). Clustering and reconstruction run in float32 with
  autocast off (distances by expansion lose everything in bfloat16).
* **Any grid, any prefix**: the official backbone takes the grid's aspect ratio from the image and asserts square
  ``num_spixels``; here ``h x w`` follows the budget on any grid. CLS *and* registers are set aside and never
  clustered; a backbone without a prefix (SigLIP) clusters every token.
* **RoPE backbones** (``Eva``: DINOv3, EVA-02; the official code runs absolute-position ViTs only, where positions
  are already in the features): a cluster takes the rotary embedding of the cell at the centre of its initial pooling
  bin (:func:`cluster_cells`).
* **Cost**: the dense ``M x N`` distances and affinities of every iteration and of the reconstruction, as the official
  code computes them, are :class:`~lwbench.method.Overhead` modules (:class:`TokenClustering`,
  :class:`TokenReconstruction`): ``(2 n_iters + 2) M N C`` MACs (``C`` the width). No attention map is read, so every
  block keeps timm's fused attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.errors import ConfigError
from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, to_output

from ._reduction import call_block, rope_of, start_tokens, tokens_per_layer

NORMALIZE = ("l2", "l1")
OFFICIAL_ALPHA = (10, 24)  # ADE20K config: location=9 of 24 blocks (alpha = 10)
SIDES = (0.5, 0.7, 0.85)  # default sweep: fraction of each side of the patch grid kept as clusters
DEFAULT_SIDE = 0.7  # ADE20K: 28 x 28 clusters of 40 x 40 patches


def default_alpha(depth: int) -> int:
    """Blocks before the clustering layer: the official 10 of 24 scaled to ``depth``, in ``1..depth - 1`` (0 for a
    one-block backbone)."""
    a = int(depth * OFFICIAL_ALPHA[0] / OFFICIAL_ALPHA[1] + 0.5)
    return min(max(a, 1), depth - 1)


def cluster_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """``(h, w)`` clusters for a budget of ``k`` tokens on an ``H x W`` patch grid: the grid's aspect, each side
    scaled by ``sqrt(k / N)`` and rounded, in ``1..H`` x ``1..W``."""
    gh, gw = grid
    s = math.sqrt(k / (gh * gw))
    return min(gh, max(1, int(gh * s + 0.5))), min(gw, max(1, int(gw * s + 0.5)))


def side_grid(grid: tuple[int, int], side: float) -> tuple[int, int]:
    """``(h, w)`` at ``side`` of each side of the patch grid (rounded, at least 1)."""
    return max(1, int(grid[0] * side + 0.5)), max(1, int(grid[1] * side + 0.5))


def nearest_index(out_size: int, in_size: int, device=None) -> torch.Tensor:
    """``(out_size,)`` long: the source index of every output index of a ``mode="nearest"`` resize, as PyTorch's
    kernel computes it: ``min(floor(i * float32(in / out)), in - 1)`` in float32."""
    scale = torch.tensor(float(in_size), dtype=torch.float32, device=device) / out_size
    i = torch.arange(out_size, dtype=torch.float32, device=device)
    return (i * scale).floor().long().clamp(max=in_size - 1)


def initial_labels(grid: tuple[int, int], cgrid: tuple[int, int], device=None) -> torch.Tensor:
    """``(N,)`` long: every token's initial cluster, the ``h x w`` label map resized to ``H x W`` with
    ``mode="nearest"`` as the official ``calc_init_centroid`` does (index arithmetic, not ``F.interpolate``, whose
    decomposition the torch flop counter does not know)."""
    rows, cols = nearest_index(grid[0], cgrid[0], device), nearest_index(grid[1], cgrid[1], device)
    return (rows[:, None] * cgrid[1] + cols[None, :]).reshape(-1)


def window_mask(grid: tuple[int, int], cgrid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """``(M, N)`` bool: cluster ``m`` is in token ``n``'s local window (``|dx|, |dy| <= window // 2`` between ``m``
    and ``n``'s initial cluster on the ``h x w`` grid)."""
    w = cgrid[1]
    r = window // 2
    lab = initial_labels(grid, cgrid, device)
    m = torch.arange(cgrid[0] * w, device=device)
    dx = (lab[None, :] % w - m[:, None] % w).abs()
    dy = (lab[None, :] // w - m[:, None] // w).abs()
    return (dx <= r) & (dy <= r)


def cluster_cells(grid: tuple[int, int], cgrid: tuple[int, int], device=None) -> torch.Tensor:
    """``(M,)`` long: the patch cell at the centre of every cluster's initial pooling bin (a cluster's RoPE cell)."""
    (gh, gw), (h, w) = grid, cgrid
    rows = ((torch.arange(h, device=device) * 2 + 1) * gh) // (2 * h)  # floor((i + 1/2) H / h)
    cols = ((torch.arange(w, device=device) * 2 + 1) * gw) // (2 * w)
    return (rows[:, None] * gw + cols[None, :]).reshape(-1)


def sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, P, Q)`` squared Euclidean distances ``||a_p||^2 + ||b_q||^2 - 2 a_p . b_q`` (the official expansion)."""
    return (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * (a @ b.transpose(1, 2))


class TokenClustering(Overhead):
    """The token clustering layer: ``(B, N, C)`` tokens on an ``H x W`` grid -> ``(B, M, C)`` centres, local soft
    k-means from adaptive-average-pooled initial centres (the official ``TokenClusteringBlock``)."""

    def __init__(self, iters: int = 5, temperature: float = 0.02, window: int = 5):
        super().__init__()
        self.iters, self.temperature, self.window = int(iters), float(temperature), int(window)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], cgrid: tuple[int, int]) -> torch.Tensor:
        bsz, n, c = x.shape
        with torch.autocast(x.device.type, enabled=False):
            f = x.float()
            img = f.transpose(1, 2).reshape(bsz, c, *grid)
            centres = F.adaptive_avg_pool2d(img, cgrid).flatten(2).transpose(1, 2)  # (B, M, C)
            # (M, N) clusters outside each token's window: index arithmetic on M x N, remade every forward (a cached
            # tensor made under inference_mode could not take part in a later autograd forward)
            outside = torch.logical_not(window_mask(grid, cgrid, self.window, x.device))
            for _ in range(self.iters):
                logits = (-self.temperature * sq_distances(centres, f)).masked_fill(outside, float("-inf"))
                aff = logits.softmax(dim=1)  # (B, M, N): over the clusters of each token's window
                centres = (aff @ f) / aff.sum(dim=2, keepdim=True).clamp(min=1e-16)
        return centres


class TokenReconstruction(Overhead):
    """The token reconstruction layer: ``(B, M, D)`` cluster tokens -> ``(B, N, D)``, each token the normalised
    ``exp(-temperature * d)`` mixture of its ``k`` nearest clusters, distances between the tokens saved before
    clustering and the centres (the official ``TokenReconstructionBlock``)."""

    def __init__(self, k: int = 20, temperature: float = 0.02, normalize: str = "l2"):
        super().__init__()
        self.k, self.temperature, self.normalize = int(k), float(temperature), normalize

    def weights(self, feat: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """``(B, N, M)`` reconstruction weights from the ``(B, N, C)`` tokens before clustering and the ``(B, M, C)``
        centres."""
        logits = -self.temperature * sq_distances(feat, centres)
        w = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # exp(-t d) up to a positive factor per row
        kk = min(self.k, w.shape[-1])
        kth = w.topk(kk, dim=-1).values[..., -1:]
        w = torch.where(w >= kth, w, torch.zeros_like(w))  # the k nearest (and ties with the k-th)
        if self.normalize == "l2":
            return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # F.normalize
        return w / w.sum(dim=-1, keepdim=True)

    def forward(self, tokens: torch.Tensor, feat: torch.Tensor, centres: torch.Tensor):
        """``((B, N, D) reconstructed tokens, (B, N) the cluster of each token's largest weight)``: the labels are the
        hard clustering ``lwbench show`` draws (the nearest centre, the official layer's ``argmin`` hard labels up to
        the window), read off weights computed anyway."""
        with torch.autocast(tokens.device.type, enabled=False):
            w = self.weights(feat.float(), centres.float())
            return (w @ tokens.float()).to(tokens.dtype), w.argmax(dim=-1)


@dataclass
class HourglassOutput(TokenOutput):
    """A :class:`~lwbench.tokens.TokenOutput` of the reconstructed grid (every cell, in order) that reports the
    ``clusters`` the blocks after the clustering layer processed as its tokens (``realised_tokens``)."""

    clusters: int = 0

    def realised_tokens(self) -> torch.Tensor:
        return torch.full((self.patches.shape[0],), self.clusters, device=self.patches.device)


class HourglassEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int, alpha: int, iters: int = 5, temperature: float = 0.02,
                 window: int = 5, recon_k: int = 20, recon_temperature: float = 0.02, normalize: str = "l2"):
        super().__init__()
        self.vit = vit
        self.k, self.alpha = int(k), int(alpha)
        self.clustering = TokenClustering(iters, temperature, window)
        self.reconstruction = TokenReconstruction(recon_k, recon_temperature, normalize)

    def forward(self, x: torch.Tensor):
        vit = self.vit
        h, positions, grid, p = start_tokens(vit, x)
        bsz, n = x.shape[0], positions.shape[1]
        cgrid = cluster_grid(grid, self.k)
        m = cgrid[0] * cgrid[1]
        rope = rope_of(vit, grid)
        if m >= n:  # no reduction: the plain backbone
            for blk in vit.blocks:
                h = call_block(blk, h, rope)
            aux = {"tokens_per_layer": tokens_per_layer([n] * len(vit.blocks), bsz, x.device)}
            return to_output(vit, h, positions, grid, aux=aux)
        feat = centres = None
        counts = []
        for i, blk in enumerate(vit.blocks):
            if i == self.alpha:  # the token clustering layer, after alpha blocks at full resolution
                feat = h[:, p:]
                centres = self.clustering(feat, grid, cgrid)
                h = torch.cat([h[:, :p], centres.to(h.dtype)], dim=1)
                if rope is not None:
                    rope = rope_of(vit, grid, cluster_cells(grid, cgrid, x.device).expand(bsz, -1))
            h = call_block(blk, h, rope)
            counts.append(h.shape[1] - p)
        patches, labels = self.reconstruction(h[:, p:], feat, centres)  # the token reconstruction layer
        positions = all_positions(bsz, grid, x.device)
        # the final norm on the prefix and the reconstructed tokens together: one sequence, as the plain backbone's
        out = to_output(vit, torch.cat([h[:, :p], patches], dim=1), positions, grid)
        aux = {"tokens_per_layer": tokens_per_layer(counts, bsz, x.device), "cluster_grid": cgrid,
               "cluster_labels": labels}
        return HourglassOutput(prefix=out.prefix, patches=out.patches, positions=positions, grid=tuple(grid), aux=aux,
                               clusters=m)


@register_method("hourglass")
class Hourglass(Method):
    description = ("Hourglass (Expedite-ViT): local soft k-means clusters the tokens after alpha blocks, the rest run "
                   "on k clusters, a k-NN reconstruction restores every token (training-free, dense)")
    style = ("#66a61e", "$\u29d7$")  # a black hourglass (a solid glyph: its off-the-shelf points read hollow)
    kind = "reduction"
    budget_key = "k"
    budget_type = int
    default_budgets = ()  # scaled to the grid by budget_grid() (0.5, 0.7, 0.85 of each side)
    training = "none"
    dense_output = True
    variable_length = False
    attention_map = "none"

    @dataclass(frozen=True)
    class Options:
        alpha: int | None = option(None, "blocks before the clustering layer (the paper's alpha, official "
                                         "location + 1; null: round(depth * 10 / 24), the ADE20K config)", min=0)
        iters: int = option(5, "clustering iterations (official n_iters)", min=1)
        temperature: float = option(0.02, "clustering temperature, multiplies the squared distance (official 0.02)",
                                    min=0.0, min_exclusive=True)
        window: int = option(5, "side of the local window of clusters a token may join, odd (official 5)", min=1)
        recon_k: int = option(20, "clusters each token is reconstructed from (official k = 20)", min=1)
        recon_temperature: float = option(0.02, "reconstruction temperature (official 0.02)", min=0.0,
                                          min_exclusive=True)
        normalize: str = option("l2", "reconstruction weights: l2 (official F.normalize) or l1 (sum to 1)",
                                choices=NORMALIZE)

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return spec.num_patches  # as many clusters as patches: no clustering layer

    @classmethod
    def budget_grid(cls, spec: BackboneSpec) -> list[float]:
        """Cluster counts at 0.5, 0.7 and 0.85 of each side of the patch grid, realised (``cluster_grid``), below the
        patch count; the patch count itself on a grid too small to reduce."""
        n = spec.num_patches
        counts = set()
        for side in SIDES:
            h, w = cluster_grid(spec.grid, math.prod(side_grid(spec.grid, side)))
            if h * w < n:
                counts.add(h * w)
        return sorted(counts) or [n]

    @classmethod
    def default_budget(cls, spec: BackboneSpec) -> float | None:
        h, w = cluster_grid(spec.grid, math.prod(side_grid(spec.grid, DEFAULT_SIDE)))
        return h * w

    def alpha(self) -> int:
        """Blocks before the clustering layer (option ``alpha``, default :func:`default_alpha`); a ``ConfigError``
        when there is no block after it, or when the window is even."""
        depth = self.spec.depth
        if self.opts.window % 2 == 0:
            raise ConfigError(f"hourglass: option window={self.opts.window} must be odd (a window centred on the "
                              "token's cluster)")
        a = self.opts.alpha
        if a is None:
            return default_alpha(depth)
        if a >= depth:
            raise ConfigError(f"hourglass: option alpha={a} must leave a block after the clustering layer: "
                              f"0..{depth - 1}")
        return a

    def check_budget(self):
        self.alpha()
        n = self.spec.num_patches
        self._require(1 <= self.budget <= n, f"k=1..{n} (cluster tokens, an h x w grid of the patch grid's aspect; "
                                             f"k={n} is the plain backbone)")

    def build(self, vit):
        o = self.opts
        return HourglassEncoder(detach_copy(vit), int(self.budget), self.alpha(), o.iters, o.temperature, o.window,
                                o.recon_k, o.recon_temperature, o.normalize)


__all__ = ["Hourglass", "HourglassEncoder", "HourglassOutput", "TokenClustering", "TokenReconstruction",
           "cluster_grid", "cluster_cells", "default_alpha", "initial_labels", "nearest_index", "side_grid",
           "window_mask"]
