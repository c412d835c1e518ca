"""The one measurement contract: ``measure(model, images, MeasureConfig) -> Measurement``.

``lwbench run`` and ``lwbench flops`` both count MACs through :func:`count`, so the rule that refuses a
count the counters cannot see (the second counter, ``torch.utils.flop_counter``, finding more than
``flop_tolerance`` more work than the reported one: an op with real work and no formula) guards every
number a user may quote, not only ``lwbench flops``. Timing and memory run in a fresh process
configured by the same :class:`~lwbench.config.MeasureConfig`, and the whole :class:`Measurement`
(counter, exactness flags, run counts, protocol parameters, attention backend, dtype, threads) goes
into the result row, so a row says how its numbers were obtained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lwbench.config import MeasureConfig
from lwbench.logs import log
from lwbench.measure.flops import FlopCountError, mean_macs_over, torch_counter_macs


@dataclass(frozen=True)
class FlopCount:
    """MACs per image (GMACs), their parts, and how they were counted."""

    gmacs: float
    gmacs_overhead: float
    gmacs_backbone: float
    gmacs_head: float
    params_m: float
    tokens_mean: float
    flops_counter: str
    flops_images: int
    flops_check_gmacs: float  # the second counter's total (NaN when not run)
    flops_unsupported_ops: str  # ops with no formula, comma-separated ("" when none)
    flops_uncounted_ops: str  # elementwise ops left uncounted by convention, comma-separated


@dataclass(frozen=True)
class Measurement(FlopCount):
    """A :class:`FlopCount` plus latency, throughput and memory, with the protocol that produced them."""

    latency_ms: float = math.nan
    latency_iqr_ms: float = math.nan
    latency_runs: int = 0
    throughput: float = math.nan
    throughput_iqr: float = math.nan
    throughput_batch: int = 0
    throughput_runs: int = 0
    peak_mem_mb: float = math.nan
    mem_kind: str = ""
    memory_exact: bool = False
    measure_isolated: bool = False
    isolation_error: str = ""
    measure_warmup: int = 0
    measure_min_run_time: float = math.nan
    measure_min_runs: int = 0
    memory_batch: int = 1
    other_load: float = math.nan
    machine_busy: bool = False
    dtype: str = "float32"
    autocast: str = "none"
    compile: str = "none"
    omp_wait_policy: str = ""  # OpenMP's wait policy in the timing process (lwbench/openmp.py)
    # Paired timing against the reference (lwbench/measure/paired.py; the columns are in results/README.md).
    timing_protocol: str = ""
    reference_gmacs: float = math.nan
    gmac_ratio: float = math.nan
    speedup: float = math.nan
    speedup_ci_low: float = math.nan
    speedup_ci_high: float = math.nan
    speedup_reliable: bool | None = None
    conversion: float = math.nan
    reference_latency_ms: float = math.nan
    throughput_speedup: float = math.nan
    throughput_speedup_ci_low: float = math.nan
    throughput_speedup_ci_high: float = math.nan
    throughput_speedup_reliable: bool | None = None
    throughput_conversion: float = math.nan
    reference_throughput: float = math.nan
    timing_rounds: int = 0
    timing_quiet_rounds: int = 0
    timing_contended: bool | None = None
    timing_batches: str = ""
    attention_kernel: str = ""
    reference_attention_kernel: str = ""
    compile_time_s: float = math.nan
    threads: int = 0
    device: str = "cpu"
    attention_backend: str = ""

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tokens(model: nn.Module, singles: list[torch.Tensor]) -> float:
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return math.nan
    with torch.inference_mode():
        counts = [float(encoder(x).realised_tokens().float().mean()) for x in singles]
    return sum(counts) / len(counts)


def count(model: nn.Module, images: torch.Tensor, cfg: MeasureConfig, what: str = "model") -> FlopCount:
    """GMACs of ``model`` averaged over the first ``cfg.flops_images`` of ``images`` at batch 1, checked by
    the second counter. Raises :class:`FlopCountError` when that one sees more than ``cfg.flop_tolerance``
    more work: some op carries real work the reported counter has no formula for."""
    model = model.to("cpu").eval()
    n = max(1, min(int(cfg.flops_images), images.shape[0]))
    singles = [images[i: i + 1] for i in range(n)]
    rep = mean_macs_over(model, singles, counter=cfg.counter)
    check = math.nan
    if rep.counter == "fvcore":
        check = sum(torch_counter_macs(model, x) for x in singles) / n
        if check > rep.macs * (1 + cfg.flop_tolerance):
            ops = ", ".join(rep.unsupported_ops) or "none listed"
            raise FlopCountError(
                f"{what}: fvcore counts {rep.gmacs:.4g} GMACs but torch.utils.flop_counter {check / 1e9:.4g} "
                f"(more than {cfg.flop_tolerance:.0%} more); ops without a MAC formula: {ops}. The count would be "
                f"silently low: add a handle in lwbench/measure/flops.py")
        check /= 1e9
    parts = rep.parts_gmacs
    return FlopCount(
        gmacs=rep.gmacs, gmacs_overhead=parts.get("overhead", 0.0), gmacs_backbone=parts.get("backbone", 0.0),
        gmacs_head=parts.get("head", 0.0), params_m=rep.params, tokens_mean=_tokens(model, singles),
        flops_counter=rep.counter, flops_images=rep.images, flops_check_gmacs=check,
        flops_unsupported_ops=", ".join(rep.unsupported_ops), flops_uncounted_ops=", ".join(rep.uncounted_ops),
    )


class OtherLoad:
    """How many cores *other* processes kept busy during a ``with`` block: the system's busy CPU time minus this
    process's and its finished children's (the timing subprocess), per second of wall time.

    A load average would count this run's own training a minute earlier; this counts only the others."""

    cores: float = math.nan

    def __enter__(self) -> OtherLoad:
        import psutil

        self._sys, self._own, self._t = _busy(psutil.cpu_times()), _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        wall = time.perf_counter() - self._t
        if wall > 0:
            other = (_busy(psutil.cpu_times()) - self._sys) - (_own_cpu() - self._own)
            self.cores = max(0.0, other / wall)

    def busy(self, threads: int) -> bool:
        """Others competed with the timed threads: more than the idle cores, and at least a quarter of a core."""
        if math.isnan(self.cores):
            return False
        idle = max(0, (os.cpu_count() or 1) - int(threads))
        return self.cores > max(0.25, idle)


