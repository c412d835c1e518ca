"""The CUDA measurement path, where CUDA exists (``-m gpu``; skipped elsewhere). The one CPU test at the end
checks the out-of-memory back-off of the throughput batch without a GPU.

    python -m pytest -m gpu -q tests/test_gpu.py     # on a CUDA machine
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import lwbench
from lwbench.backbones import create_backbone
from lwbench.config import MeasureConfig
from lwbench.measure.latency import measure_latency, measure_throughput
from lwbench.measure.memory import measure_memory
from lwbench.measure.worker import measure_all

FAST = dict(warmup=2, min_run_time=0.2, min_runs=5)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n, size):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.gpu
@cuda
def test_cuda_latency_is_timed_with_events_around_every_call(monkeypatch):
    made = []
    real = torch.cuda.Event

    def event(*a, **kw):
        e = real(*a, **kw)
        made.append(e)
        return e

    monkeypatch.setattr(torch.cuda, "Event", event)
    r = measure_latency(create_backbone("lw_vit_test_p8", 32), _images(4, 32), "cuda", **FAST)
    assert r["latency_ms"] > 0 and r["latency_runs"] >= 5
    assert len(made) >= 2 * r["latency_runs"]  # a start and an end event per timed call


@pytest.mark.gpu
@cuda
def test_cuda_peak_memory_is_reset_per_point():
    big = measure_memory(create_backbone("lw_vit_nano_p16", 224), _images(8, 224), "cuda", batch_size=8)
    small = measure_memory(create_backbone("lw_vit_test_p8", 32), _images(1, 32), "cuda", batch_size=1)
    assert big["memory_method"] == small["memory_method"] == "cuda params + peak allocated growth (warm forward)"
    assert small["peak_memory_mb"] < big["peak_memory_mb"] / 4  # the big model's peak did not carry over
    assert big["peak_memory_mb"] == pytest.approx(big["param_mb"] + big["activation_mb"])


@pytest.mark.gpu
@cuda
def test_cuda_peak_memory_counts_neither_the_timing_images_nor_the_first_calls_workspaces():
    model = create_backbone("lw_vit_nano_p16", 224)
    many = measure_memory(model, _images(64, 224), "cuda", batch_size=2)  # 64 images: 38 MiB on the GPU before
    few = measure_memory(model, _images(2, 224), "cuda", batch_size=2)
    again = measure_memory(model, _images(2, 224), "cuda", batch_size=2)
    assert many["peak_memory_mb"] == pytest.approx(few["peak_memory_mb"], abs=1.0)
    assert few["peak_memory_mb"] == pytest.approx(again["peak_memory_mb"], abs=1.0)  # first or not: the same


@pytest.mark.gpu
@cuda
def test_release_cached_memory_gives_the_cache_back():
    from lwbench.measure.memory import release_cached_memory

    x = torch.empty(2**28, device="cuda")  # 1 GiB
    del x
    assert torch.cuda.memory_reserved() >= 2**30  # freed, but still cached by this process
    release_cached_memory()
    assert torch.cuda.memory_reserved() < 2**30


class _OutOfMemoryAbove(nn.Module):
    """Raises a real CUDA out-of-memory error for batches above ``limit``; records the memory allocated when each
    forward starts."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.lin = nn.Linear(3, 2)
        self.allocated_at_start: list[tuple[int, int]] = []

    def forward(self, x):
        self.allocated_at_start.append((x.shape[0], torch.cuda.memory_allocated()))
        if x.shape[0] > self.limit:
            torch.empty(2**45, dtype=torch.uint8, device=x.device)  # 32 TiB: out of memory on any GPU
        return self.lin(x.mean(dim=(2, 3)))


@pytest.mark.gpu
@cuda
def test_cuda_out_of_memory_frees_the_batch_before_the_smaller_one():
    model = _OutOfMemoryAbove(limit=64)
    r = measure_throughput(model, _images(4, 256), "cuda", batch_size=256, **FAST)  # 256 images: 192 MiB
    assert r["throughput_batch"] <= 64
    (big, at_big), (smaller, at_smaller) = model.allocated_at_start[:2]
    assert big == 256 and smaller < big
    # the 256-image batch is gone when the next one is built: less is allocated, not both batches
    assert at_smaller < at_big


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", lwbench.list_methods())
def test_every_method_runs_forward_and_backward_on_cuda(method):
    """What tests/test_fake_cuda.py checks on fake tensors, for real."""
    from lwbench.precision import wrap

    model = lwbench.create_model(method, "lw_vit_test_p8", (32, 48), None, num_classes=3).cuda()
    x = _images(2, 32).repeat(1, 1, 1, 2)[..., :48].cuda()
    for autocast in ("none", "bfloat16"):
        net = wrap(model, autocast, "cuda")
        with torch.inference_mode():
            assert net.eval()(x).shape == (2, 3)
        model.zero_grad()
        net.train()(x).float().square().mean().backward()
        assert any(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@cuda
def test_cuda_measure_all_with_bfloat16_and_compile():
    model = create_backbone("lw_vit_test_p8", 32)
    bf16 = MeasureConfig(throughput_batch=4, dtype="bfloat16", compile="default", **FAST)
    r = measure_all(model, _images(4, 32), bf16, device="cuda")
    assert r["device"] == "cuda" and r["dtype"] == "bfloat16" and r["compile_time_s"] > 0
    assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["peak_memory_mb"] > 0


@pytest.mark.gpu
@cuda
def test_cuda_run_writes_a_row_that_says_how_it_was_timed(tmp_path, monkeypatch):
    from test_cli import TINY

    from lwbench.cli import main

    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LWBENCH_RESULTS", str(tmp_path / "results"))
    assert main(["run", "--method", "lookwhere", "--task", "traffic_signs", "--device", "cuda", *TINY]) == 0
    import json

    row = json.loads(next(p for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json")
                          if not p.name.endswith("per_image.json")).read_text())
    assert row["device"] == "cuda" and row["mem_kind"] == "cuda_allocated_growth" and row["attention_backend"]
    assert row["cuda_version"] and row["compile"] == "none" and row["autocast"] == "none"
    # lwbench keeps PyTorch's numeric defaults and records them
    assert row["float32_matmul_precision"] == "highest" and row["allow_tf32"] is False
    assert row["cudnn_benchmark"] is False


class _RefusesBigBatches(nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``limit``, as a GPU would."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"batch {x.shape[0]} does not fit")
        return self.lin(x.mean(dim=(2, 3)))


def test_throughput_batch_backs_off_on_out_of_memory():
    r = measure_throughput(_RefusesBigBatches(limit=10), _images(4, 8), "cpu", batch_size=32, threads=1, **FAST)
    assert r["throughput_batch"] <= 10 and r["throughput"] > 0  # timm's decay_batch_step from 32 until it fits
    with pytest.raises(torch.cuda.OutOfMemoryError):
        measure_throughput(_RefusesBigBatches(limit=0), _images(4, 8), "cpu", batch_size=4, threads=1, **FAST)
