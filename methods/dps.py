"""``dps``: Differentiable Patch Selection (Cordonnier et al., CVPR 2021). Budget = k patches.

A small CNN scorer (the official ``Scorer``: 3x3 convolutions with 8, 16, 32 and 1 channels, ReLU, max
pooling) runs on the image downscaled by ``scorer_size`` and yields one score per high-res patch cell of
the backbone. Scores are normalised to [0, 1] per image (the official ``zerooneeps(1e-5)``).

Training uses the perturbed top-k of Berthet et al. (2020): the indicator matrix ``Y`` (k x N, rows sorted
by patch position) is the mean of hard top-k indicators over ``num_samples`` Gaussian perturbations of
the scores with scale ``sigma``. Its backward (``gradient``):

- ``official`` (default): the estimator of the official JAX code (``ptopk_patch_selection``), of the PyTorch
  ``PerturbedTopKFunction`` in the paper's supplementary material and of the ports built on it, which keeps the
  diagonal terms of the Jacobian ``E[Y Z^T] / sigma``: the gradient of score j is
  ``sum_k g[k, j] E[Y[k, j] Z[j]] / sigma`` (each sample's noise on j, where j was picked in slot k);
- ``full``: Berthet's whole vector-Jacobian product ``E[<g, Y(s + sigma Z)> Z] / sigma``, the Jacobian formula
  the paper's text quotes from Berthet et al., but not what its code computes (lwbench version 1, whose
  docstring wrongly called it the paper's appendix code).
  With identical noise both have the same forward; per-step gradients of the two have cosine 0.04-0.47 and the
  full one a 3-21x larger norm (they agree fairly, cosine ~0.85, only with 1e5 samples at sigma 0.05), so the
  choice changes how the scorer trains: the official one is the method as published.

The selected tokens are ``Y @ E`` where ``E`` holds every patch's embedding (projection + position), so the
backbone sees k soft patches and the scorer receives gradients. ``sigma`` decays linearly to 0 over training
(the official ``linear_decrease_perturbed_sigma``); the loss adds the official entropy regulariser
``-0.01 * H(softmax(raw scores))``.

At test time: hard top-k, and only the k chosen patches are embedded and run through the backbone.

``num_samples``: 500, the paper's configs. The estimator never builds the (samples x k x N) one-hot tensor (the
forward scatters counts, the backward is one gather and one scatter per sample); drawing and ranking B x S x N
perturbed scores dominates a CPU training step (batch 64, N = 300, k = 38: 0.55 s per step with S = 500, 0.11 s
with S = 100 on one core); ``num_samples=100`` is the cheaper setting, with a noisier gradient.

Scorer geometry: the official scorer's VALID convolutions and 8x8/8 max-pool fix its output grid to the image
size it was built for. Here the convolutions are padded (the output keeps the input's size) and the scorer input
is rounded up to a whole multiple of the ViT patch grid, so the max-pool onto that grid has equal,
non-overlapping windows (kernel = stride = input / grid): each patch's score is the maximum over its own
window only. Overlapping windows (an input that is not a multiple of the grid) share their maxima and give
exact ties between neighbouring cells, which torch and JAX then break differently. Ties from the image itself
(two windows of a flat background with the same maximum) remain possible; ``torch.topk`` does not promise which
of them it keeps (a stable tie-break would be a version 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.config import Stage
from lwbench.method import Overhead, PatchSelectionMethod, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import embed_patches, grid_of, run_tokens


# -- perturbed top-k ---------------------------------------------------------------------------------
def hard_topk_indicators(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, N)`` -> ``(B, k, N)`` one-hot rows of the top-k cells, rows sorted by cell index."""
    idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return F.one_hot(idx, scores.shape[-1]).to(scores.dtype)


