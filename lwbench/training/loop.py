"""The one training loop: AdamW, warm-up + cosine, checkpoints you can resume, progress, NaN guard.

Every trainable thing in lwbench (the quick profile's task-trained teacher, fine-tuning, LookWhere's
distillation, DynamicViT, DPS, IPS) goes through :func:`train_loop`, so resumption and failure
behaviour are the same everywhere:

* a checkpoint (safetensors weights, optimizer state, RNG and data-stream position) is written
  atomically every ``ckpt_every_s`` seconds and at the end; a rerun with the same ``ckpt_dir``
  continues from it, and with an :class:`EpochStream` and ``num_workers=0`` a killed-and-resumed
  run ends with exactly the weights of an uninterrupted one, also under torchrun resumed with the same
  number of processes (every rank's RNG and loss state are saved, at a step rank 0 chooses for all);
* one process at a time trains a stage folder (:func:`lwbench.locks.stage_lock`): a second one
  waits, then reuses the finished result;
* a NaN loss stops with one clear line and leaves the last good checkpoint in place;
* a damaged checkpoint (a truncated file after a full disk or a crash) is one line naming the file
  and ``lwbench cache drop``, not a traceback.

Checkpoint folder: ``model.safetensors``, ``state.json`` (step, elapsed_s; written last, so it always
describes complete files), while training also ``optim.pt`` and ``resume.pt`` (RNG states, stream
position, the loss function's own state; under torchrun every rank's), and ``done.json`` once finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from lwbench.errors import CheckpointError, TrainingError
from lwbench.locks import stage_lock
from lwbench.paths import temp_beside, write_text_atomic
from lwbench.training.distributed import (
    agree,
    any_rank,
    average_gradients,
    barrier,
    gather,
    is_main,
    rank,
    shard,
    world_size,
)

if TYPE_CHECKING:
    from lwbench.config import Stage, TrainConfig

DONE = "done.json"
STATE = "state.json"
WEIGHTS = "model.safetensors"
OPTIM = "optim.pt"
RESUME = "resume.pt"
ESTIMATE_AFTER = 3  # steps timed after the first (setup, first allocations) before the stage says how long it takes

log = logging.getLogger("lwbench")


def endless(loader: Iterable) -> Iterator:
    """Cycle a DataLoader forever (re-shuffling every epoch). Its position cannot be saved: training
    resumed from it restarts the data order; use :class:`EpochStream` where resumption must be exact."""
    while True:
        yield from loader


def pin_memory_for(device: str | torch.device) -> bool:
    """Whether batches bound for ``device`` are built in page-locked memory: on CUDA, and only there, a copy from it
    is asynchronous (:func:`to_device`'s ``non_blocking``), so a batch's copy overlaps the GPU's work."""
    return torch.device(device).type == "cuda"


def to_device(obj, device: str):
    """Tensors, and dicts/lists of them (dense targets), onto ``device`` (asynchronous from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def task_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
    """Cross-entropy; for label maps (segmentation) per pixel with ignore index 255."""
    logits = model(images)
    loss = F.cross_entropy(logits, targets, ignore_index=255) if targets.ndim > 1 else F.cross_entropy(logits, targets)
    return loss, {}


def param_groups(params: Iterable[nn.Parameter | dict], weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only (not biases, norms, tokens' scales), as timm and LookWhere do.

    Items may also be groups ``{"params": [...], "lr_mult": m}`` whose learning rate is ``m`` times the
    schedule's (DynamicViT trains its backbone at 0.01x the rate of its predictors)."""
    items = list(params)
    plain = [p for p in items if not isinstance(p, dict)]
    groups = [g for g in items if isinstance(g, dict)]
    out = []
    for group in ([{"params": plain}] if plain or not groups else []) + groups:
        decay, no_decay = [], []
        for p in group["params"]:
            if p.requires_grad:
                (decay if p.ndim >= 2 and p.shape[0] > 1 else no_decay).append(p)
        mult = float(group.get("lr_mult", 1.0))
        out += [{"params": decay, "weight_decay": weight_decay, "lr_mult": mult},
                {"params": no_decay, "weight_decay": 0.0, "lr_mult": mult}]
    return out


def lr_at(step: int, steps: int, base_lr: float, warmup: int, min_ratio: float = 0.01) -> float:
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class EpochStream:
    """Endless shuffled batches of ``dataset`` whose position can be saved and restored.

    Why not ``endless(DataLoader(shuffle=True))``: its order comes from a generator that a restarted
    process cannot fast-forward, so a resumed run sees other batches than an uninterrupted one. Here the
    order of epoch ``e`` is a permutation drawn from its own generator, seeded ``seed * 1000003 + e``
    (never from the global RNG, which augmentation and dropout use), so ``(epoch, batch)`` is the whole
    position: :meth:`state_dict` / :meth:`load_state_dict` save and restore it, :meth:`skip_to` puts the
    stream where ``step`` batches have been drawn from the start.

    With ``num_workers=0`` (batches built in this process) random augmentation draws from the global RNG,
    which :func:`train_loop` checkpoints, so resumption is exact. With workers the order is still exact but
    each worker's augmentation RNG restarts with the resumed process.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch.
        seed: the data-order seed (the task's seed).
        collate_fn: as for ``DataLoader`` (default: ``default_collate``).
        num_workers: ``DataLoader`` workers (persistent across epochs).
        pin_memory: batches in page-locked memory (:func:`pin_memory_for` the training device: CUDA only).
        drop_last: drop the last partial batch of each epoch, unless the dataset has fewer items than one
            batch (then the one partial batch is the epoch), as ``Task.loader`` does.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, collate_fn: Callable | None = None,
                 num_workers: int = 0, drop_last: bool = True, pin_memory: bool = False):
        from torch.utils.data import DataLoader

        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        n = len(dataset)
        if n == 0:
            raise TrainingError("the training set is empty: nothing to draw batches from")
        full = n // self.batch_size
        self.batches_per_epoch = full if drop_last and full > 0 else math.ceil(n / self.batch_size)
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None
        # One loader whose batch sampler reads this stream's position each time an epoch starts; its own
        # generator (worker seeds) keeps it from drawing on the global RNG.
        self._loader = DataLoader(dataset, batch_sampler=_Positions(self), collate_fn=collate_fn,
                                  num_workers=int(num_workers), persistent_workers=int(num_workers) > 0,
                                  generator=torch.Generator().manual_seed(self.seed), pin_memory=bool(pin_memory))

    def order(self, epoch: int) -> list[int]:
        """The item order of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + int(epoch))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if self.batch >= self.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                self._it = iter(self._loader)
            try:
                out = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.batch += 1
            return out

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: the epoch being drawn and how many of its batches were yielded."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._it = None

    def skip_to(self, step: int) -> None:
        """Continue as if ``step`` batches had been drawn from the start."""
        epoch, batch = divmod(int(step), self.batches_per_epoch)
        self.load_state_dict({"epoch": epoch, "batch": batch})


