"""The task-trained backbone ("teacher") every method starts from, trained once per config and cached.

In the ``paper`` profile this is DINOv2 fine-tuned on the task. In the ``quick`` profile no weights
exist, so a small ViT is trained from scratch on the task, which is the expensive stage on a CPU:
a 4-block ViT needs many hundred steps to find a sign a few patches wide. Two things make it
affordable, both configured in the profile and recorded in the teacher's config hash:

* the head pools the patch tokens with a max (``head.pool: max``), so the gradient reaches the
  few tokens that carry the object instead of waiting for CLS attention to find them (``token+max``
  also trains the CLS attention, at some accuracy cost; see the quick profile);
* when the task annotates its objects (``Task.objects``: traffic-sign boxes, billiard balls),
  ``teacher.dense_weight > 0`` adds a per-patch auxiliary loss: each patch whose centre lies in an
  object's box learns that object's class, the others "background" (the two halves weighted
  equally). Only the teacher uses it; it changes no method and no evaluation. With the loss on,
  augmentation is a random shift applied to image and boxes alike;
* ``teacher.attn_weight > 0`` (same annotations) adds an attention loss: the last block's attention
  (``teacher.attn_blocks: all``: every block's, the loss averaged over blocks) over patch keys (heads
  averaged, query rows ``teacher.attn_queries``: the CLS row or the mean of the
  patch rows; :mod:`lwbench.attention`) learns to put its mass on the object cells,
  ``KL(object mask / its sum || softmax(A))``. A teacher trained from scratch on a task has no reason
  to attend to the object (a max-pooled head reads the object's token wherever attention goes): one
  seed's attention covered 8% of the sign cells, another's avoided the signs, and LookWhere, whose
  selector learns *where* from exactly this attention, then looked at road and clutter (chance
  accuracy). The loss makes the quantity LookWhere distils point at the object on every seed. It is
  the shared backbone's recipe, so every method of the task gets the same teacher. EViT, top-k and ATS
  rank tokens by the CLS attention of *earlier* blocks (blocks 1, 2, 3 of the quick 4-block ViT), which a
  last-block loss leaves untrained; ``attn_blocks: all`` gives them the same signal (measured in
  ``benchmarks/teacher_attention.py``, which prints every block's CLS-attention recall).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lwbench.attention import BlockInputs
from lwbench.config import TeacherConfig
from lwbench.training.distributed import mean_over_ranks
from lwbench.training.loop import (
    STATE,
    EpochStream,
    check_weights,
    damaged,
    is_done,
    load_checkpoint,
    pin_memory_for,
    task_loss,
    train_loop,
    training_time,
)
from lwbench.vit import num_prefix

log = logging.getLogger("lwbench")


def cell_targets(objects: list[dict], grid: tuple[int, int], patch: int, shift: tuple[int, int] = (0, 0)
                 ) -> torch.Tensor:
    """``(H*W,)`` long: ``1 + label`` of the object whose box holds the cell centre, ``0`` elsewhere.

    An object's ``read_box``, when the task gives one, replaces its box: the part that shows what the label is
    (a billiard ball's number disc, not its rim). ``shift`` = (dy, dx) pixels the image content moved by (boxes
    move with it)."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * patch
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * patch
    cells = torch.zeros(h, w, dtype=torch.long)
    for obj in objects:
        x0, y0, x1, y1 = obj.get("read_box", obj["box"])
        x0, x1, y0, y1 = x0 + shift[1], x1 + shift[1], y0 + shift[0], y1 + shift[0]
        inside = ((ys[:, None] >= y0) & (ys[:, None] < y1)) & ((xs[None] >= x0) & (xs[None] < x1))
        cells[inside] = 1 + int(obj["label"])
    return cells.flatten()