def _busy(t) -> float:
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + \
        getattr(t, "steal", 0.0)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(model: nn.Module, images: torch.Tensor, cfg: MeasureConfig, device: str = "cpu", threads: int = 1,
            what: str = "model", autocast: str = "none", reference: nn.Module | None = None) -> Measurement:
    """:func:`count`, then memory, latency (batch 1) and throughput (``cfg.throughput_batch``) in a fresh
    process (``cfg.isolate``; in this one otherwise, flagged in the result). ``autocast`` (the run's mixed
    precision) applies to the timed calls; MACs are counted on the float32 graph (the same multiply-adds).

    With a ``reference`` (the run's ``full``; the same object for ``full`` itself, an A/A timing that shows the
    noise floor) and ``cfg.paired``, speed is timed as a ratio to it, interleaved in the one process
    (:mod:`lwbench.measure.paired`), and its MACs are counted too, for ``gmac_ratio`` and ``conversion``."""
    from lwbench.measure.env import attention_backend
    from lwbench.measure.memory import release_cached_memory
    from lwbench.measure.worker import measure_all, measure_in_subprocess
    from lwbench.precision import wrap

    release_cached_memory()  # what training left in this process's CUDA cache, for the measuring worker
    flops = count(model, images, cfg, what)
    ref = ref_flops = None
    if reference is not None and cfg.paired:
        same = reference is model  # full against itself: one object, counted once
        ref_flops = flops if same else count(reference, images, cfg, f"{what} (reference)")
        ref = None if same else wrap(reference, autocast, device)
    model = wrap(model, autocast, device)
    if ref_flops is not None and ref is None:
        ref = model
    with OtherLoad() as load:
        if cfg.isolate:
            t = measure_in_subprocess(model, images, cfg, device=device, threads=int(threads), reference=ref)
        else:
            t = {**measure_all(model, images, cfg, device=device, threads=int(threads), reference=ref),
                 "isolated": False, "memory_exact": False}
    busy = load.busy(int(threads))
    if busy:
        log.warning("%s: other processes kept %.1f cores busy while it was timed (%d threads on %d cores); "
                    "its latency and throughput are suspect (row: machine_busy)", what, load.cores, int(threads),
                    os.cpu_count() or 1)
    return Measurement(
        **dataclasses.asdict(flops),
        latency_ms=float(t["latency_ms"]), latency_iqr_ms=float(t["latency_iqr_ms"]),
        latency_runs=int(t.get("latency_runs", 0)),
        throughput=float(t["throughput"]), throughput_iqr=float(t["throughput_iqr"]),
        throughput_batch=int(t["throughput_batch"]), throughput_runs=int(t.get("throughput_runs", 0)),
        peak_mem_mb=float(t["peak_memory_mb"]),
        mem_kind="cuda_allocated_growth" if device == "cuda" else "cpu_peak_rss_delta",
        memory_exact=bool(t.get("memory_exact", False)), measure_isolated=bool(t.get("isolated", False)),
        isolation_error=str(t.get("isolation_error", "")),
        measure_warmup=int(cfg.warmup), measure_min_run_time=float(cfg.min_run_time),
        measure_min_runs=int(cfg.min_runs), memory_batch=int(cfg.memory_batch), other_load=load.cores,
        machine_busy=busy, dtype=cfg.dtype, autocast=autocast, compile=cfg.compile,
        omp_wait_policy=str(t.get("omp_wait_policy", "")),
        **_speed_fields(t, flops, ref_flops),
        compile_time_s=float(t.get("compile_time_s", math.nan)),
        threads=int(threads), device=device, attention_backend=attention_backend(device),
    )