class _Positions:
    """Batch sampler of an :class:`EpochStream`: the index batches left in its current epoch."""

    def __init__(self, stream: EpochStream):
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        s = self.stream
        order, bs = s.order(s.epoch), s.batch_size
        for b in range(s.batch, s.batches_per_epoch):
            yield order[b * bs:(b + 1) * bs]

    def __len__(self) -> int:
        return self.stream.batches_per_epoch


def is_done(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DONE).is_file()


def damaged(file: Path, why: str) -> CheckpointError:
    """The one-line error for an unreadable checkpoint file, saying how to drop the stage folder."""
    folder = Path(file).parent
    return CheckpointError(f"checkpoint file {file} is damaged ({why}); {_drop_hint(folder)}")


def _drop_hint(folder: Path) -> str:
    from lwbench.paths import cache_dir

    try:
        Path(folder).resolve().relative_to(cache_dir().resolve())
    except ValueError:  # e.g. a pretrain --out folder of the user's
        return f"delete the folder {folder} to train this stage again"
    return f"remove it with: lwbench cache drop {folder}"


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(file, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise damaged(file, "not a JSON object")
    return data


def check_weights(file: Path) -> None:
    """Raise :func:`damaged` unless ``file`` is a complete safetensors file (header readable, every tensor's
    bytes present). Reads the header only."""
    file = Path(file)
    if not file.is_file():
        raise damaged(file, "missing")
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise damaged(file, f"unreadable safetensors header: {exc}") from None
    if 8 + n + end > size:
        raise damaged(file, f"truncated: {size} bytes, the header describes {8 + n + end}")


def load_checkpoint(model: nn.Module, ckpt_dir: Path) -> dict | None:
    """Load the last checkpoint of ``ckpt_dir`` into ``model``; returns its state (step, ...) or None.

    Raises ``CheckpointError`` (one line) when a file is damaged or the weights do not fit ``model``."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / STATE
    if not state_file.is_file():
        return None
    state = _read_json(state_file)
    if not isinstance(state.get("step"), int):
        raise damaged(state_file, "no integer 'step'")
    weights = ckpt_dir / WEIGHTS
    check_weights(weights)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise damaged(weights, str(exc).splitlines()[0]) from None
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "size mismatch")
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the model ({first}); "
                              f"{_drop_hint(ckpt_dir)}") from None
    except Exception as exc:  # safetensors' own errors
        raise damaged(weights, f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the model (missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}); {_drop_hint(ckpt_dir)}")
    return state


def _torch_load(file: Path, device: str = "cpu"):
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error
        raise damaged(file, f"{type(exc).__name__}: {exc}".splitlines()[0]) from None


def is_main_process() -> bool:
    """False on DDP ranks other than 0: only rank 0 writes checkpoints (all ranks read them to resume)."""
    return is_main()


def _atomic_checkpoint(model: nn.Module, opt: torch.optim.Optimizer | None, state: dict, ckpt_dir: Path,
                       resume: dict | None = None) -> None:
    """Write weights, optimizer and resume state under unique temporary names, then ``os.replace`` them
    into place, weights first and ``state.json`` last: a ``state.json`` always describes complete files.
    Temporary files are removed if anything fails."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []

    def temp(name: str) -> Path:
        tmp = temp_beside(ckpt_dir, name)
        written.append((tmp, name))
        return tmp

    try:
        save_model(model, str(temp(WEIGHTS)))
        if opt is not None:
            torch.save(opt.state_dict(), temp(OPTIM))
        if resume is not None:
            torch.save(resume, temp(RESUME))
        temp(STATE).write_text(json.dumps(state))
        for tmp, name in written:
            os.replace(tmp, ckpt_dir / name)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)