GRADIENTS = ("official", "full")


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, sigma: float, num_samples: int,
                gradient: str = "official") -> torch.Tensor:
        b, n = scores.shape
        noise = torch.randn(b, num_samples, n, dtype=scores.dtype, device=scores.device)
        idx = (scores.unsqueeze(1) + sigma * noise).topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        ones = torch.ones(b, k, num_samples, dtype=scores.dtype, device=scores.device)
        indicators = scores.new_zeros(b, k, n).scatter_add_(2, idx.transpose(1, 2), ones) / num_samples
        ctx.save_for_backward(noise, idx)
        ctx.sigma = sigma
        ctx.gradient = gradient
        return indicators

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        noise, idx = ctx.saved_tensors  # (B, S, N), (B, S, k): the cell picked in slot k by sample s
        b, s, _ = noise.shape
        g_picked = torch.gather(grad, 2, idx.transpose(1, 2)).transpose(1, 2)  # (B, S, k): g[k, idx_sk]
        if ctx.gradient == "full":
            # J^T g with J = E[Y_s Z_s^T] / sigma: <g, Y_s> = sum_k g[k, idx_sk] for each sample s.
            grad_scores = (g_picked.sum(2).unsqueeze(-1) * noise).mean(1) / ctx.sigma
        else:
            # official: sum_k g[k, j] E[Y[k, j] Z[j]] / sigma, i.e. each sample adds g[k, j] Z_s[j] to the cell j
            # it picked in slot k
            z_picked = torch.gather(noise, 2, idx)  # (B, S, k): Z_s[idx_sk]
            grad_scores = torch.zeros_like(noise[:, 0]).scatter_add_(
                1, idx.reshape(b, -1), (g_picked * z_picked).reshape(b, -1)) / (s * ctx.sigma)
        return grad_scores, None, None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, sigma: float, num_samples: int = 500,
                   gradient: str = "official") -> torch.Tensor:
    """Differentiable top-k indicators ``(B, k, N)`` (Berthet et al. 2020). ``sigma == 0``: hard top-k, no grad.
    ``gradient``: ``official`` (the DPS code's diagonal estimator) or ``full`` (Berthet's whole product)."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, not {gradient!r}")
    if sigma <= 0:
        return hard_topk_indicators(scores.detach(), k)
    return _PerturbedTopK.apply(scores, k, float(sigma), int(num_samples), gradient)


def zero_one(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official ``zerooneeps``: per-image min-max scaling, so ``sigma`` is relative to the score range."""
    lo = scores.amin(dim=-1, keepdim=True)
    hi = scores.amax(dim=-1, keepdim=True)
    return (scores - lo) / (hi - lo + eps)


