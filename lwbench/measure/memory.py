"""Peak inference memory of one forward pass.

What ``peak_memory_mb`` means (MiB, 2**20 bytes), on either device: the model's weights plus the
peak working memory of one ``inference_mode`` forward at ``memory_batch`` images, i.e. what the
model needs resident to run, comparable across methods on the same device.

- CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated`` around the forward. This is
  the caching allocator's peak of live tensors (weights, input, activations), not
  ``nvidia-smi``'s reserved memory.
- CPU: parameter and buffer bytes plus the growth of the process's peak resident set size
  (RSS) during the forward, over its RSS just before it. The peak is read from ``VmHWM`` after
  resetting it through ``/proc/self/clear_refs`` (Linux >= 4.0), so earlier peaks (building or
  loading the model) do not leak in. Without that reset the lifetime peak ``ru_maxrss`` is used,
  which is only right in a fresh process (hence :mod:`lwbench.measure.worker`); the result then
  says ``memory_exact: False`` when an earlier peak may hide the forward's.

The torch runtime (thread pool, kernels' scratch buffers) is primed with a few tiny ops first,
so its one-off allocations are not charged to the first model measured. The measured forward is
the first full-size one in the process on purpose: allocators keep freed memory, so a later
forward would show almost no growth.
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


def measure_memory(
    model: nn.Module,
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> dict[str, Any]:
    """Peak memory of one forward at ``batch_size`` (see the module docstring for the meaning)."""
    from lwbench.measure.latency import _fill_batch, _prepare, as_device

    device = as_device(device)
    model, images = _prepare(model, images, device)
    x = _fill_batch(images, int(batch_size))
    weights = model_bytes(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "peak_memory_mb": peak / MIB,
            "param_mb": weights / MIB,
            "memory_batch": int(batch_size),
            "memory_method": "cuda max_memory_allocated",
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


__all__ = ["measure_memory", "model_bytes", "prime_runtime", "MIB"]