def _rank_state(loss_fn: Callable, batches: Iterator) -> dict[str, Any]:
    """This process's part of the resume state: its RNG, its loss function's state, its stream position."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if callable(getattr(loss_fn, "state_dict", None)):
        state["loss_fn"] = loss_fn.state_dict()
    if callable(getattr(batches, "state_dict", None)):
        state["batches"] = batches.state_dict()
    return state


def _resume_state(step: int, loss_fn: Callable, batches: Iterator) -> dict[str, Any] | None:
    """What a resumed run needs besides weights and optimizer to continue exactly as this one would; on rank 0,
    None on the others. A collective under torchrun: every rank calls it at the same step.

    Rank 0's state at the top level (the one-process format, which older checkpoints have alone); under torchrun
    also ``world_size`` and ``ranks``, every rank's state in rank order (their RNG streams and loss draws differ)."""
    ranks = gather(_rank_state(loss_fn, batches))
    if ranks is None:
        return None
    state: dict[str, Any] = {"step": int(step), **ranks[0]}
    if len(ranks) > 1:
        state.update(world_size=len(ranks), ranks=ranks)
    return state


def _restore(ckpt_dir: Path, start: int, loss_fn: Callable, batches: Iterator, desc: str = "train") -> None:
    """Restore ``resume.pt`` (RNG, stream position, loss state) if it belongs to step ``start``. Checkpoints
    written before it existed still resume (the stream then skips ``start`` batches; the RNG is not restored).

    Under torchrun each rank restores its own state; resumed with another number of processes than the
    checkpoint's, every rank takes rank 0's (one warning: the run is no longer the uninterrupted one)."""
    file = ckpt_dir / RESUME
    saved = _torch_load(file) if file.is_file() else None
    if saved is not None and int(saved.get("step", -1)) != start:
        saved = None  # left by another writer of this folder: not this step's state
    if saved is None:
        if callable(getattr(batches, "skip_to", None)):
            batches.skip_to(start)
        return
    ranks = saved.get("ranks") or [saved]
    if len(ranks) == world_size():
        mine = ranks[rank()]
    else:
        mine = ranks[0]
        if is_main_process():
            log.warning("%s: resumed with %d process(es) from a checkpoint written by %d, so the run will not be "
                        "bit-identical to an uninterrupted one (every process continues from rank 0's random state)",
                        desc, world_size(), len(ranks))
    if "batches" in mine and callable(getattr(batches, "load_state_dict", None)):
        batches.load_state_dict(mine["batches"])
    elif callable(getattr(batches, "skip_to", None)):
        batches.skip_to(start)
    torch.set_rng_state(mine["torch_rng"])
    cuda = mine.get("cuda_rng")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "loss_fn" in mine and callable(getattr(loss_fn, "load_state_dict", None)):
        loss_fn.load_state_dict(mine["loss_fn"])