def _speed_fields(t: dict[str, Any], flops: FlopCount, ref: FlopCount | None) -> dict[str, Any]:
    """The paired-timing columns of a :class:`Measurement` from the timing result ``t`` (empty when unpaired)."""
    if ref is None or t.get("timing_protocol") != "paired":
        return {}
    ratio = ref.gmacs / flops.gmacs if flops.gmacs > 0 else math.nan
    keys = ("speedup", "speedup_ci_low", "speedup_ci_high", "reference_latency_ms", "throughput_speedup",
            "throughput_speedup_ci_low", "throughput_speedup_ci_high", "reference_throughput")
    out: dict[str, Any] = {k: float(t[k]) for k in keys}
    out.update(timing_protocol="paired", reference_gmacs=ref.gmacs, gmac_ratio=ratio,
               conversion=out["speedup"] / ratio, throughput_conversion=out["throughput_speedup"] / ratio,
               speedup_reliable=bool(t["speedup_reliable"]),
               throughput_speedup_reliable=bool(t["throughput_speedup_reliable"]),
               timing_rounds=int(t["timing_rounds"]), timing_batches=str(t["timing_batches"]),
               timing_quiet_rounds=int(t["timing_quiet_rounds"]), timing_contended=bool(t["timing_contended"]),
               attention_kernel=str(t["attention_kernel"]),
               reference_attention_kernel=str(t["reference_attention_kernel"]))
    return out


__all__ = ["FlopCount", "Measurement", "count", "measure", "FlopCountError"]
