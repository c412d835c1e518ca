"""Speed as a ratio to a reference, timed paired: what a shared machine can reproduce.

An absolute latency measured one model per process moves by 10x between two runs on a shared machine (the same
pair of quick models gave speed-ups from 0.93x to 66.9x, one after the other), because the load changes between
the two measurements. Timed side by side, call block by call block, both models see the same load, and their
*ratio* holds still (2.08x quiet and 2.05x beside two busy loops, in the pilot of this module). So:

* both models run in this process, on the same device, dtype and threads, eval mode, ``inference_mode``;
* they are warmed up, then timed in **rounds**: one block of calls of each model, in **balanced pairs of
  rounds**: the first round of a pair in an order drawn at random (AB or BA), the second in the reverse order
  (ABBA), so each model runs first exactly as often as second;
* a block is as many calls as fill about ``min_run_time / min_runs`` seconds (one call for a big model), and
  both blocks of a round cycle through the same images (batch 1) or time the same fixed batch;
* a block's time is the median of its calls (a call that waited for a core lost to another process measures the
  machine, not the model); a round's speed-up is the reference's block time over the model's, a pair's the
  geometric mean of its two rounds' (a block that runs second gains or loses the same factor in both orders, and
  that factor cancels); the speed-up is the **median over pairs** and its 95% interval a percentile bootstrap of
  that median, resampling pairs;

Why pairs. Until 2026-12-07 the order was drawn per round and the median taken over rounds. A block that runs
second in its round is faster or slower by a factor of its own (caches, frequency, the allocator's state), and
ten random orders are rarely five and five: with seed 0 the reference ran first in 7 of 10 rounds, and ``full``
timed against itself at 518 px on ViT-B read 1.04x [1.03, 1.07]. With balanced pairs that factor cancels
exactly (``tests/test_paired.py``: a second block 10% faster, ``full`` against itself reads 1.00x).
* timing runs for at least ``min_runs`` rounds (rounded up to whole pairs) and ``2 * min_run_time`` seconds, then
  goes on pair by pair while the interval is wider than :data:`RELIABLE_RATIO` (high / low), up to
  ``max_run_time`` seconds: a busy machine buys more rounds instead of a wrong number, and a row whose interval
  stays wide says so (``speedup_reliable``).

On CUDA every call is bracketed by CUDA events and each block ends with a synchronize; on CPU a block is timed
with ``time.perf_counter`` (the calls are synchronous). :func:`attention_kernels` names the attention kernel that
actually ran in one call, from the profiler's op names, not the backend that was available.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: An interval whose high end is more than this many times its low end is too wide to read: the row says so.
RELIABLE_RATIO = 1.25
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class PairedTiming:
    """One paired timing of ``model`` against ``reference`` at one batch size."""

    batch: int
    speedup: float  # the reference's seconds per call / the model's: > 1 is faster
    ci_low: float
    ci_high: float
    ms: float  # the model's median milliseconds per call over its blocks
    ms_p25: float
    ms_p75: float
    reference_ms: float
    reference_ms_p25: float
    reference_ms_p75: float
    rounds: int
    calls_per_block: int
    seconds: float  # wall time the timing took
    quiet_rounds: int = 0  # rounds no other process contended (all rounds for a one-thread timing)
    other_load: float = math.nan  # mean cores other processes kept busy during the rounds
    # Too few rounds (< min_runs) ran free of other processes' load, so the speed-up comes from contended rounds,
    # where several threads waiting for each other slow the bigger model more: maybe not the quiet machine's.
    contended: bool = False

    @property
    def reliable(self) -> bool:
        return interval_is_reliable(self.ci_low, self.ci_high) and not self.contended

    @property
    def iqr_ms(self) -> float:
        return self.ms_p75 - self.ms_p25

    def throughput(self) -> tuple[float, float, float]:
        """Images per second of the model (median), its IQR in images per second, and the reference's median."""
        per_s = 1e3 * self.batch
        return per_s / self.ms, per_s / self.ms_p25 - per_s / self.ms_p75, per_s / self.reference_ms


def interval_is_reliable(low: float, high: float) -> bool:
    """A speed-up interval narrow enough to read: finite, positive, high / low <= :data:`RELIABLE_RATIO`."""
    return bool(low > 0 and math.isfinite(high) and high / low <= RELIABLE_RATIO)


