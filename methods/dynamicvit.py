"""``dynamicvit``: learned token pruning inside the backbone (Rao et al., NeurIPS 2021). Budget = keep_rate rho.

Before each pruning stage s = 1..S (default: before blocks depth*{1/4, 1/2, 3/4}, i.e. 3/6/9 of 12) a small
MLP predicts keep/drop log-probabilities for every surviving patch token from its own features and a
pooled global feature. Stage s keeps rho^s of the original patch tokens. CLS and registers are never pruned.

Training follows the official code (raoyongming/DynamicViT): hard straight-through Gumbel-softmax keep
decisions, cumulative over stages; dropped tokens are not removed but hidden from attention. The official
model multiplies exp(attention logits) by the keep mask (and lets every token still see itself); here the
same mask is a float ``attn_mask`` for timm's fused attention: ``log(G)`` with ``G = 1`` for kept keys and
``eps`` for dropped ones. Because ``d log(G) / dG = 1 / G``, the gradient reaching the keep decisions is
the official one (to O(eps)), also for dropped tokens, while the forward differs from hard masking by a
weight of about ``eps`` on dropped keys (the official code adds ``eps / N`` for the same reason). Losses as in
``DistillDiffPruningLoss`` with ``mse_token=True``: task CE + 2 * mean_s (mean keep_s - rho^s)^2 + 0.5 * KL(teacher
logits || student logits, T=1, batchmean) + 0.5 * MSE(student vs teacher final patch tokens, over tokens kept
at the last stage). Optimisation as ``main_dynamic_vit.py``: predictors alone first (the backbone's learning
rate is 0 for 5 of 30 epochs), then predictors at the base rate and backbone + head at 0.01x; position
embedding and prefix tokens stay frozen.

The head: the official model reads CLS, so attention is the only way the patches reach the loss and the masked
attention above carries the task gradient to the decisions. lwbench's heads are shared by every method of a task,
and the quick profile's max-pools the patches directly; the training output therefore hands the straight-through
decisions to the head (``TokenOutput.keep``), which pools exactly the kept tokens and passes the loss back to each
decision (:func:`lwbench.heads.pool_patches`). Without that path the keep-ratio loss alone shaped the ranking and
on billiards ranked every ball cell last within four warm-up steps (object recall 0.00, 8.8% top-1).

Inference: at each stage the top ``floor(rho^s * N)`` patch tokens by keep log-probability are gathered
(sorted by position), so later blocks really run on fewer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.config import Stage
from lwbench.errors import ConfigError
from lwbench.method import BackboneSpec, Method, Overhead, detach_copy
from lwbench.options import option
from lwbench.registry import register_method
from lwbench.tokens import TokenOutput
from lwbench.vit import all_positions, assemble, call_block, embed_patches, grid_of, num_prefix, rope_of, to_output

# Weight of a dropped key inside the training attention mask (see the module docstring).
MASK_EPS = 1e-6


class KeepPredictor(Overhead):
    """The official ``PredictorLG``: local + policy-weighted global features -> log p(keep), log p(drop)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, D) patch tokens, ``policy`` (B, N, 1) current keep mask -> (B, N, 2) log-probs."""
        x = self.in_conv(x)
        b, n, c = x.shape
        local = x[:, :, : c // 2]
        glob = (x[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp(min=1e-6)
        x = torch.cat([local, glob.expand(b, n, glob.shape[-1])], dim=-1)
        return self.out_conv(x)


def keep_counts(num_patches: int, keep_rate: float, stages: int) -> list[int]:
    """Patch tokens kept after each stage: ``floor(rho^s * N)``, at least 1, as the official code's
    ``int(N * rho ** s)`` (196 at rho 0.7: 137, 96, 67; ``ceil`` kept one more per stage and moved logits by up
    to 0.018). The 1e-9 keeps an exact product (0.5 * 196) from flooring below itself in floating point."""
    return [max(1, math.floor(num_patches * keep_rate ** (s + 1) + 1e-9)) for s in range(stages)]


def default_prune_locs(depth: int) -> list[int]:
    """Blocks before which to prune: depth * {1/4, 1/2, 3/4} (3/6/9 for 12 blocks), within 1..depth-1."""
    if depth < 2:
        return []
    return sorted({min(depth - 1, max(1, int(depth * f))) for f in (0.25, 0.5, 0.75)})


def attention_bias(policy: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` keep policy (prefix included, straight-through values in {0, 1}) -> ``(B, 1, T, T)`` float mask.

    Entry (i, j) is ``log(G_j)`` with ``G_j = 1`` (kept) or ``MASK_EPS`` (dropped), and 0 on the diagonal so a
    dropped token still attends to itself, as in the official ``softmax_with_policy``."""
    g = policy + (1.0 - policy.detach()) * MASK_EPS  # forward: 1 or eps; d g / d policy = 1
    t = policy.shape[1]
    off_diag = 1.0 - torch.eye(t, dtype=policy.dtype, device=policy.device)
    return torch.log(g)[:, None, None, :] * off_diag


