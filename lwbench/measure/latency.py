"""Latency (batch 1) and throughput (a fixed batch) of a model on real task images.

Protocol (STYLE.md, "Measurement rules"): eval mode and ``torch.inference_mode``; warm-up; then
timed runs for at least ``min_run_time`` seconds and at least ``min_runs`` measurements;
report the **median** and the interquartile range, never a mean.

- CPU: ``torch.utils.benchmark.Timer(num_threads=threads).blocked_autorange``. The Timer sets
  the torch thread count for the measurement and restores it after. It is given the plain
  ``timeit`` clock: its default clock synchronizes a present GPU on every read.
- CUDA: ``torch.cuda.Event`` pairs around every call, read after ``synchronize``. The CUDA path
  is only entered for a CUDA device, so CPU measurements never touch the CUDA runtime.

Latency cycles through the given images one at a time (batch 1), so content-adaptive methods
(ATS, threshold DynamicViT, LookWhere) are timed on the content they will see, not on noise or
on one lucky image. Throughput times one fixed batch built from the same images.
"""

from __future__ import annotations

import gc
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75), linear interpolation (as torch.utils.benchmark)."""
    t = torch.tensor(sorted(times), dtype=torch.float64)
    return t.quantile(0.25).item(), t.quantile(0.5).item(), t.quantile(0.75).item()


def _warm_up(step: Callable[[], Any], warmup: int, max_seconds: float) -> float:
    """Run ``step`` up to ``warmup`` times, stopping early once ``max_seconds`` have passed and two
    calls are done (a big CPU batch can take seconds per call; the first call carries the one-off
    costs). Returns the median seconds per call, to size the timed phase."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def _time_cpu(step: Callable[[], Any], threads: int, warmup: int, min_run_time: float, min_runs: int) -> list[float]:
    """Seconds per call, one entry per measurement block, on CPU with torch.utils.benchmark."""
    from lwbench.logs import silence_cuda_home_notice

    silence_cuda_home_notice()  # before torch.utils.benchmark imports torch.utils.cpp_extension
    from torch.utils.benchmark import Timer

    with _threads(threads):
        per_call = _warm_up(step, warmup, max_seconds=max(1.0, min_run_time))
    # Enough wall time for min_runs blocks even for models slower than min_run_time / min_runs.
    budget = max(min_run_time, 1.05 * min_runs * per_call)
    # timeit's clock: Timer's default clock synchronizes any present accelerator on every read.
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=threads, timer=timeit.default_timer)
    m = timer.blocked_autorange(min_run_time=budget)
    return list(m.times)


def _time_cuda(step: Callable[[], Any], device: torch.device, warmup: int, min_run_time: float,
               min_runs: int) -> list[float]:
    """Seconds per call on CUDA: an event pair around every call, read after synchronize."""

    def synced() -> None:
        step()
        torch.cuda.synchronize(device)

    with torch.cuda.device(device):
        _warm_up(synced, warmup, max_seconds=max(1.0, min_run_time))
        times: list[float] = []
        total = 0.0
        while total < min_run_time or len(times) < min_runs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            t = start.elapsed_time(end) / 1e3
            times.append(t)
            total += t
    return times


class _threads:
    """Set the torch intra-op thread count for a block (the Timer does the same for its runs)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _time(step, device, threads, warmup, min_run_time, min_runs) -> list[float]:
    if device.type == "cuda":
        return _time_cuda(step, device, warmup, min_run_time, min_runs)
    return _time_cpu(step, threads, warmup, min_run_time, min_runs)


def _prepare(model: nn.Module, images: torch.Tensor, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    model = model.eval().to(device)
    images = images.to(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), images.dtype)
    return model, images.to(dtype)


def measure_latency(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    threads: int = 1,
    warmup: int = 10,
    min_run_time: float = 2.0,
    min_runs: int = 10,
) -> dict[str, Any]:
    """Median milliseconds per image at batch 1, cycling through ``images`` ``(N, C, H, W)``.

    Returns ``latency_ms`` (median), ``latency_iqr_ms`` (p75 - p25 of the measurements) and
    ``latency_runs`` (forward calls timed). On CPU each measurement is a block of calls
    (``blocked_autorange``); for ViTs a block is one call.
    """
    device = as_device(device)
    model, images = _prepare(model, images, device)
    singles = [images[i: i + 1] for i in range(images.shape[0])]
    state = {"i": 0}

    def step() -> None:
        x = singles[state["i"] % len(singles)]
        state["i"] += 1
        with torch.inference_mode():
            model(x)

    times = _time(step, device, threads, warmup, min_run_time, min_runs)
    p25, med, p75 = _quantiles(times)
    return {"latency_ms": med * 1e3, "latency_iqr_ms": (p75 - p25) * 1e3, "latency_runs": len(times)}


def _fill_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` images, the given ones repeated in order as often as needed."""
    reps = -(-batch_size // images.shape[0])
    return images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()


def _time_batch(model: nn.Module, images: torch.Tensor, bs: int, device: torch.device, threads: int, warmup: int,
                min_run_time: float, min_runs: int) -> list[float]:
    """:func:`_time` of the forward of one batch of ``bs`` images. The batch lives only in this frame (and the
    step closure), so that an out-of-memory error frees it once its traceback is gone."""
    batch = _fill_batch(images, bs)

    def step() -> None:
        with torch.inference_mode():
            model(batch)

    return _time(step, device, threads, warmup, min_run_time, min_runs)


def measure_throughput(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    threads: int = 1,
    warmup: int = 10,
    min_run_time: float = 2.0,
    min_runs: int = 5,
) -> dict[str, Any]:
    """Median images per second on one fixed batch of ``batch_size`` images (repeated to fill it).

    On CUDA an out-of-memory error shrinks the batch with timm's ``decay_batch_step`` and retries,
    as timm's benchmark does; ``throughput_batch`` is the batch actually used. ``throughput_iqr``
    is the spread in img/s between the p25 and p75 measurements.
    """
    from timm.utils import decay_batch_step

    device = as_device(device)
    model, images = _prepare(model, images, device)
    bs = int(batch_size)
    while True:
        try:
            times = _time_batch(model, images, bs, device, threads, warmup, min_run_time, min_runs)
            break
        except torch.cuda.OutOfMemoryError:  # only raised by the CUDA path; importing the class is harmless
            if decay_batch_step(bs) < 1:
                raise
        # Out of memory. Only here, outside the ``except`` block, is the exception gone, and with its traceback the
        # frames of _time_batch that held the batch, the step closure and the forward's partial activations: the
        # cache can give their memory back before the smaller batch is built.
        gc.collect()
        torch.cuda.empty_cache()
        bs = decay_batch_step(bs)
    p25, med, p75 = _quantiles(times)
    return {
        "throughput": bs / med,
        "throughput_iqr": bs / p25 - bs / p75,
        "throughput_batch": bs,
        "throughput_runs": len(times),
    }


__all__ = ["measure_latency", "measure_throughput", "as_device"]