class ObjectCells(Dataset):
    """A task split as ``(image, {"label": y, "cells": (H*W,) long})`` with a shift applied to both."""

    def __init__(self, task, split: str, patch: int, max_shift: float = 0.04):
        self.task, self.split, self.patch, self.max_shift = task, split, patch, max_shift
        self.base = task.dataset(split, train=False)
        self.grid = (task.img_size[0] // patch, task.img_size[1] // patch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        _, h, w = x.shape
        sy, sx = round(self.max_shift * h), round(self.max_shift * w)
        dy = int(torch.randint(-sy, sy + 1, ()).item()) if sy else 0
        dx = int(torch.randint(-sx, sx + 1, ()).item()) if sx else 0
        padded = F.pad(x[None], (sx, sx, sy, sy), mode="replicate")[0]
        x = padded[:, sy - dy: sy - dy + h, sx - dx: sx - dx + w]  # content moves by (dy, dx)
        cells = cell_targets(self.task.objects(self.split, i), self.grid, self.patch, (dy, dx))
        return x.contiguous(), {"label": y, "cells": cells}


def attention_object_loss(logits: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``KL(m || softmax(logits))`` averaged over the images that have objects, ``m`` = the object cells
    (``cells > 0``) as a uniform distribution; 0 (with a graph) when no image has one."""
    obj = (cells > 0).to(logits.dtype)
    has = obj.sum(1) > 0
    m = obj[has] / obj[has].sum(1, keepdim=True)
    logp = F.log_softmax(logits[has].float(), dim=1)
    per_image = (m * (torch.log(m.clamp_min(1e-12)) - logp)).sum(1)
    mean, n = mean_over_ranks(per_image)  # over every rank's images under torchrun
    return mean if n else logits.sum() * 0


class DenseTrainer(nn.Module):
    """The teacher plus a per-patch auxiliary classifier used only while training it, and the optional
    attention loss (see the module docstring)."""

    def __init__(self, model: nn.Module, num_cell_classes: int, attn_weight: float = 0.0,
                 attn_queries: str = "cls", attn_blocks: str = "last"):
        super().__init__()
        self.model = model
        self.cells = nn.Linear(model.encoder.vit.embed_dim, num_cell_classes)
        self.attn_weight, self.attn_queries = float(attn_weight), attn_queries
        self.attn_blocks = [-1] if attn_blocks == "last" else None  # BlockInputs: None = every block

    def loss(self, images: torch.Tensor, targets: dict, weight: float):
        vit = self.model.encoder.vit
        with BlockInputs(vit, self.attn_blocks if self.attn_weight > 0 else []) as blocks:
            out = self.model.encoder(images)
        task = F.cross_entropy(self.model.head(out), targets["label"])
        cells = targets["cells"]
        stats = {"task": task.detach()}  # loss parts stay on the device: train_loop reads them only for its bar
        loss = task
        if weight > 0:
            per_cell = F.cross_entropy(self.cells(out.patches).flatten(0, 1), cells.flatten(), reduction="none")
            obj = cells.flatten() > 0
            # Means over the whole global batch under torchrun (mean_over_ranks); in one process plain means.
            # (A read-back the loss needs: which cells are objects, and whether any are, decide its formula.)
            background, n_bg = mean_over_ranks(per_cell[~obj])
            objects, n_obj = mean_over_ranks(per_cell[obj])
            dense = background if n_bg else per_cell.sum() * 0
            if n_obj:  # objects and background weigh the same, however small the objects are
                dense = 0.5 * dense + 0.5 * objects
            loss = loss + weight * dense
            stats["dense"] = dense.detach()
        if self.attn_weight > 0:
            per_block = blocks.logits(num_prefix(vit), self.attn_queries).values()
            attn = torch.stack([attention_object_loss(lg, cells) for lg in per_block]).mean()
            loss = loss + self.attn_weight * attn
            stats["attn"] = attn.detach()
        return loss, stats


def object_classes(task) -> int:
    """Classes of ``Task.objects`` labels, 0 when the task (or this source) has no usable annotations."""
    if not callable(getattr(task, "objects", None)):
        return 0
    try:
        if task.objects("train", 0) is None:  # the task annotates no objects
            return 0
    except Exception as exc:  # e.g. real billiards JSON without ball radii
        log.info("notice: %s: no object annotations for the dense teacher loss (%s); training with the task "
                 "loss only", task.name, exc)
        return 0
    return int(getattr(task, "object_classes", task.num_classes))


def train_teacher(model: nn.Module, task, settings: TeacherConfig, ckpt_dir: Path, device: str,
                  quiet: bool) -> nn.Module:
    """Train ``model`` (TaskModel around a timm ViT) on ``task`` per ``settings`` (the run's ``teacher`` section,
    typed and validated: its defaults and ranges live in :class:`lwbench.config.TeacherConfig` alone)."""
    s = settings
    if s.probe_steps > 0:
        # The probe first: in its own folder when the backbone trains after it, else it is the teacher.
        train_probe(model, task, s, ckpt_dir / "probe" if s.steps > 0 else ckpt_dir, device, quiet)
        if s.steps <= 0:
            return model
    weight, attn_weight = s.dense_weight, s.attn_weight
    n_obj = object_classes(task) if weight > 0 or attn_weight > 0 else 0
    common = dict(ckpt_dir=ckpt_dir, device=device, desc=f"teacher {task.name}", quiet=quiet, lr_key="teacher.lr",
                  autocast=s.autocast)
    bs, workers = s.batch_size, s.workers
    # EpochStream, not endless(DataLoader): its position is checkpointed, so a killed teacher resumes exactly
    # (ObjectCells' shifts draw on the global RNG, which train_loop checkpoints, when workers == 0).
    if n_obj:
        trainer = DenseTrainer(model, n_obj + 1, attn_weight, s.attn_queries, s.attn_blocks)
        patch = int(model.encoder.vit.patch_embed.patch_size[0])
        data = EpochStream(ObjectCells(task, "train", patch), bs, seed=task.seed, num_workers=workers,
                           pin_memory=pin_memory_for(device))
        train_loop(trainer, lambda m, x, t: m.loss(x, t, weight), data, s, **common)
    else:
        data = EpochStream(task.dataset("train", train=True), bs, seed=task.seed, num_workers=workers,
                           pin_memory=pin_memory_for(device))
        train_loop(model, task_loss, data, s, **common)
    return model


def train_probe(model: nn.Module, task, s: TeacherConfig, ckpt_dir: Path, device: str, quiet: bool) -> nn.Module:
    """``s.probe_steps`` steps of the task head alone on the frozen backbone (at ``s.probe_lr``, warm-up a tenth).

    Before a pretrained backbone is fine-tuned, this gives the head a sensible start (LP-FT, Kumar et al. 2022): a
    random head's first gradients are what pull pretrained features away. With ``teacher.steps=0`` it is the
    whole teacher: a linear probe."""
    frozen = [p for p in model.encoder.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        data = EpochStream(task.dataset("train", train=True), s.batch_size, seed=task.seed, num_workers=s.workers,
                           pin_memory=pin_memory_for(device))
        probe = dataclasses.replace(s, steps=s.probe_steps, lr=s.probe_lr, warmup_steps=max(1, s.probe_steps // 10))
        train_loop(model, task_loss, data, probe, params=list(model.head.parameters()), ckpt_dir=ckpt_dir,
                   device=device, desc=f"linear probe {task.name}", quiet=quiet, lr_key="teacher.probe_lr",
                   autocast=s.autocast)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return model


def load_teacher(model: nn.Module, ckpt_dir: Path) -> nn.Module:
    """Load a finished teacher checkpoint, written with or without the dense trainer around it."""
    from safetensors import safe_open

    weights = Path(ckpt_dir) / "model.safetensors"
    check_weights(weights)  # a truncated file is one CheckpointError line, not a safetensors traceback
    with safe_open(str(weights), framework="pt") as f:
        shape = f.get_slice("cells.weight").get_shape() if "cells.weight" in f.keys() else None
    state = load_checkpoint(DenseTrainer(model, int(shape[0])) if shape is not None else model, ckpt_dir)
    if state is None:  # no state.json: nothing was loaded, and the weights would stay random
        raise damaged(Path(ckpt_dir) / STATE, "missing: a finished teacher folder holds it beside its weights")
    return model


__all__ = ["cell_targets", "ObjectCells", "DenseTrainer", "attention_object_loss", "train_teacher", "train_probe",
           "load_teacher",
           "is_done", "training_time"]