# -- scorer --------------------------------------------------------------------------------------------
class PatchScorer(Overhead):
    """The official DPS scorer CNN on the downscaled image, max-pooled to the backbone's patch grid over equal,
    non-overlapping windows (the input is a whole multiple of the grid; see the module docstring)."""

    def __init__(self, size: float):
        super().__init__()
        self.size = float(size)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 3, padding=1),
        )

    def input_size(self, hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        h, w = hw
        if self.size <= 1:
            sh, sw = round(h * self.size), round(w * self.size)
        else:  # a height in pixels, aspect kept
            sh, sw = round(self.size), round(w * self.size / h)
        # round up to whole multiples of the grid: disjoint pooling windows, no shared maxima, no ties by design
        gh, gw = grid
        return -(-max(gh, int(sh)) // gh) * gh, -(-max(gw, int(sw)) // gw) * gw

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = self.input_size((int(x.shape[-2]), int(x.shape[-1])), grid)
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        kh, kw = size[0] // grid[0], size[1] // grid[1]
        return F.max_pool2d(self.net(small), (kh, kw), (kh, kw)).flatten(1)  # (B, N) raw scores


class DPSEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int, scorer_size: float, sigma: float, num_samples: int,
                 gradient: str = "official"):
        super().__init__()
        self.vit = vit
        self.k = int(k)
        self.sigma = float(sigma)
        self.num_samples = int(num_samples)
        self.gradient = gradient
        self.scorer = PatchScorer(scorer_size)
        # Training forwards seen so far; in the checkpoint, so a resumed run continues the sigma schedule.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.total_steps = 0  # set by fit(); 0 = constant sigma

    def current_sigma(self) -> float:
        if self.total_steps <= 0:
            return self.sigma
        return self.sigma * max(0.0, 1.0 - int(self.step) / self.total_steps)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        grid = grid_of(self.vit, x)
        raw = self.scorer(x, grid)
        scores = zero_one(raw)
        if self.training:
            sigma = self.current_sigma()
            self.step += 1
            ind = perturbed_topk(scores, self.k, sigma, self.num_samples, self.gradient)  # (B, k, N)
            patches = torch.bmm(ind, embed_patches(self.vit, x))  # soft selection of embedded patches
            positions = ind.argmax(dim=-1)
            aux = {"scores": raw, "sigma": sigma, "indicators": ind}
        else:
            positions = scores.topk(self.k, dim=1).indices.sort(dim=1).values
            patches = embed_patches(self.vit, x, positions)  # only the k chosen patches are embedded
            aux = {"scores": raw}
        return run_tokens(self.vit, patches, positions, grid, aux=aux)


def score_entropy(raw: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(raw scores) per image, averaged (the official ``entropy_before_normalization``)."""
    logp = F.log_softmax(raw, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def make_dps_loss(entropy_weight: float):
    """Task cross-entropy + the official entropy regulariser on the raw scores, as an lwbench ``loss_fn``."""
    def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        out = model.encoder(images)
        logits = model.head(out, size=images.shape[-2:])
        seg = targets.ndim > 1  # label maps: ignore index 255
        ce = F.cross_entropy(logits, targets, ignore_index=255) if seg else F.cross_entropy(logits, targets)
        ent = score_entropy(out.aux["scores"])
        # loss parts stay on the device: train_loop reads them only for its progress bar
        return ce + entropy_weight * ent, {"ce": ce.detach(), "entropy": ent.detach(), "sigma": out.aux["sigma"]}

    return loss_fn


@register_method("dps")
class DPS(PatchSelectionMethod):
    description = "CNN scorer on a downscaled image + perturbed top-k (Berthet) picks k high-res patches"
    style = ("#e377c2", "h")
    training = "finetune"
    version = 2  # 2: the official (diagonal) gradient, 500 samples, scorer input a multiple of the grid (no ties)

    @dataclass(frozen=True)
    class Options:
        scorer_size: float = option(0.25, "<= 1: fraction of the high-res size; > 1: scorer input height in px",
                                    min=0, min_exclusive=True)
        sigma: float = option(0.05, "perturbed top-k noise (official, scores in [0, 1]), decayed linearly to 0",
                              min=0)
        num_samples: int = option(500, "perturbed top-k samples (the paper's 500; 100 is a cheaper, noisier step)",
                                  min=1)
        gradient: str = option("official", "perturbed top-k backward: official (the DPS code's diagonal estimator) "
                               "or full (Berthet's whole vector-Jacobian product, lwbench version 1)",
                               choices=GRADIENTS)
        entropy_weight: float = option(-0.01, "official entropy regulariser (negative: rewards spread-out scores)")
        finetune: Stage = option(default_factory=Stage, help="end-to-end training of scorer, backbone and head")

    def build(self, vit: nn.Module) -> nn.Module:
        o = self.opts
        return DPSEncoder(detach_copy(vit), int(self.budget), o.scorer_size, o.sigma, o.num_samples, o.gradient)

    def fit(self, ctx) -> nn.Module:
        model = self.task_model(ctx, trainable=True)
        stage = ctx.stage(self.opts.finetune)
        model.encoder.total_steps = stage.steps
        ctx.train(model, make_dps_loss(self.opts.entropy_weight), f"dps-{int(self.budget)}", stage=stage)
        return model.eval()
