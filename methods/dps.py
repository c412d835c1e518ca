"""``dps``: Differentiable Patch Selection (Cordonnier et al., CVPR 2021). Budget = k patches.

A small CNN scorer (the official ``Scorer``: 3x3 convolutions with 8, 16, 32 and 1 channels, ReLU, max
pooling) runs on the image downscaled by ``scorer_size`` and yields one score per high-res patch cell of
the backbone. Scores are normalised to [0, 1] per image (the official ``zerooneeps(1e-5)``).

Training uses the perturbed top-k of Berthet et al. (2020): the indicator matrix ``Y`` (k x N, rows sorted
by patch position) is the mean of hard top-k indicators over ``num_samples`` Gaussian perturbations of
the scores with scale ``sigma``, and its Jacobian is estimated as ``E[Y(s + sigma Z) Z^T] / sigma`` (the
paper's appendix code). The selected tokens are ``Y @ E`` where ``E`` holds every patch's embedding
(projection + position), so the backbone sees k soft patches and the scorer receives gradients. ``sigma``
decays linearly to 0 over training (the official ``linear_decrease_perturbed_sigma``); the loss adds the
official entropy regulariser ``-0.01 * H(softmax(raw scores))``.

At test time: hard top-k, and only the k chosen patches are embedded and run through the backbone.

``num_samples``: the paper's configs use 500. Our estimator never builds the (samples x k x N) one-hot
tensor (the forward scatters counts, the backward is one gather per sample), but drawing and ranking
B x S x N perturbed scores still dominates a CPU training step: at batch 64, N = 300, k = 38 it took
0.55 s per step with S = 500 and 0.11 s with S = 100 on one core. The default is therefore 100 (the
gradient estimator's variance grows as 1/S); set ``num_samples=500`` for the paper's setting.
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


class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, sigma: float, num_samples: int) -> torch.Tensor:
        b, n = scores.shape
        noise = torch.randn(b, num_samples, n, dtype=scores.dtype, device=scores.device)
        idx = (scores.unsqueeze(1) + sigma * noise).topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        ones = torch.ones(b, k, num_samples, dtype=scores.dtype, device=scores.device)
        indicators = scores.new_zeros(b, k, n).scatter_add_(2, idx.transpose(1, 2), ones) / num_samples
        ctx.save_for_backward(noise, idx)
        ctx.sigma = sigma
        return indicators

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        noise, idx = ctx.saved_tensors
        # J^T g with J = E[Y_s Z_s^T] / sigma: <g, Y_s> = sum_k g[k, idx_sk] for each sample s.
        g_dot_y = torch.gather(grad, 2, idx.transpose(1, 2)).sum(1)  # (B, S)
        grad_scores = (g_dot_y.unsqueeze(-1) * noise).mean(1) / ctx.sigma
        return grad_scores, None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, sigma: float, num_samples: int = 500) -> torch.Tensor:
    """Differentiable top-k indicators ``(B, k, N)`` (Berthet et al. 2020). ``sigma == 0``: hard top-k, no grad."""
    if sigma <= 0:
        return hard_topk_indicators(scores.detach(), k)
    return _PerturbedTopK.apply(scores, k, float(sigma), int(num_samples))


def zero_one(scores: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official ``zerooneeps``: per-image min-max scaling, so ``sigma`` is relative to the score range."""
    lo = scores.amin(dim=-1, keepdim=True)
    hi = scores.amax(dim=-1, keepdim=True)
    return (scores - lo) / (hi - lo + eps)


# -- scorer --------------------------------------------------------------------------------------------
class PatchScorer(Overhead):
    """The official DPS scorer CNN on the downscaled image, max-pooled to the backbone's patch grid.

    The official network uses VALID convolutions and an 8x8 max-pool, which fixes its output grid; here
    the convolutions are padded and the pooling is adaptive so each score cell is exactly one ViT patch."""

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
        return max(grid[0], int(sh)), max(grid[1], int(sw))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = self.input_size((int(x.shape[-2]), int(x.shape[-1])), grid)
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return F.adaptive_max_pool2d(self.net(small), grid).flatten(1)  # (B, N) raw scores


class DPSEncoder(nn.Module):
    def __init__(self, vit: nn.Module, k: int, scorer_size: float, sigma: float, num_samples: int):
        super().__init__()
        self.vit = vit
        self.k = int(k)
        self.sigma = float(sigma)
        self.num_samples = int(num_samples)
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
            ind = perturbed_topk(scores, self.k, sigma, self.num_samples)  # (B, k, N)
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
        return ce + entropy_weight * ent, {"ce": ce.item(), "entropy": ent.item(), "sigma": out.aux["sigma"]}

    return loss_fn


@register_method("dps")
class DPS(PatchSelectionMethod):
    description = "CNN scorer on a downscaled image + perturbed top-k (Berthet) picks k high-res patches"
    training = "finetune"

    @dataclass(frozen=True)
    class Options:
        scorer_size: float = option(0.25, "<= 1: fraction of the high-res size; > 1: scorer input height in px",
                                    min=0, min_exclusive=True)
        sigma: float = option(0.05, "perturbed top-k noise (official, scores in [0, 1]), decayed linearly to 0",
                              min=0)
        num_samples: int = option(100, "perturbed top-k samples (paper: 500; 100 keeps a CPU step affordable)",
                                  min=1)
        entropy_weight: float = option(-0.01, "official entropy regulariser (negative: rewards spread-out scores)")
        finetune: Stage = option(default_factory=Stage, help="end-to-end training of scorer, backbone and head")

    def build(self, vit: nn.Module) -> nn.Module:
        o = self.opts
        return DPSEncoder(detach_copy(vit), int(self.budget), o.scorer_size, o.sigma, o.num_samples)

    def fit(self, ctx) -> nn.Module:
        model = self.task_model(ctx, trainable=True)
        stage = ctx.stage(self.opts.finetune)
        model.encoder.total_steps = stage.steps
        ctx.train(model, make_dps_loss(self.opts.entropy_weight), f"dps-{int(self.budget)}", stage=stage)
        return model.eval()
