"""``lookwhere``: a low-res selector picks the top-k high-res patches; a full-depth extractor sees only
those. Both distilled from the frozen task-trained teacher, then fine-tuned at k. Budget = k.

Stages of :meth:`LookWhere.fit`:

1. **What-where distillation** (budget-independent, cached in ``ctx.shared_dir``, resumable): the
   student starts as the teacher (extractor = teacher; selector = its first ``selector_depth`` blocks
   with embeddings, tokens and final norm at ``selector_size`` px; where-head random) and learns the
   teacher's CLS, its dense patch features and its last-layer attention (``distill.py``), with k
   drawn per step in ``[distill_min_k, distill_max_k]``. Skipped when ``weights`` gives a released or
   lwbench-pretrained checkpoint.
2. **Fine-tuning at k**: selector frozen (the paper does not fine-tune it); extractor + task head
   trained with the task loss. The head starts from the teacher's task head: the extractor was just
   distilled to reproduce the teacher's CLS and patch features, so the teacher's head already reads
   them and the model starts near the teacher's accuracy instead of at chance; a random head would
   spend the short CPU budget relearning the head and would push large, noisy gradients into the
   freshly distilled extractor during the first steps.

The two stages are the typed options ``distill`` and ``finetune`` (``--set method.distill.steps=400``);
what they leave unset comes from the run's ``train`` section.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lwbench.backbones import check_img_size
from lwbench.config import ATTN_QUERIES, Stage
from lwbench.errors import CheckpointError, ConfigError
from lwbench.method import PatchSelectionMethod
from lwbench.options import option, to_dict
from lwbench.registry import register_method

from .model import LookWhereEncoder, build_encoder

log = logging.getLogger("lwbench")

PAPER_SELECTOR_GRID = 11  # paper: a 154 px selector (11 x 11 patches of 14) at every high-res size
PAPER_SELECTOR_DEPTH = 3  # of 12 teacher blocks
PAPER_K_FRACTION = 128 / 1369  # paper: k=128 of the 37x37 grid at 518 px


def parse_size(value: Any, img_size: tuple[int, int], patch: int) -> tuple[int, int] | None:
    """``None``/``"auto"`` -> None; ``154`` -> (154, 154); ``"112x154"`` or ``[112, 154]`` -> (112, 154);
    a fraction ``0 < f < 1`` -> ``f`` x the high-res ``img_size`` per axis, rounded to a multiple of
    ``patch``: one setting that keeps the selector's share across task sizes."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "", "none")):
        return None
    bad = ConfigError(f"lookwhere: selector_size '{value}' must be pixels like 154 or 112x154, a fraction of "
                      "the high-res size like 0.3, or auto")
    try:
        if isinstance(value, (list, tuple)):
            h, w = value
        elif isinstance(value, str) and "x" in value.lower():
            h, w = value.lower().split("x")
        else:
            frac = float(value)
            if 0 < frac < 1:
                return tuple(patch * max(1, round(frac * s / patch)) for s in img_size)  # type: ignore[return-value]
            h = w = value
        if float(h) != int(float(h)) or float(w) != int(float(w)):
            raise bad
        return int(float(h)), int(float(w))
    except (TypeError, ValueError):
        raise bad from None


