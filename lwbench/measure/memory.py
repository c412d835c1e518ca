"""Peak inference memory of one forward pass.

What ``peak_memory_mb`` means (MiB, 2**20 bytes), on either device: the model's weights plus the
peak working memory of one ``inference_mode`` forward at ``memory_batch`` images (the growth over
what was resident just before it: weights and the input batch), i.e. what the model needs resident
to run, comparable across methods on the same device. Only the ``memory_batch`` images are moved
to the device, not the timing images.

- CUDA: weights + (``max_memory_allocated`` during the forward - ``memory_allocated`` just before
  it), after ``reset_peak_memory_stats``. These are the caching allocator's live tensors, not
  ``nvidia-smi``'s reserved memory. One untimed warm-up forward comes first, so that what the
  process's first forward allocates for good (cuBLAS/cuDNN workspaces, lazily built kernels'
  buffers) is resident before the measured one and not charged to the model. Until December 2026
  the CUDA number was the raw ``max_memory_allocated`` of the process's first forward, which also
  counted the whole image tensor moved to the device (the timing images), its batch copy and those
  workspaces; such rows have the same ``mem_kind`` and are told apart by ``git_sha`` only.
- CPU: parameter and buffer bytes plus the growth of the process's peak resident set size
  (RSS) during the forward, over its RSS just before it. The peak is read from ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs`` (Linux >= 4.0), so earlier peaks (building or
  loading the model) do not leak in. Without that reset the lifetime peak ``ru_maxrss`` is used,
  which is only right in a fresh process (hence :mod:`lwbench.measure.worker`); the result then
  says ``memory_exact: False`` when an earlier peak may hide the forward's.

On the CPU the torch runtime (thread pool, kernels' scratch buffers) is primed with a few tiny ops
first, so its one-off allocations are not charged to the first model measured, and the measured
forward is the first full-size one in the process on purpose: ``malloc`` keeps freed memory, so a
later forward would show almost no growth of the RSS. (CUDA's counters count live tensors, so
there a warm-up forward costs nothing.)

:func:`release_cached_memory` gives back what a process's CUDA caching allocator holds but no
tensor uses (a finished training's activations); the measurement calls it before measuring, so a
measuring subprocess on the same GPU is not short of memory that the parent merely keeps cached.
"""

from __future__ import annotations

import gc
import resource
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MIB = 2**20


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def prime_runtime(threads: int | None = None) -> None:
    """Tiny matmul / conv / attention / norm so one-off runtime allocations happen before measuring."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    with torch.inference_mode():
        a = torch.randn(64, 64)
        (a @ a).sum()
        F.conv2d(torch.randn(1, 3, 16, 16), torch.randn(8, 3, 4, 4), stride=4)
        q = torch.randn(1, 2, 8, 16)
        F.scaled_dot_product_attention(q, q, q)
        F.layer_norm(a, (64,))
        F.gelu(a)


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


def _current_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or restricted: /proc
        kb = _read_status_kb("VmRSS")
        return kb * 1024 if kb is not None else 0


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


def release_cached_memory() -> None:
    """Collect garbage and, where this process has initialised CUDA, return the caching allocator's unused blocks
    to the driver (``torch.cuda.empty_cache``), so that another process (the measuring worker) can have them.
    Never initialises CUDA itself."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _cuda_peak(model: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """``(allocated just before, peak during)`` a forward of ``model`` on ``x`` (both on ``device``), in bytes,
    after one untimed warm-up forward that leaves the process's one-off allocations resident."""
    with torch.inference_mode():
        model(x)  # warm-up: cuBLAS/cuDNN workspaces and other first-call allocations stay for the process
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device)


def measure_memory(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> dict[str, Any]:
    """Peak memory of one forward at ``batch_size`` (see the module docstring for the meaning)."""
    from lwbench.measure.latency import _fill_batch, _prepare, as_device

    device = as_device(device)
    # The batch is built where the images are and only it goes to the device (the timing images stay behind).
    model, x = _prepare(model, _fill_batch(images, int(batch_size)), device)
    weights = model_bytes(model)
    gc.collect()
    if device.type == "cuda":
        before, peak = _cuda_peak(model, x, device)
        growth = max(0, peak - before)
        return {
            "peak_memory_mb": (weights + growth) / MIB,
            "param_mb": weights / MIB,
            "activation_mb": growth / MIB,
            "memory_batch": int(batch_size),
            "memory_method": "cuda params + peak allocated growth (warm forward)",
            "memory_exact": True,
        }
    prime_runtime()
    gc.collect()
    reset = _reset_peak_rss()
    before = _current_rss()
    peak_before = _read_status_kb("VmHWM") * 1024 if reset else _ru_maxrss_bytes()
    with torch.inference_mode():
        model(x)
    if reset:
        peak = _read_status_kb("VmHWM") * 1024
        method = "cpu params + peak RSS growth (VmHWM reset)"
    else:
        peak = _ru_maxrss_bytes()
        method = "cpu params + peak RSS growth (ru_maxrss)"
    growth = max(0, peak - before)
    return {
        "peak_memory_mb": (weights + growth) / MIB,
        "param_mb": weights / MIB,
        "activation_mb": growth / MIB,
        "memory_batch": int(batch_size),
        "memory_method": method,
        # Without the reset an older, higher peak hides the forward's own: then growth is a lower bound.
        "memory_exact": bool(reset or peak > peak_before),
    }


__all__ = ["measure_memory", "model_bytes", "prime_runtime", "release_cached_memory", "MIB"]
