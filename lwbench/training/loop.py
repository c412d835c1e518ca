"""The one training loop: AdamW, warm-up + cosine, checkpoints you can resume, progress, NaN guard.

Every trainable thing in lwbench (the quick profile's task-trained teacher, fine-tuning, LookWhere's
distillation, DynamicViT, DPS, IPS) goes through :func:`train_loop`, so resumption and failure
behaviour are the same everywhere: a checkpoint (safetensors weights + optimizer state) is written
atomically every ``ckpt_every`` steps and at the end; a rerun with the same ``ckpt_dir`` continues
from it; a NaN loss stops with one clear line and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from lwbench.errors import TrainingError

DONE = "done.json"


def endless(loader: Iterable) -> Iterator:
    """Cycle a DataLoader forever (re-shuffling every epoch)."""
    while True:
        yield from loader


def to_device(obj, device: str):
    """Tensors, and dicts/lists of them (dense targets), onto ``device``."""
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


def is_done(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DONE).is_file()


def load_checkpoint(model: nn.Module, ckpt_dir: Path) -> dict | None:
    """Load the last checkpoint of ``ckpt_dir`` into ``model``; returns its state (step, ...) or None."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    missing, unexpected = load_model(model, str(ckpt_dir / "model.safetensors"), strict=False, device="cpu")
    if missing or unexpected:
        from lwbench.errors import CheckpointError

        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit the model (missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}); delete it or use --force")
    return state


def is_main_process() -> bool:
    """False on DDP ranks other than 0: only rank 0 writes checkpoints (all ranks read them to resume)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _atomic_checkpoint(model: nn.Module, opt: torch.optim.Optimizer | None, state: dict, ckpt_dir: Path) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp_model = ckpt_dir / "model.safetensors.tmp"
    save_model(model, str(tmp_model))
    if opt is not None:
        torch.save(opt.state_dict(), ckpt_dir / "optim.pt.tmp")
    (ckpt_dir / "state.json.tmp").write_text(json.dumps(state))
    # weights first, state last: a state.json always describes complete files
    os.replace(tmp_model, ckpt_dir / "model.safetensors")
    if opt is not None:
        os.replace(ckpt_dir / "optim.pt.tmp", ckpt_dir / "optim.pt")
    os.replace(ckpt_dir / "state.json.tmp", ckpt_dir / "state.json")


def train_loop(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterator,
    steps: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    params: list[nn.Parameter] | None = None,
    ckpt_dir: Path | None = None,
    device: str = "cpu",
    desc: str = "train",
    quiet: bool = False,
    grad_clip: float | None = None,
    ckpt_every_s: float = 60.0,
    on_step: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``steps`` optimizer steps; see the module docstring for guarantees.

    ``on_step(step)`` is called before each step (e.g. to anneal a temperature)."""
    from tqdm.auto import tqdm

    model.to(device)
    groups = param_groups(list(params if params is not None else model.parameters()), weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise TrainingError(f"{desc}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    start, elapsed = 0, 0.0
    if ckpt_dir is not None:
        ckpt_dir = Path(ckpt_dir)
        state = load_checkpoint(model, ckpt_dir)
        if state is not None:
            start, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
            if (ckpt_dir / "optim.pt").is_file() and start < steps:
                opt.load_state_dict(torch.load(ckpt_dir / "optim.pt", map_location=device, weights_only=True))
            if start < steps and not quiet:
                print(f"lwbench: resuming {desc} from step {start}/{steps} ({ckpt_dir})", file=sys.stderr)
    writer = is_main_process()
    model.train()
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=quiet or not sys.stderr.isatty(),
               dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    last_ckpt = t0
    logged_at = t0
    step = start
    running = None
    for step in range(start, steps):
        if on_step is not None:
            on_step(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup_steps) * g.get("lr_mult", 1.0)
        images, targets = next(batches)
        loss, logs = loss_fn(model, to_device(images, device), to_device(targets, device))
        if not torch.isfinite(loss):
            bar.close()
            where = f"; last good checkpoint kept in {ckpt_dir}" if ckpt_dir is not None else ""
            raise TrainingError(f"{desc}: loss became {loss.item()} at step {step}{where}; lower the learning rate "
                                f"(--set train.lr=...) or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", **{k: f"{v:.3g}" for k, v in logs.items()})
        now = time.perf_counter()
        if not bar.disable:
            pass
        elif not quiet and now - logged_at > 30:  # no TTY: a plain progress line every 30 s
            done = step + 1 - start
            eta = (now - t0) / done * (steps - step - 1)
            print(f"lwbench: {desc}: step {step + 1}/{steps} loss {running:.3f} eta {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)
            logged_at = now
        if ckpt_dir is not None and writer and now - last_ckpt > ckpt_every_s:
            _atomic_checkpoint(model, opt, {"step": step + 1, "elapsed_s": elapsed + now - t0}, ckpt_dir)
            last_ckpt = now
    bar.close()
    if ckpt_dir is not None and writer:
        total = elapsed + time.perf_counter() - t0
        _atomic_checkpoint(model, None, {"step": steps, "elapsed_s": total}, ckpt_dir)
        (ckpt_dir / DONE).write_text(json.dumps({"steps": steps, "elapsed_s": total}))
        optim = ckpt_dir / "optim.pt"
        if optim.exists():
            optim.unlink()
    model.eval()
    return model


def training_time(ckpt_dir: Path) -> float:
    """Seconds spent training in ``ckpt_dir`` (across resumptions), 0 if unknown."""
    f = Path(ckpt_dir) / DONE
    return float(json.loads(f.read_text())["elapsed_s"]) if f.is_file() else 0.0
