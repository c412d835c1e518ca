"""What a trainable method gets from the runner: the task, the frozen task-trained teacher, and
one training loop with checkpoints, resumption, progress and NaN guards, so no method writes its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
        settings: the profile's training settings for this task (steps, batch_size, lr, weight_decay,
            warmup_steps, ...); see configs/profiles/*.yaml, key ``finetune`` (and method-specific keys).
        device: "cpu" or "cuda".
        work_dir: a folder private to this (method, budget, task, source, backbone, profile, seed) config for
            checkpoints; a rerun of the same config resumes from here.
        shared_dir: a folder shared by every budget of this method on this teacher, for stages that do not
            depend on the budget (LookWhere's distillation): a second run at another k reuses them.
        method_settings: the profile's ``methods.<name>`` block (method-specific training settings, e.g.
            distillation steps); empty if the profile has none.
    """

    task: Task
    teacher: TaskModel
    settings: dict[str, Any]
    device: str = "cpu"
    work_dir: Path = field(default_factory=lambda: Path("."))
    shared_dir: Path = field(default_factory=lambda: Path("."))
    method_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    quiet: bool = False

    def setting(self, key: str) -> Any:
        """``key`` from the method's own settings (``methods.<name>``) if given there, else from ``settings``."""
        return self.method_settings.get(key, self.settings[key])

    def train_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of augmented training batches (re-shuffled every epoch)."""
        from lwbench.training.loop import endless

        bs = int(batch_size or self.settings["batch_size"])
        return endless(self.task.loader("train", bs, train=True, num_workers=int(self.settings.get("workers", 0))))

    def train(self, model: nn.Module, loss_fn: LossFn, tag: str, steps: int | None = None, lr: float | None = None,
              params: list[nn.Parameter | dict] | None = None, batch_size: int | None = None,
              batches: Iterator | None = None) -> nn.Module:
        """Train ``params`` (default: all trainable parameters of ``model``) for ``steps`` AdamW steps.

        Weight decay on weight matrices only, linear warm-up then cosine; checkpoints (safetensors) in
        ``work_dir/tag`` every few steps and at the end; resumes if a checkpoint is there; a NaN loss raises
        ``TrainingError`` and leaves the last good checkpoint. Returns ``model`` (trained in place)."""
        from lwbench.training.loop import train_loop

        s = self.settings
        return train_loop(
            model, loss_fn,
            batches=batches if batches is not None else self.train_batches(batch_size),
            steps=int(steps if steps is not None else s["steps"]),
            lr=float(lr if lr is not None else s["lr"]),
            weight_decay=float(s.get("weight_decay", 0.05)),
            warmup_steps=int(s.get("warmup_steps", 0)),
            params=params, ckpt_dir=self.work_dir / tag, device=self.device, desc=tag, quiet=self.quiet,
            grad_clip=s.get("grad_clip"),
        )

    def finetune(self, model: TaskModel, tag: str, loss_fn: LossFn | None = None, **kw) -> TaskModel:
        """Supervised fine-tuning with the task loss (cross-entropy; pixel CE with ignore=255 for segmentation)."""
        from lwbench.training.loop import task_loss

        return self.train(model, loss_fn or task_loss, tag, **kw)
