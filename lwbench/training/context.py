"""What a trainable method gets from the runner: the task, the frozen task-trained teacher, and
one training loop with checkpoints, resumption, progress and NaN guards, so no method writes its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwbench.config import Stage, TrainConfig
from lwbench.heads import TaskModel
from lwbench.task import Task

# loss_fn(model, images, targets) -> (scalar loss, {name: float} to show in the progress bar)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class FitContext:
    """Handed to ``Method.fit``.

    Attributes:
        task: the task (its ``dataset``/``loader`` give augmented training data).
        teacher: the task-trained backbone as a frozen ``TaskModel``; ``teacher.encoder.vit`` is the timm ViT,
            ``teacher.head`` its task head. Never modify it: copy what you train.
        defaults: the run's ``train`` section (:class:`~lwbench.config.TrainConfig`), used for a training call
            that names no stage. A method's stages (its ``Stage`` options, e.g. ``self.opts.finetune``) already
            carry these defaults where they leave a value unset.
        device: "cpu" or "cuda".
        work_dir: a folder private to this run id for checkpoints; a rerun of the same config resumes from here.
        shared_dir: a folder shared by every budget of this method on this teacher, for stages that do not
            depend on the budget (LookWhere's distillation): a second run at another k reuses them.
        method_opts: the method's options (to name a stage's settings in error messages).
        regime: ``"off_the_shelf"`` or ``"finetuned"`` (:data:`lwbench.config.REGIMES`): training-free methods
            fine-tune only in the latter (:meth:`lwbench.method.Method.fit`).
        autocast: the run's mixed precision (:mod:`lwbench.precision`), applied to every training step.
        stage_times: seconds each training stage took, filled by :meth:`train` and :meth:`record_stage`
            (a cached stage counts with the time it took when it ran); the row's ``method_train_time_s``.
    """

    task: Task
    teacher: TaskModel
    defaults: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    work_dir: Path = field(default_factory=lambda: Path("."))
    shared_dir: Path = field(default_factory=lambda: Path("."))
    method_opts: Any = None
    seed: int = 0
    quiet: bool = False
    regime: str = "off_the_shelf"
    autocast: str = "none"
    stage_times: dict[str, float] = field(default_factory=dict)

    def train_batches(self, batch_size: int, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of augmented training batches (re-shuffled every epoch), an
        :class:`~lwbench.training.loop.EpochStream` whose position is checkpointed, so a resumed stage
        continues with the batches an uninterrupted one would have drawn."""
        from lwbench.training.loop import EpochStream, endless, pin_memory_for

        if not callable(getattr(self.task, "dataset", None)):  # a task object with a loader only
            return endless(self.task.loader("train", batch_size, train=True, num_workers=workers))
        return EpochStream(self.task.dataset("train", train=True), batch_size, seed=int(getattr(self.task, "seed", 0)),
                           num_workers=workers, pin_memory=pin_memory_for(self.device))

    def stage(self, stage: Stage | TrainConfig | None) -> Stage | TrainConfig:
        """``stage`` with its unset values taken from the run's ``train`` section (``None``: that section)."""
        if stage is None:
            return self.defaults
        return stage.resolved(self.defaults) if isinstance(stage, Stage) else stage

    def stage_key(self, stage: Any) -> str:
        """How the user sets ``stage``'s values: ``method.<name>`` for a method stage, else ``train``."""
        opts = self.method_opts
        if opts is not None and dataclasses.is_dataclass(opts):
            for f in dataclasses.fields(opts):
                value = getattr(opts, f.name)
                if isinstance(value, Stage) and (value is stage or self.stage(value) == stage):
                    return f"method.{f.name}"
        return "train"

    def train(self, model: nn.Module, loss_fn: LossFn, tag: str, stage: Stage | TrainConfig | None = None,
              steps: int | None = None, lr: float | None = None, params: list[nn.Parameter | dict] | None = None,
              batches: Iterator | None = None) -> nn.Module:
        """Train ``params`` (default: all trainable parameters of ``model``) with ``stage``'s settings
        (default: the run's ``train`` section); ``steps``/``lr`` override the stage's (DynamicViT splits its
        stage in two parts).

        Weight decay on weight matrices only, linear warm-up then cosine; checkpoints (safetensors) in
        ``work_dir/tag``; resumes if a checkpoint is there; a NaN loss raises ``TrainingError`` naming the
        setting to lower. Returns ``model`` (trained in place)."""
        from lwbench.training.loop import train_loop, training_time

        s = self.stage(stage)
        lr_key = f"{self.stage_key(s)}.lr"
        overrides = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
        if overrides:  # a part of the stage (DynamicViT's predictor warm-up)
            s = dataclasses.replace(s, **overrides)
        ckpt = self.work_dir / tag
        if batches is None:
            batches = self.train_batches(int(s.batch_size), int(s.workers or 0))
        # A method stage's warm-up equal to the run's is (almost always) inherited: train.* keeps the recipe shared.
        warmup_key = "train.warmup_steps" if s.warmup_steps == self.defaults.warmup_steps else \
            f"{self.stage_key(s)}.warmup_steps"
        train_loop(model, loss_fn, batches, s, params=params, ckpt_dir=ckpt, device=self.device, desc=tag,
                   quiet=self.quiet, lr_key=lr_key, autocast=self.autocast, warmup_key=warmup_key)
        self.stage_times[tag] = training_time(ckpt)
        return model

    def record_stage(self, tag: str, ckpt_dir: Path) -> None:
        """Count a stage loaded from its cache with the time it took when it ran."""
        from lwbench.training.loop import training_time

        self.stage_times[tag] = training_time(ckpt_dir)

    def finetune(self, model: TaskModel, tag: str, loss_fn: LossFn | None = None, **kw) -> TaskModel:
        """Supervised fine-tuning with the task loss (cross-entropy; pixel CE with ignore=255 for segmentation)."""
        from lwbench.training.loop import task_loss

        return self.train(model, loss_fn or task_loss, tag, **kw)