def train_loop(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterator,
    stage: TrainConfig | Stage,
    *,
    params: list[nn.Parameter] | None = None,
    ckpt_dir: Path | None = None,
    device: str = "cpu",
    desc: str = "train",
    quiet: bool = False,
    ckpt_every_s: float = 60.0,
    lr_key: str | None = None,
    autocast: str = "none",
    data_parallel: bool = True,
    warmup_key: str | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``stage.steps`` optimizer steps; see the module docstring for guarantees.

    ``stage`` is what is trained how: a :class:`~lwbench.config.TrainConfig` section or a method's stage resolved
    against one (:meth:`~lwbench.config.Stage.resolved`); its ``steps``, ``lr``, ``weight_decay``,
    ``warmup_steps`` and ``grad_clip`` are read here (``batch_size`` and ``workers`` shaped ``batches`` already).
    The keywords say where and how this call runs, which the stage does not.

    ``batches`` yields ``(images, targets)``; with ``state_dict``/``load_state_dict`` (:class:`EpochStream`)
    its position is checkpointed, and so is ``loss_fn``'s if it has them (LookWhere's k draws).
    ``lr_key`` is the setting that holds ``lr`` (e.g. ``teacher.lr``), named by the NaN error; ``warmup_key`` the one
    that holds ``warmup_steps``, named when the warm-up is longer than the stage (default: ``lr_key``'s section).
    ``autocast`` (:mod:`lwbench.precision`) wraps each forward and loss; the backward and the optimizer step stay
    float32. Under torchrun, ``data_parallel`` (default) means ``batches`` yields the global batch: each rank trains on
    its share and the gradients are averaged here (:mod:`lwbench.training.distributed`). ``False`` is for a caller
    that already feeds every rank its own batches to a DDP-wrapped model, as ``lwbench pretrain lookwhere`` does."""
    unset = [k for k in ("steps", "lr", "weight_decay", "warmup_steps") if getattr(stage, k) is None]
    if unset:
        raise TypeError(f"{desc}: the stage leaves {', '.join(unset)} unset; resolve it against the run's train "
                        f"section first (Stage.resolved, FitContext.stage)")
    steps = int(stage.steps)
    model.to(device)
    groups = param_groups(list(params if params is not None else model.parameters()), float(stage.weight_decay))
    if not any(g["params"] for g in groups):
        raise TrainingError(f"{desc}: nothing to train (no parameter requires grad)")
    if ckpt_dir is None:
        lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        ckpt_dir = Path(ckpt_dir)
        # Rank 0 alone: other DDP ranks wait for it in the gradient all-reduce, not on the lock.
        lock = stage_lock(ckpt_dir, desc, quiet=quiet) if is_main_process() else contextlib.nullcontext()
    with lock:
        # Under torchrun rank 0 decides, under its lock, for every rank (lwbench/training/distributed.py).
        if agree(ckpt_dir is not None and is_finished(ckpt_dir, steps)):  # e.g. by the process this one waited for
            if load_checkpoint(model, ckpt_dir) is None:
                raise damaged(ckpt_dir / STATE, f"missing although {DONE} says the stage is finished")
            if not quiet and is_main_process():
                log.info("%s: reused from the cache (%d steps, %s; `lwbench cache rm %s` retrains it)", desc, steps,
                         ckpt_dir, ckpt_dir)
            return model.to(device).eval()
        return _train(model, loss_fn, batches, stage, groups, ckpt_dir, device=device, desc=desc, quiet=quiet,
                      ckpt_every_s=ckpt_every_s, lr_key=lr_key, autocast=autocast, data_parallel=data_parallel,
                      warmup_key=warmup_key)


def is_finished(ckpt_dir: Path, steps: int) -> bool:
    """The stage in ``ckpt_dir`` has finished at least ``steps`` steps (its ``done.json`` says so)."""
    done = ckpt_dir / DONE
    return done.is_file() and int(_read_json(done).get("steps", 0)) >= steps


def _train(model: nn.Module, loss_fn: Callable, batches: Iterator, stage: TrainConfig | Stage, groups: list[dict],
           ckpt_dir: Path | None, *, device: str, desc: str, quiet: bool, ckpt_every_s: float, lr_key: str | None,
           autocast: str, data_parallel: bool, warmup_key: str | None = None) -> nn.Module:
    """The steps themselves, once :func:`train_loop` holds the stage's lock and knows it is not finished."""
    from tqdm.auto import tqdm

    from lwbench.precision import autocast as autocast_ctx

    steps, lr, warmup_steps, grad_clip = int(stage.steps), float(stage.lr), int(stage.warmup_steps), stage.grad_clip
    params = [p for g in groups for p in g["params"]]

    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    start, elapsed = 0, 0.0
    if ckpt_dir is not None:
        state = load_checkpoint(model, ckpt_dir)
        if state is not None:
            start, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
            if start < steps:
                if (ckpt_dir / OPTIM).is_file():
                    opt.load_state_dict(_torch_load(ckpt_dir / OPTIM, device))
                _restore(ckpt_dir, start, loss_fn, batches, desc)
                if is_main_process():
                    (ckpt_dir / DONE).unlink(missing_ok=True)  # trained further: not done until this run ends
                if not quiet:
                    log.info("resuming %s from step %d/%d (%s)", desc, start, steps, ckpt_dir)
    writer = is_main_process()
    shares = data_parallel and world_size() > 1  # this rank trains on its share of each global batch
    model.train()
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=quiet or not sys.stderr.isatty(),
               dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    last_ckpt = t0
    logged_at = t0
    running = None
    if is_main_process():
        _warn_long_warmup(desc, steps, warmup_steps, lr, warmup_key or _sibling(lr_key, "warmup_steps"))
    if not quiet and is_main_process():
        log.info("%s: training %d steps%s (lr %g, %d warm-up); an estimate follows after %d steps", desc,
                 steps - start, f" (resumed at {start}/{steps})" if start else "", lr, warmup_steps,
                 ESTIMATE_AFTER + 1)
    durations: list[float] = []  # seconds of each step after the first (which carries one-off setup)
    prev_t = t0
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup_steps) * g.get("lr_mult", 1.0)
        images, targets = next(batches)
        if shares:
            images, targets = shard(images, f"{desc}: batch"), shard(targets, f"{desc}: batch")
        with autocast_ctx(device, autocast):
            loss, logs = loss_fn(model, to_device(images, device), to_device(targets, device))
        loss = loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if shares:
            average_gradients(params)
        # The step's one read-back, which the NaN guard needs: a non-finite loss stops training before opt.step
        # changes a weight (so nothing poisoned is trained on or checkpointed). Read after the backward is queued,
        # so that the GPU runs it meanwhile; the value is also the progress line's.
        value = loss.item()
        if any_rank(not math.isfinite(value)):  # under torchrun every rank stops, not only the NaN one
            bar.close()
            raise TrainingError(_nan_message(desc, value, step, ckpt_dir, lr_key))
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
        opt.step()
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.update(1)
        if not bar.disable:  # the loss parts are read only where the bar is drawn
            bar.set_postfix(loss=f"{running:.3f}", **_postfix(logs))
        now = time.perf_counter()
        if step > start:
            durations.append(now - prev_t)
        prev_t = now
        if step == start + ESTIMATE_AFTER and not quiet and is_main_process():
            per_step, slow = typical_step(durations)
            left_out = f" ({slow} slower step{'s' if slow > 1 else ''} of one-off work left out)" if slow else ""
            log.info("%s: %.2f s/step over steps %d-%d, so about %s for the remaining %d steps%s", desc, per_step,
                     start + 2, step + 1, _duration(per_step * (steps - step - 1)), steps - step - 1, left_out)
        if bar.disable and not quiet and now - logged_at > 30:  # no TTY: a plain progress line every 30 s
            if len(durations) >= ESTIMATE_AFTER:
                eta = f"eta {typical_step(durations)[0] * (steps - step - 1) / 60:.1f} min"
            else:  # the steps so far carried one-off work (a scene cache drawn ...): no estimate from them
                eta = f"an estimate follows after step {start + ESTIMATE_AFTER + 1}"
            log.info("%s: step %d/%d loss %.3f %s", desc, step + 1, steps, running, eta)
            logged_at = now
        # Rank 0's clock decides for every rank: each hands over its RNG and loss state at this same step.
        if ckpt_dir is not None and agree(writer and now - last_ckpt > ckpt_every_s):
            resume = _resume_state(step + 1, loss_fn, batches)
            if writer:
                _atomic_checkpoint(model, opt, {"step": step + 1, "elapsed_s": elapsed + now - t0}, ckpt_dir,
                                   resume=resume)
            last_ckpt = now
    bar.close()
    if ckpt_dir is not None and writer:
        total = elapsed + time.perf_counter() - t0
        _atomic_checkpoint(model, None, {"step": steps, "elapsed_s": total}, ckpt_dir)
        write_text_atomic(ckpt_dir / DONE, json.dumps({"steps": steps, "elapsed_s": total}))
        for name in (OPTIM, RESUME):  # only needed to resume; a finished stage is reused, not resumed
            (ckpt_dir / name).unlink(missing_ok=True)
    barrier()  # no rank reads the stage before rank 0 has written it
    model.eval()
    return model


