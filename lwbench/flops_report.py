"""``lwbench flops``: GMACs of one method at one budget on a randomly initialised backbone, and optionally its
latency paired with ``full``, without a task or a training run.

The model is the one :func:`lwbench.create_model` gives (:mod:`lwbench.models`); it is counted by the same rule as
``lwbench run`` (:func:`lwbench.measure.contract.count`) and timed by the same contract
(:func:`lwbench.measure.contract.measure`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lwbench.measure.flops import closed_form_for
from lwbench.models import build_model


def random_model(method: str, backbone: str, img_size, budget: str | None = None, num_classes: int = 1000,
                 opts: Any = None, seed: int = 0):
    """``(TaskModel, Method, vit, (H, W))``: ``method`` at ``budget`` around a backbone initialised from ``seed``."""
    built = build_model(method, backbone, img_size, budget, num_classes, opts=opts, seed=seed)
    return built.model, built.method, built.vit, built.hw


def flops_report(
    method: str,
    backbone: str,
    img_size,
    budget: str | None = None,
    num_classes: int = 1000,
    opts: dict[str, Any] | None = None,
    images: torch.Tensor | None = None,
    seed: int = 0,
    cross_check: bool = True,
    measure: Any = None,
) -> dict[str, Any]:
    """GMACs of ``method`` at ``budget`` on a randomly initialised ``backbone`` at ``img_size``.

    Weights do not change the count of a static method; for data-dependent ones pass real
    ``images`` (averaged at batch 1), otherwise one random image (seeded) is used.

    ``closed_form_gmacs`` is the plain backbone + the same classifier head at this size: the
    ``full`` method equals it exactly, and it is the reference the savings are relative to.

    Raises:
        FlopCountError: when the torch counter sees more than 1 % more work than fvcore: an op
            carries work fvcore has no formula for, and the number would be silently low.
    """
    from lwbench.config import MeasureConfig
    from lwbench.measure.contract import count

    model, m, vit, hw = random_model(method, backbone, img_size, budget, num_classes, opts, seed)
    if images is None:
        images = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(seed))
    # the same counting and the same refusal rule as `lwbench run` (lwbench/measure/contract.py)
    cfg = measure or MeasureConfig(flops_images=images.shape[0], flop_tolerance=0.01 if cross_check else math.inf)
    c = count(model, images, cfg, what=method)
    out: dict[str, Any] = {
        "method": method,
        "backbone": backbone,
        "img_size": list(hw),
        "budget": m.budget_str(),
        "gmacs": c.gmacs,
        "params_m": c.params_m,
        "parts_gmacs": {"backbone": c.gmacs_backbone, "overhead": c.gmacs_overhead, "head": c.gmacs_head},
        "tokens": c.tokens_mean,
        "closed_form_gmacs": closed_form_for(vit, hw, num_classes=num_classes) / 1e9,
        "unsupported_ops": [o for o in c.flops_unsupported_ops.split(", ") if o],
        "uncounted_ops": [o for o in c.flops_uncounted_ops.split(", ") if o],
        "images": c.flops_images,
        "counter": c.flops_counter,
    }
    if math.isfinite(c.flops_check_gmacs):
        out["torch_counter_gmacs"] = c.flops_check_gmacs
    return out


def _g(v: float) -> str:
    return f"{v:.2f}" if v >= 100 else f"{v:.4g}"


def format_flops_report(d: dict[str, Any]) -> str:
    """A small table for ``lwbench flops``: total, its overhead/head/backbone split, and the plain backbone."""
    from tabulate import tabulate

    h, w = d["img_size"]
    full = d.get("closed_form_gmacs") or float("nan")

    def row(label: str, v: float) -> list[str]:
        return [label, _g(v), f"{100 * v / full:.1f}%"]

    rows = [row("total", d["gmacs"])]
    rows += [row(f"  {part}", d["parts_gmacs"].get(part, 0.0)) for part in ("backbone", "overhead", "head")]
    rows.append(row("plain backbone (closed form)", full))
    mean = f" (mean over {d['images']} images)" if d.get("images", 1) > 1 else ""
    lines = [
        f"{d['method']} {d['budget']} on {d['backbone']} at {h}x{w}: {d['params_m']:.2f} M params, "
        f"{d['tokens']:.1f} patch tokens{mean}",
        tabulate(rows, headers=["part", "GMACs (multiply-accumulates)", "of plain"],
                 colalign=("left", "right", "right")),
    ]
    if d.get("counter", "fvcore") != "fvcore":
        lines.append(f"counted with {d['counter']} (fvcore could not trace this model)")
    if d.get("unsupported_ops"):
        lines.append("warning: ops with no MAC formula (count may be low): " + ", ".join(d["unsupported_ops"]))
    if d.get("uncounted_ops"):
        names = ", ".join(o.split("::")[-1] for o in d["uncounted_ops"])
        lines.append(f"not counted (elementwise, by convention): {names}")
    return "\n".join(lines)


def random_weight_timing(method: str, backbone: str, img_size, budget: str | None = None, opts: Any = None,
                         batch: int = 8, threads: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Latency/throughput of the random-weight model on seeded random images, in a fresh process, paired with
    ``full`` on the same random backbone. For comparing budgets of one method on one backbone; ``lwbench run``
    times real task images."""
    import os

    from lwbench.config import MeasureConfig
    from lwbench.measure.contract import measure
    from lwbench.runner import resolve_device

    model, _, _, hw = random_model(method, backbone, img_size, budget, opts=opts)
    # the reference: `full` on the same random backbone, timed paired with the method (lwbench/measure/paired.py)
    reference = model if method == "full" else random_model("full", backbone, hw)[0]
    images = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    threads = threads or os.cpu_count() or 1
    device = resolve_device(device)
    m = measure(model, images, MeasureConfig(throughput_batch=batch, flops_images=1), device=device,
                threads=threads, what=method, reference=reference)
    keep = ("latency_ms", "latency_iqr_ms", "throughput", "throughput_iqr", "throughput_batch", "peak_mem_mb",
            "speedup", "speedup_ci_low", "speedup_ci_high", "speedup_reliable", "throughput_speedup",
            "throughput_speedup_ci_low", "throughput_speedup_ci_high", "gmac_ratio", "conversion",
            "attention_kernel", "reference_latency_ms")
    return {**{k: getattr(m, k) for k in keep}, "peak_memory_mb": m.peak_mem_mb, "threads": threads, "device": device}


__all__ = ["flops_report", "format_flops_report", "random_model", "random_weight_timing"]