def median_ratio_interval(ratios: list[float], seed: int = 0, level: float = 0.95,
                          resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(median, low, high): the median of per-round ratios and its percentile-bootstrap interval over rounds."""
    import numpy as np

    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(r))
    if r.size == 1:
        return med, math.nan, math.nan
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, r.size, size=(resamples, r.size))], axis=1)
    alpha = (1 - level) / 2
    return med, float(np.quantile(meds, alpha)), float(np.quantile(meds, 1 - alpha))


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75)."""
    if len(values) < 2:
        v = values[0] if values else math.nan
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


class _Clock:
    """A block's seconds per call, the median over its calls: perf_counter around each call on CPU; on CUDA an
    event pair around each call, read after one synchronize at the end of the block.

    The median, not the mean: on a shared CPU a call now and then waits for a core its partner thread lost (a
    stall of a scheduler time slice), which says how busy the machine was, not how fast the model is; the
    median of the block's calls is its speed between such stalls, the quantity a quiet machine shows."""

    def __init__(self, device: torch.device):
        self.device = device

    def block(self, call: Callable[[int], None], indices: list[int]) -> float:
        if self.device.type != "cuda":
            times = []
            for i in indices:
                t0 = time.perf_counter()
                call(i)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        events = []
        for i in indices:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(i)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


class _Contention:
    """Cores other processes kept busy during a round: the machine's busy CPU time minus this process's, per second
    of wall time (psutil's system counters; this process's CPU time counts all its threads)."""

    def __init__(self, threads: int):
        self.threads = int(threads)
        self.idle = max(0, (os.cpu_count() or 1) - self.threads)

    @staticmethod
    def _now() -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.system + sum(getattr(t, f, 0.0) for f in ("nice", "irq", "softirq", "steal"))
        return busy, time.process_time(), time.perf_counter()

    def start(self) -> None:
        self._t0 = self._now()

    def others(self) -> float:
        busy, own, wall = self._now()
        b0, o0, w0 = self._t0
        return max(0.0, ((busy - b0) - (own - o0)) / max(wall - w0, 1e-9))

    def contends(self, others: float) -> bool:
        """Others took cores this timing's threads needed. One thread is spared: its calls slow in proportion to
        the share it gets, so the ratio holds (measured: 1.84x quiet, 1.79x beside two busy loops); several threads
        wait for each other at every parallel region, and the bigger model loses more (1.46x quiet, 1.75x beside
        two busy loops, on 2 cores: ``benchmarks/results/latency_stability.md``)."""
        return self.threads > 1 and others > max(0.25, float(self.idle))


def time_paired(model: nn.Module, reference: nn.Module, inputs: list[torch.Tensor], device: torch.device,
                threads: int = 1, warmup: int = 5, min_run_time: float = 1.0, min_runs: int = 10,
                max_run_time: float = 20.0, seed: int = 0) -> PairedTiming:
    """Time ``model`` against ``reference`` in balanced pairs of rounds of one block each (module docstring).

    ``inputs`` are on ``device`` already: batch-1 images to cycle through, or one fixed batch. Both models must be
    in eval mode on ``device``. The round count grows past ``min_runs`` while the interval is wider than
    :data:`RELIABLE_RATIO`, or fewer than ``min_runs`` rounds ran free of other processes' load, and
    ``max_run_time`` seconds have not passed. The speed-up is read from the pairs of uncontended rounds when there
    are ``min_runs`` such rounds, else from all (and :attr:`PairedTiming.contended` says so)."""
    models = {"model": model, "reference": reference}
    n = len(inputs)
    batch = int(inputs[0].shape[0])
    old_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(int(threads))
    clock = _Clock(device)

    def caller(m: nn.Module) -> Callable[[int], None]:
        def call(i: int) -> None:
            m(inputs[i % n])
        return call

    calls = {k: caller(m) for k, m in models.items()}
    rng = random.Random(seed)
    try:
        with torch.inference_mode():
            warm: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(max(2, warmup)):  # alternating, so both see the same warm-up conditions
                for k in models:
                    warm[k].append(clock.block(calls[k], [rng.randrange(n)]))
            # A block of about min_run_time / min_runs seconds of the slower model (its later warm-up calls: the
            # first carries one-off costs), at least one call.
            slow = max(statistics.median(v[1:]) for v in warm.values())
            k_calls = max(1, int(round(min_run_time / max(1, min_runs) / max(slow, 1e-9))))
            times: dict[str, list[float]] = {k: [] for k in models}
            ratios: list[float] = []
            quiet: list[bool] = []
            loads: list[float] = []
            load = _Contention(threads)
            start = time.perf_counter()
            position = 0
            min_rounds = 2 * max(1, math.ceil(max(2, min_runs) / 2))
            order = ["model", "reference"]
            while True:
                indices = [(position + j) % n for j in range(k_calls)]
                position += k_calls
                # a pair's first round in a random order, its second in the reverse (ABBA)
                order = (["model", "reference"] if rng.random() < 0.5 else ["reference", "model"]) \
                    if len(ratios) % 2 == 0 else order[::-1]
                load.start()
                got = {k: clock.block(calls[k], indices) for k in order}
                loads.append(load.others())
                quiet.append(not load.contends(loads[-1]))
                for k in models:
                    times[k].append(got[k])
                ratios.append(got["reference"] / got["model"])
                if len(ratios) % 2:
                    continue  # decisions at whole pairs only
                elapsed = time.perf_counter() - start
                if len(ratios) < min_rounds or elapsed < 2 * min_run_time:
                    continue
                if elapsed >= max_run_time:
                    break
                usable = [r for r, q in zip(*pair_ratios(ratios, quiet), strict=True) if q]
                if 2 * len(usable) < min_rounds:
                    continue
                _, low, high = median_ratio_interval(usable, seed=seed)
                if interval_is_reliable(low, high):
                    break
    finally:
        if device.type == "cpu":
            torch.set_num_threads(old_threads)
    n_quiet = sum(quiet)
    pairs, pair_quiet = pair_ratios(ratios, quiet)
    contended = 2 * sum(pair_quiet) < min_rounds
    keep_pair = [True] * len(pairs) if contended else pair_quiet
    used = [r for r, k in zip(pairs, keep_pair, strict=True) if k]
    keep = [k for k in keep_pair for _ in range(2)]
    speedup, low, high = median_ratio_interval(used, seed=seed)
    q = [1e3 * v for v in _quartiles([t for t, k in zip(times["model"], keep, strict=True) if k])]
    r = [1e3 * v for v in _quartiles([t for t, k in zip(times["reference"], keep, strict=True) if k])]
    return PairedTiming(batch=batch, speedup=speedup, ci_low=low, ci_high=high, ms=q[1], ms_p25=q[0], ms_p75=q[2],
                        reference_ms=r[1], reference_ms_p25=r[0], reference_ms_p75=r[2], rounds=len(ratios),
                        calls_per_block=k_calls, seconds=time.perf_counter() - start, quiet_rounds=n_quiet,
                        other_load=statistics.fmean(loads) if loads else math.nan, contended=contended)


def pair_ratios(ratios: list[float], quiet: list[bool]) -> tuple[list[float], list[bool]]:
    """Rounds taken two by two (an even number of them): each pair's speed-up, the geometric mean of its rounds'
    (the factor a block gains or loses by running second cancels), and whether both rounds were quiet."""
    m = len(ratios) // 2 * 2
    return ([math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, m, 2)],
            [quiet[i] and quiet[i + 1] for i in range(0, m, 2)])