_WARNED_WARMUP: set[tuple[str, int]] = set()  # (setting, warm-up steps) already warned about in this process


def _sibling(key: str | None, name: str) -> str | None:
    """``teacher.lr`` -> ``teacher.<name>``; None without a section."""
    return f"{key.rpartition('.')[0]}.{name}" if key and "." in key else None


def warmup_warning(desc: str, steps: int, warmup_steps: int, lr: float, warmup_key: str | None) -> str:
    """One line when the warm-up is longer than the stage (its learning rate never reaches ``lr``), else ``""``.
    A warning, not a clamp: the stage trains as configured, so its config (and the run id) is what was trained."""
    if warmup_steps <= steps:
        return ""
    fix = f"--set {warmup_key}={steps} or less" if warmup_key else f"this stage's warmup_steps to {steps} or less"
    return (f"{desc}: the warm-up ({warmup_steps} steps) is longer than the {steps} steps trained, so the learning "
            f"rate never reaches {lr:g}; trained as configured: set {fix} (or train more steps)")


def _warn_long_warmup(desc: str, steps: int, warmup_steps: int, lr: float, warmup_key: str | None) -> None:
    """:func:`warmup_warning`, once per setting: DynamicViT trains one stage in two parts with its warm-up."""
    text = warmup_warning(desc, steps, warmup_steps, lr, warmup_key)
    if text and (warmup_key or desc, warmup_steps) not in _WARNED_WARMUP:
        _WARNED_WARMUP.add((warmup_key or desc, warmup_steps))
        log.warning("%s", text)