class DynamicViTEncoder(nn.Module):
    def __init__(self, vit: nn.Module, keep_rate: float, prune_locs: list[int]):
        super().__init__()
        self.vit = vit
        self.keep_rate = float(keep_rate)
        self.prune_locs = tuple(int(i) for i in prune_locs)
        self.ratios = [self.keep_rate ** (s + 1) for s in range(len(self.prune_locs))]
        self.predictors = nn.ModuleList(KeepPredictor(int(vit.embed_dim)) for _ in self.prune_locs)

    def forward(self, x: torch.Tensor) -> TokenOutput:
        grid = grid_of(self.vit, x)
        tok = assemble(self.vit, embed_patches(self.vit, x))
        if self.training:
            return self._forward_train(tok, grid)
        return self._forward_infer(tok, grid)

    def _forward_infer(self, tok: torch.Tensor, grid) -> TokenOutput:
        p = num_prefix(self.vit)
        b, n = tok.shape[0], tok.shape[1] - p
        positions = all_positions(b, grid, tok.device)
        counts = keep_counts(n, self.keep_rate, len(self.prune_locs))
        stage = 0
        rope = rope_of(self.vit, grid)  # RoPE backbones: the grid's table, then at the kept tokens' cells
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.prune_locs) and i == self.prune_locs[stage]:
                patches = tok[:, p:]
                if counts[stage] < patches.shape[1]:  # nothing to prune at rho = 1: no predictor, plain model
                    ones = patches.new_ones(b, patches.shape[1], 1)
                    keep_logp = self.predictors[stage](patches, ones)[..., 0]
                    idx = keep_logp.topk(counts[stage], dim=1).indices.sort(dim=1).values
                    patches = torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
                    positions = torch.gather(positions, 1, idx)
                    tok = torch.cat([tok[:, :p], patches], dim=1)
                    rope = rope_of(self.vit, grid, positions)
                stage += 1
            tok = call_block(blk, tok, rope)
        return to_output(self.vit, tok, positions, grid)

    def _forward_train(self, tok: torch.Tensor, grid) -> TokenOutput:
        p = num_prefix(self.vit)
        b, n = tok.shape[0], tok.shape[1] - p
        prev = tok.new_ones(b, n, 1)  # cumulative keep decision of every patch token
        prefix_keep = tok.new_ones(b, p)
        decisions: list[torch.Tensor] = []
        bias = None
        stage = 0
        rope = rope_of(self.vit, grid)  # every token stays (masked, not removed): the grid's own RoPE
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.prune_locs) and i == self.prune_locs[stage]:
                logp = self.predictors[stage](tok[:, p:], prev)
                hard = F.gumbel_softmax(logp, hard=True)[..., 0:1] * prev
                decisions.append(hard.squeeze(-1))
                prev = hard
                bias = attention_bias(torch.cat([prefix_keep, hard.squeeze(-1)], dim=1)).to(tok.dtype)
                stage += 1
            tok = call_block(blk, tok, rope, bias)
        keep = prev.squeeze(-1)
        # ``keep`` with its gradient: a head that pools the patches passes the task loss on to the decisions
        # (lwbench.heads.pool_patches), as attention does for the official CLS head.
        return to_output(self.vit, tok, all_positions(b, grid, tok.device), grid, keep=keep,
                         aux={"decisions": decisions, "keep": keep.detach(), "ratios": self.ratios})


def task_logits(model: nn.Module, out: TokenOutput, images: torch.Tensor) -> torch.Tensor:
    """The model's head on ``out``, as ``TaskModel.forward`` calls it."""
    return model.head(out, size=images.shape[-2:])