# -- the paired pass of one point ----------------------------------------------------------------------------
def _fill(images: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // images.shape[0])
    return images.repeat(reps, 1, 1, 1)[:batch].contiguous()


def _time_batch(model: nn.Module, reference: nn.Module, images: torch.Tensor, batch: int, device: torch.device,
                **kw) -> PairedTiming:
    """A paired timing on one fixed batch of ``batch`` images (the test images repeated to fill it). The batch
    lives only inside this call, so an out-of-memory error leaves nothing of it behind for the caller's retry."""
    inputs = [_fill(images, batch).to(device)]
    return time_paired(model, reference, inputs, device, **kw)


def _oom_types() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()


def measure_paired(model: nn.Module, reference: nn.Module, images: torch.Tensor, device: torch.device,
                   threads: int = 1, warmup: int = 5, min_run_time: float = 1.0, min_runs: int = 10,
                   max_run_time: float = 20.0, throughput_batch: int = 32, batches: tuple[int, ...] = (),
                   seed: int = 0) -> dict:
    """Every timing column of a row from paired timings (``results/README.md``): batch 1 cycling through
    ``images``, ``throughput_batch`` (shrunk on CUDA out-of-memory as timm's benchmark does) and each of
    ``batches`` (an out-of-memory batch is reported as such, the others kept), and the attention kernels."""
    import json

    kw = dict(threads=threads, warmup=warmup, min_run_time=min_run_time, min_runs=min_runs,
              max_run_time=max_run_time, seed=seed)
    singles = [images[i: i + 1].to(device) for i in range(images.shape[0])]
    one = time_paired(model, reference, singles, device, **kw)
    out: dict = {
        "timing_protocol": "paired", "latency_ms": one.ms, "latency_iqr_ms": one.iqr_ms,
        "latency_runs": one.rounds * one.calls_per_block, "reference_latency_ms": one.reference_ms,
        "speedup": one.speedup, "speedup_ci_low": one.ci_low, "speedup_ci_high": one.ci_high,
        "speedup_reliable": one.reliable, "timing_rounds": one.rounds, "timing_quiet_rounds": one.quiet_rounds,
        "timing_contended": one.contended,
        "attention_kernel": attention_kernels(model, singles[0]),
        "reference_attention_kernel": attention_kernels(reference, singles[0]),
    }
    per_batch: dict[str, dict] = {"1": _batch_entry(one)}
    bs = max(1, int(throughput_batch))
    big = one if bs == 1 else None  # a throughput batch of one image is the latency pass's: not timed twice
    while big is None:
        try:
            big = _time_batch(model, reference, images, bs, device, **kw)
            break
        except _oom_types():
            pass  # handled outside the except block, once the traceback (and the batch it holds) is gone
        torch.cuda.empty_cache()
        per_batch[str(bs)] = {"error": "out of memory"}
        from timm.utils import decay_batch_step

        bs = decay_batch_step(bs)
        if bs < 1:
            raise torch.cuda.OutOfMemoryError("even batch 1 does not fit for the throughput timing")
        if bs == 1:
            big = one
    thr, thr_iqr, ref_thr = big.throughput()
    per_batch[str(bs)] = _batch_entry(big)
    out.update(throughput=thr, throughput_iqr=thr_iqr, throughput_batch=bs,
               throughput_runs=big.rounds * big.calls_per_block, reference_throughput=ref_thr,
               throughput_speedup=big.speedup, throughput_speedup_ci_low=big.ci_low,
               throughput_speedup_ci_high=big.ci_high, throughput_speedup_reliable=big.reliable)
    for b in sorted({int(b) for b in batches} - {1, bs}):
        try:
            per_batch[str(b)] = _batch_entry(_time_batch(model, reference, images, b, device, **kw))
            continue
        except _oom_types():
            pass
        torch.cuda.empty_cache()
        per_batch[str(b)] = {"error": "out of memory"}
    out["timing_batches"] = json.dumps(dict(sorted(per_batch.items(), key=lambda kv: int(kv[0]))))
    return out


def _batch_entry(t: PairedTiming) -> dict:
    return {"speedup": round(t.speedup, 4), "ci_low": round(t.ci_low, 4), "ci_high": round(t.ci_high, 4),
            "ms": round(t.ms, 4), "reference_ms": round(t.reference_ms, 4), "rounds": t.rounds,
            "quiet_rounds": t.quiet_rounds, "contended": t.contended}


# -- which attention kernel ran --------------------------------------------------------------------------------
# aten op names of scaled_dot_product_attention's kernels, as the profiler records them (CPU and CUDA).
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math",
}
_SOFTMAX = {"aten::softmax", "aten::_softmax", "aten::_safe_softmax"}
_MATMUL = {"aten::bmm", "aten::matmul", "aten::baddbmm", "aten::einsum"}