def typical_step(durations: list[float]) -> tuple[float, int]:
    """Seconds per step to extrapolate from, and how many steps it leaves out: the mean of ``durations`` without
    the steps that took over 3x their median. Those did one-off work that later steps do not repeat (a first run
    draws the synthetic scene cache during its first steps); counting them made a stage's first estimate 30x too
    long and later ones jump."""
    med = statistics.median(durations)
    kept = [d for d in durations if d <= 3 * med]
    return sum(kept) / len(kept), len(durations) - len(kept)


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1.6 h``: an estimate's precision, not a stopwatch's."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _postfix(logs: dict) -> dict[str, str]:
    """The progress bar's fields from a loss function's ``logs``: numbers, or 0-dim tensors (loss parts, left on the
    device by the loss function so that a step without a bar reads none of them), read here in one transfer."""
    parts = {k: v.detach().float().reshape(()) for k, v in logs.items() if torch.is_tensor(v)}
    if len({t.device for t in parts.values()}) == 1:
        parts = dict(zip(parts, torch.stack(list(parts.values())).tolist(), strict=True))
    else:
        parts = {k: t.item() for k, t in parts.items()}
    return {k: f"{parts.get(k, v):.3g}" for k, v in logs.items()}


def _nan_message(desc: str, value: float, step: int, ckpt_dir: Path | None, lr_key: str | None) -> str:
    kept = ""
    if ckpt_dir is not None and (ckpt_dir / STATE).is_file():
        kept = f"; the last good checkpoint is kept in {ckpt_dir}"
    fix = f"lower the learning rate (--set {lr_key}=...)" if lr_key else "lower the learning rate of this stage"
    return f"{desc}: loss became {value} at step {step}{kept}; {fix} or check the data"


def training_time(ckpt_dir: Path) -> float:
    """Seconds spent training in ``ckpt_dir`` (across resumptions), 0 if unknown."""
    f = Path(ckpt_dir) / DONE
    return float(_read_json(f).get("elapsed_s", 0.0)) if f.is_file() else 0.0