def task_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.ndim > 1:
        return F.cross_entropy(logits, targets, ignore_index=255)
    return F.cross_entropy(logits, targets)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over classes (dim 1), T = 1, averaged over samples (and pixels)."""
    kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="sum", log_target=True)
    return kl / (student.numel() / student.shape[1])


def dynamicvit_loss(teacher: nn.Module, ratio_weight: float = 2.0, distill_weight: float = 0.5):
    """The official ``DistillDiffPruningLoss`` (clf_weight 1, mse_token=True) as an lwbench ``loss_fn``."""

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        out = model.encoder(images)
        logits = task_logits(model, out, images)
        with torch.no_grad():
            t_out = teacher.encoder(images)
            t_logits = task_logits(teacher, t_out, images)
        ce = task_ce(logits, targets)
        decisions, ratios = out.aux["decisions"], out.aux["ratios"]
        ratio = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, ratios, strict=True))
        ratio = ratio / max(1, len(ratios))
        kl = logit_kl(logits, t_logits)
        kept = out.aux["keep"] > 0.5
        sq = (out.patches - t_out.patches) ** 2
        if images.device.type != "cpu":
            # The same mean over the kept tokens without reading the mask back (``bool(any)`` and boolean
            # indexing each wait for the GPU): a masked sum over the count (0 when none is kept); it sums in
            # another order than the CPU's, so the CPU keeps the form its reference runs were trained with
            tok = (sq * kept.unsqueeze(-1).to(sq.dtype)).sum() / (kept.sum() * sq.shape[-1]).clamp(min=1)
        elif bool(kept.any()):
            tok = sq[kept].mean()
        else:
            tok = out.patches.sum() * 0.0
        loss = ce + ratio_weight * ratio + distill_weight * kl + distill_weight * tok
        keep_frac = out.aux["keep"].mean() if decisions else 1.0
        logs = {"ce": ce, "ratio": ratio, "kl": kl, "tok": tok, "keep": keep_frac}
        # Loss parts stay on the device: train_loop reads them only for its progress bar.
        return loss, {k: v.detach() if torch.is_tensor(v) else float(v) for k, v in logs.items()}

    return loss_fn


def parse_locs(value: Any) -> list[int] | None:
    if value is None or value == "" or value == "auto":
        return None
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConfigError(f"dynamicvit: prune_locs '{value}' must be block indices like 3,6,9") from None
    if isinstance(value, (int, float)):
        return [int(value)]
    return [int(v) for v in value]


@register_method("dynamicvit")
class DynamicViT(Method):
    description = "learned MLP predictors prune patch tokens at 3 stages (keep rho, rho^2, rho^3); Gumbel training"
    style = ("#9467bd", "P")
    # 2: floor(N rho^s) tokens kept per stage, as the official code (1 kept ceil). 3: the training output carries
    # the straight-through keep decisions to pooling heads (TokenOutput.keep); before, a max-pooled head read the kept
    # patches with a detached mask and the billiards predictors learned to drop every ball (8.8%, recall 0.00).
    version = 3
    kind = "reduction"
    budget_key = "keep_rate"
    budget_type = float
    default_budgets = (0.5, 0.7, 0.9)
    training = "finetune"

    @dataclass(frozen=True)
    class Options:
        prune_locs: str | list[int] | None = option(None, "blocks before which predictors prune, e.g. 3,6,9 "
                                                          "(null: depth x 1/4, 1/2, 3/4)")
        ratio_weight: float = option(2.0, "keep-ratio loss weight (official --ratiow)", min=0)
        distill_weight: float = option(0.5, "distillation loss weight (official --distillw)", min=0)
        backbone_lr_mult: float = option(0.01, "backbone learning rate / predictors' (official: 0.01)", min=0)
        predictor_warmup: float = option(5 / 30, "fraction of steps training the predictors alone (official: 5 "
                                                 "of 30 epochs)", min=0, max=0.999)
        finetune: Stage = option(default_factory=Stage, help="predictor warm-up then joint training")

    @classmethod
    def noop_budget(cls, spec: BackboneSpec) -> float | None:
        return 1.0  # keep rho^s = 1 at every stage: the predictors are never called

    def prune_locs(self) -> list[int]:
        locs = parse_locs(self.opts.prune_locs)
        return default_prune_locs(self.spec.depth) if locs is None else locs

    def check_budget(self) -> None:
        self._require(0.0 < self.budget <= 1.0, "keep_rate in (0, 1], e.g. 0.5, 0.7, 0.9")
        locs = self.prune_locs()
        depth = self.spec.depth
        if not locs or any(not 1 <= i <= depth - 1 for i in locs) or sorted(set(locs)) != locs:
            raise ConfigError(f"dynamicvit: prune_locs {locs} must be increasing block indices in 1..{depth - 1} "
                              f"for {self.spec.name} ({depth} blocks), e.g. {default_prune_locs(depth)}")

    def keep_counts(self) -> list[int]:
        return keep_counts(self.spec.num_patches, float(self.budget), len(self.prune_locs()))

    def build(self, vit: nn.Module) -> nn.Module:
        return DynamicViTEncoder(detach_copy(vit), float(self.budget), self.prune_locs())

    def fit(self, ctx) -> nn.Module:
        model = self.task_model(ctx, trainable=True)
        stage = ctx.stage(self.opts.finetune)
        steps = stage.steps
        warm = int(round(steps * self.opts.predictor_warmup))
        loss_fn = dynamicvit_loss(ctx.teacher, self.opts.ratio_weight, self.opts.distill_weight)
        tag = f"dynamicvit-{float(self.budget):g}"
        enc = model.encoder
        predictor_params = list(enc.predictors.parameters())
        pred_ids = {id(q) for q in predictor_params}
        for t in (enc.vit.pos_embed, enc.vit.cls_token, enc.vit.reg_token):  # frozen in the official recipe
            if t is not None:
                t.requires_grad_(False)
        base = [q for q in model.parameters() if id(q) not in pred_ids and q.requires_grad]

        if warm > 0:  # predictors alone; gradients still flow through the (frozen) backbone's activations
            flags = [q.requires_grad for q in base]
            for q in base:
                q.requires_grad_(False)
            try:
                ctx.train(model, loss_fn, f"{tag}-predictors", stage=stage, steps=warm, params=predictor_params)
            finally:
                for q, f in zip(base, flags, strict=True):
                    q.requires_grad_(f)
        if steps - warm > 0:
            groups = [{"params": predictor_params},
                      {"params": base, "lr_mult": self.opts.backbone_lr_mult}]
            ctx.train(model, loss_fn, tag, stage=stage, steps=steps - warm, params=groups)
        return model.eval()