def default_selector_size(img_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """The paper's selector: 11 patches on the short side at any high-res size (154 px at patch 14, both for
    518 px and for 224 px ImageNet, where Table 1's 14.8 GMACs at k=128 counts it), the long side in
    proportion, never more patches than the high-res grid. Small CPU grids set their own size in the
    profile (the quick profile does), since 11 patches would be most of their grid."""
    grid = [s // patch for s in img_size]
    short = min(grid)
    return tuple(patch * max(1, min(g, round(PAPER_SELECTOR_GRID * g / short))) for g in grid)  # type: ignore[return-value]


@register_method("lookwhere")
class LookWhere(PatchSelectionMethod):
    description = "low-res selector picks top-k high-res patches for a distilled extractor (flagship)"
    style = ("#1f77b4", "o")
    grid_fractions = (1 / 16, PAPER_K_FRACTION, 1 / 4)
    training = "pretrain+finetune"
    dense_output = True
    families = ("vit", "eva")
    families_note = "the selector hands the extractor its class token and distillation matches the teacher's"
    noop_note = ("even at k = all patches the extractor's CLS and register tokens are the selector's (its low-res, "
                 "truncated copy of the backbone, final-normed), by design; only the extractor, given the backbone's "
                 "own prefix tokens, is the backbone")

    @dataclass(frozen=True)
    class Options:
        selector_depth: int | None = option(None, "selector blocks (null: the paper's 3 of 12, scaled to the "
                                                  "teacher's depth)", min=1)
        selector_size: int | float | str | list[int] | None = option(
            None, "selector input: px (154), HxW (112x154), a fraction of the high-res size (0.3), or null: the "
                  "paper's 11-patch grid (the checkpoint's own size with weights)")
        distill_min_k: int = option(16, "smallest k drawn per distillation step", min=1)
        distill_max_k: int = option(128, "largest k drawn per distillation step", min=1)
        attn_queries: str = option("auto", "query rows averaged for the teacher's attention (where) target; auto: "
                                   "the patch rows (the paper) on a teacher with registers, the CLS row without "
                                   "(there the patch-query map lights up background and artifact tokens)",
                                   choices=("auto", *ATTN_QUERIES))
        selector_antialias: bool = option(True, "antialias the selector's downsizing of the image and of its map, "
                                                "as the JAX pretraining; false: the released PyTorch inference")
        weights: str | None = option(None, "official lookwhere_*.pt or an `lwbench pretrain lookwhere` folder: "
                                           "skips distillation; enters the run id by content")
        distill: Stage = option(default_factory=Stage, help="what-where distillation (budget-independent, shared)")
        finetune: Stage = option(default_factory=Stage, help="fine-tuning at k (selector frozen)")

    @classmethod
    def budget_grid(cls, spec) -> list[int]:
        """About 1/16, the paper's 128/1369 (~1/11) and 1/4 of the patches; at 518 px: 86, 128, 342.
        Tiny grids still get three distinct budgets when possible."""
        n = spec.num_patches
        grid = super().budget_grid(spec)
        for extra in range(1, n + 1):
            if len(grid) >= 3:
                break
            if extra not in grid:
                grid = sorted({*grid, extra})
        return grid

    @classmethod
    def default_budget(cls, spec) -> int:
        """The paper's fraction of the grid: k=128 at 518 px with patch 14."""
        return max(1, round(spec.num_patches * PAPER_K_FRACTION))

    # -- validation (before any work) ---------------------------------------------------------------
    def check_budget(self) -> None:
        super().check_budget()
        o = self.opts
        depth = self.selector_depth()
        if not isinstance(depth, int) or not 1 <= depth <= self.spec.depth:
            raise ConfigError(f"lookwhere: selector_depth={depth} must be 1..{self.spec.depth} "
                              f"(the blocks of {self.spec.name})")
        size = self.explicit_selector_size()
        if size is not None:
            check_img_size(size, self.spec.patch, what="lookwhere selector size")
        lo, hi = o.distill_min_k, o.distill_max_k
        if not lo <= hi:
            raise ConfigError(f"lookwhere: need distill_min_k <= distill_max_k, got {lo} and {hi}")
        if o.weights is not None and not Path(str(o.weights)).exists():
            raise CheckpointError(f"lookwhere: weights file not found: {o.weights}")

    def selector_depth(self) -> int:
        """Paper: 3 of 12 blocks. Auto keeps that fraction (12 -> 3, 6 -> 2, 4 -> 1) so the selector stays a
        small part of the cost on the quick profile's shallow teachers."""
        d = self.opts.selector_depth
        return max(1, round(self.spec.depth * PAPER_SELECTOR_DEPTH / 12)) if d is None else d

    def explicit_selector_size(self) -> tuple[int, int] | None:
        """The ``selector_size`` option in pixels, or None for auto."""
        return parse_size(self.opts.selector_size, self.spec.img_size, self.spec.patch)

    def selector_size(self) -> tuple[int, int]:
        return self.explicit_selector_size() or default_selector_size(self.spec.img_size, self.spec.patch)

    def resolved_options(self) -> dict[str, Any]:
        """What ``auto`` became (selector size and depth), and the weights by content, not path."""
        from lwbench.backbones import file_sha256

        opts = to_dict(self.opts)
        h, w = self.selector_size()
        opts.update(selector_size=f"{h}x{w}", selector_depth=self.selector_depth(), attn_queries=self.queries())
        if self.opts.weights is not None:
            opts["weights"] = f"sha256:{file_sha256(self.opts.weights)}"
        return opts

    def queries(self) -> str:
        """The where-target's query rows: ``attn_queries``, with ``auto`` resolved per teacher (the paper's patch
        rows with registers, the CLS row without; real DINOv2-S/14 without registers: the patch-query map is on
        background and artifact tokens, the CLS map on the object)."""
        q = self.opts.attn_queries
        if q != "auto":
            return q
        return "patch" if self.spec.num_prefix > 1 else "cls"

    # -- models ---------------------------------------------------------------------------------------
    def build(self, vit) -> LookWhereEncoder:
        """Untrained LookWhere on ``vit`` (random where-head): for FLOP counting and as the distillation start."""
        enc = build_encoder(vit, int(self.budget), self.selector_depth(), self.selector_size(), self.spec.img_size)
        enc.selector.antialias = self.opts.selector_antialias
        return enc

    def distill_tag(self, stage: Stage | None = None) -> str:
        """The shared distillation folder's name: everything the distilled weights depend on, the stage's
        training settings included (as a short hash), so two settings never reuse each other's result."""
        from lwbench.schema import config_hash

        (h, w), o = self.selector_size(), self.opts
        key = config_hash(to_dict(stage if stage is not None else o.distill))[:8]
        aa = "-aa" if o.selector_antialias else ""  # folders without it predate the option: not antialiased
        return (f"distill-d{self.selector_depth()}-s{h}x{w}-k{o.distill_min_k}-{o.distill_max_k}-{self.queries()}"
                f"{aa}-{key}")

    def meta(self, encoder: LookWhereEncoder) -> dict[str, Any]:
        return {"teacher": self.spec.name, "img_size": list(self.spec.img_size),
                "selector_depth": encoder.selector.depth, "selector_size": list(encoder.selector.low_size),
                "r": list(encoder.selector.r), "distill_min_k": self.opts.distill_min_k,
                "distill_max_k": self.opts.distill_max_k, "attn_queries": self.queries()}

    def fit(self, ctx) -> torch.nn.Module:
        from lwbench.heads import TaskModel

        teacher = ctx.teacher.encoder.vit
        if self.opts.weights is not None:
            from .checkpoint import load_weights

            encoder = load_weights(self.opts.weights, teacher, self.spec.img_size, int(self.budget),
                                   selector_size=self.explicit_selector_size())
            encoder.selector.antialias = self.opts.selector_antialias  # false: the release's own inference
        else:
            if self.opts.attn_queries == "auto" and self.queries() == "cls":
                log.info("notice: lookwhere: the teacher has no register tokens; its where-target is the CLS "
                         "attention row (attn_queries auto -> cls), not the paper's patch rows, which light up "
                         "background and artifact tokens without registers")
            self.check_where_target(ctx)
            with torch.random.fork_rng():
                torch.manual_seed(ctx.seed)  # the where-head init is the only random part
                encoder = self.build(teacher)
            self.distill(ctx, encoder)
        encoder.set_trainable(selector=False, extractor=True)
        model = TaskModel(encoder, copy.deepcopy(ctx.teacher.head))
        for p in model.head.parameters():
            p.requires_grad_(True)
        ctx.finetune(model, tag="finetune", stage=self.opts.finetune)
        return model

    def check_where_target(self, ctx) -> None:
        """The guard: the where-target's object recall at this k on a held batch (validation images), against
        a random choice of k cells. When it is not clearly above chance the selector would be distilled to
        miss the objects: say so now, and record it in the row (``selection_warning``)."""
        from lwbench.diagnostics import selection_warning, where_target_recall

        found = where_target_recall(ctx.teacher.encoder.vit, ctx.task, int(self.budget), self.queries(),
                                    device=ctx.device)
        warning = selection_warning(found["where_target_recall"], found["where_target_chance"])
        self.diagnostics.update(found, selection_warning=warning)
        if warning:
            log.warning("lookwhere: %s", warning)

    def distill(self, ctx, encoder: LookWhereEncoder) -> LookWhereEncoder:
        """Stage 1 in ``ctx.shared_dir/<tag>``; reused by every k (skipped when already done)."""
        from lwbench.training.loop import is_finished, load_checkpoint

        from .checkpoint import write_meta
        from .distill import DistillStudent, WhatWhereLoss

        stage = ctx.stage(self.opts.distill)
        tag = self.distill_tag(stage)
        if ctx.autocast != "none":
            tag += f"-{ctx.autocast}"  # shared by every k: a float32 and a bfloat16 distillation never mix
        ckpt = Path(ctx.shared_dir) / tag
        if is_finished(ckpt, stage.steps):
            load_checkpoint(encoder, ckpt)
            ctx.record_stage(tag, ckpt)  # a cached stage counts with the time it took when it ran
            return encoder
        teacher = ctx.teacher.encoder.vit
        encoder.set_trainable(selector=True, extractor=True)
        o = self.opts
        loss = WhatWhereLoss(teacher, DistillStudent(encoder), o.distill_min_k, o.distill_max_k,
                             queries=self.queries(), seed=ctx.seed)
        dctx = dataclasses.replace(ctx, work_dir=Path(ctx.shared_dir))
        write_meta(ckpt, self.meta(encoder))  # makes the folder loadable with --set method.weights=<folder>
        dctx.train(encoder, loss, tag, stage=stage)
        return encoder