def kernels_of(op_names: set[str], square_softmax: bool = False) -> str:
    """The attention kernel(s) among profiler op names: SDPA's kernels by name, ``matmul`` for attention written
    as matmuls and a softmax (with no SDPA kernel at all, or beside one when ``square_softmax``: a softmax over a
    whole ``T x T`` map ran, as MCTF's blocks that fuse with their own map do), ``+``-joined when several, ``none``
    without either. A softmax over one row (EViT's CLS attention beside the fused kernel) is not attention run as
    matmuls and does not count."""
    found = {label for op, label in SDPA_KERNELS.items() if op in op_names}
    if op_names & _SOFTMAX and op_names & _MATMUL and (not found or square_softmax):
        found.add("matmul")
    return "+".join(sorted(found)) or "none"


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints ``profiler_start``/``profiler_stop`` lines on file descriptor 2 at every use:
    silenced for the one profiled call (restored after it, whatever happens)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def attention_kernels(model: nn.Module, x: torch.Tensor) -> str:
    """:func:`kernels_of` the ops of one ``inference_mode`` call of ``model`` on ``x``, from the autograd
    profiler's op names (CPU-side events, which name the SDPA kernel chosen for CUDA tensors too; no CUDA
    activity is traced). A ``TorchDispatchMode`` would not do: under ``inference_mode`` it sees the composite
    ``scaled_dot_product_attention``, not the kernel it chose."""
    from torch.autograd.profiler import profile

    with _quiet_stderr(), profile(use_kineto=False, record_shapes=True) as prof, torch.inference_mode():
        model(x)
    events = prof.function_events
    square = any(e.key in _SOFTMAX and _square(e.input_shapes) and not _inside_sdpa(e) for e in events)
    return kernels_of({e.key for e in events}, square)


def _inside_sdpa(event) -> bool:
    """Whether a profiler event ran inside an SDPA call (its math kernel's own softmax is SDPA's, not a map a
    method writes out)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.key in SDPA_KERNELS or parent.key == "aten::scaled_dot_product_attention":
            return True
        parent = parent.cpu_parent
    return False


def _square(shapes) -> bool:
    """Whether a softmax's input (its first shape) is a square map of more than one token: ``(..., T, T)``."""
    first = shapes[0] if shapes else []
    return len(first) >= 2 and first[-1] == first[-2] and first[-1] > 1


__all__ = ["PairedTiming", "time_paired", "measure_paired", "median_ratio_interval", "interval_is_reliable",
           "attention_kernels", "kernels_of", "pair_ratios", "RELIABLE_RATIO", "SDPA_KERNELS"]
