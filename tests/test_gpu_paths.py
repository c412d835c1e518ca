"""The CUDA code paths of training and measurement, checked on the CPU: ``torch.cuda`` and ``torch.distributed``
are replaced by recorders, so these run in the default suite and fail on a machine without a GPU when the CUDA
path is wrong (``tests/test_gpu.py`` runs the same paths for real, ``-m gpu``)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from lwbench.measure import latency, memory


# -- 1. the process group joins with the rank's GPU already current ------------------------------------------------
@pytest.fixture
def recorded_init(monkeypatch):
    import torch.distributed as dist

    calls: list[tuple] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append(("init_process_group", a, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    return calls


def test_nccl_sets_the_local_device_before_joining_and_names_it(recorded_init):
    from lwbench.training.distributed import init_from_env

    init_from_env("cuda")
    assert [c[0] for c in recorded_init] == ["set_device", "init_process_group"]
    assert recorded_init[0][1] in (1, torch.device("cuda", 1))
    _, args, kw = recorded_init[1]
    assert (args[:1] or (kw.get("backend"),)) == ("nccl",)
    assert kw.get("device_id") == torch.device("cuda", 1)  # NCCL's communicator is formed now, on this GPU


def test_gloo_touches_no_gpu(recorded_init):
    from lwbench.training.distributed import init_from_env

    init_from_env("cpu")
    assert [c[0] for c in recorded_init] == ["init_process_group"]
    _, args, kw = recorded_init[0]
    assert (args[:1] or (kw.get("backend"),)) == ("gloo",) and kw.get("device_id") is None


# -- 2. peak memory on CUDA: the memory batch alone, after a warm-up forward ---------------------------------------
class _Allocator:
    """``torch.cuda``'s allocator statistics, kept by hand: the model's forward calls :meth:`forward_allocates`."""

    def __init__(self, resident: int):
        self.now = self.peak = resident
        self.events: list[str] = []
        self.forwards = 0

    def alloc(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def forward_allocates(self, workspace: int, activations: int) -> None:
        if self.forwards == 0:  # the process's first forward: cuBLAS/cuDNN workspaces, kept for the process
            self.alloc(workspace)
        self.forwards += 1
        self.events.append("forward")
        self.alloc(activations)
        self.alloc(-activations)

    def install(self, monkeypatch) -> None:
        def reset(*a, **kw):
            self.events.append("reset")
            self.peak = self.now

        def allocated(*a, **kw):
            self.events.append("allocated")
            return self.now

        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **kw: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **kw: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)


class _Metered(nn.Module):
    def __init__(self, allocator: _Allocator, workspace: int, activations: int):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.allocator, self.workspace, self.activations = allocator, workspace, activations

    def forward(self, x):
        self.allocator.forward_allocates(self.workspace, self.activations)
        return self.lin(x.mean(dim=(2, 3)))


def test_cuda_peak_is_weights_plus_a_warm_forwards_growth_on_the_memory_batch(monkeypatch):
    mib = memory.MIB
    alloc = _Allocator(resident=100 * mib)  # weights, the batch, whatever else the process holds
    alloc.install(monkeypatch)
    moved: list[tuple[int, ...]] = []

    def place(model, images, device):  # stands in for the move to the GPU, which needs one
        moved.append(tuple(images.shape))
        return model.eval(), images

    monkeypatch.setattr(latency, "_prepare", place)
    model = _Metered(alloc, workspace=40 * mib, activations=7 * mib)
    r = memory.measure_memory(model, torch.rand(32, 3, 8, 8), "cuda", batch_size=4)
    assert moved == [(4, 3, 8, 8)]  # the memory batch, not the 32 timing images (nor both)
    assert alloc.events.index("forward") < alloc.events.index("reset")  # warmed up before the peak is reset
    assert alloc.events[alloc.events.index("reset"):] == ["reset", "allocated", "forward"]
    weights = memory.model_bytes(model)
    assert r["peak_memory_mb"] == pytest.approx((weights + 7 * mib) / mib)  # no workspace, no resident rest
    assert r["activation_mb"] == pytest.approx(7) and r["param_mb"] == pytest.approx(weights / mib)
    assert r["memory_batch"] == 4 and r["memory_exact"] is True


# -- 3. the parent gives its cached CUDA memory back before a point is measured ------------------------------------
def test_release_cached_memory_empties_the_cache_only_where_cuda_runs(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    memory.release_cached_memory()
    assert emptied == []  # never initialises CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    memory.release_cached_memory()
    assert emptied == [True]


def test_measure_releases_cached_memory_first(monkeypatch):
    from lwbench.config import MeasureConfig
    from lwbench.measure import contract

    class Released(Exception):
        pass

    def release():
        raise Released

    def count(*a, **kw):
        raise AssertionError("counted before the cache was released")

    monkeypatch.setattr(memory, "release_cached_memory", release)
    monkeypatch.setattr(contract, "count", count)
    with pytest.raises(Released):
        contract.measure(nn.Linear(2, 2), torch.rand(1, 3, 8, 8), MeasureConfig())


# -- 4. TF32 and cudnn.benchmark are recorded ----------------------------------------------------------------------
def test_rows_record_tf32_and_cudnn_benchmark(monkeypatch):
    from lwbench.measure.env import environment
    from lwbench.schema import FIELDS

    e = environment("cpu")
    assert e["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert e["allow_tf32"] is torch.backends.cuda.matmul.allow_tf32
    assert e["cudnn_benchmark"] is torch.backends.cudnn.benchmark
    declared = {name: kind for name, kind, _ in FIELDS}
    assert (declared["float32_matmul_precision"], declared["allow_tf32"], declared["cudnn_benchmark"]) == \
        ("str", "bool", "bool")
    names = [name for name, _, _ in FIELDS]
    at = names.index("attention_backend")
    assert names[at + 1: at + 4] == ["float32_matmul_precision", "allow_tf32", "cudnn_benchmark"]
    # what the user set is what the row says (lwbench itself changes neither)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        e = environment("cpu")
    finally:
        torch.set_float32_matmul_precision(old)
    assert e["float32_matmul_precision"] == "high" and e["allow_tf32"] is True and e["cudnn_benchmark"] is True


# -- 5. torch.compile sees every timed shape before the timing -----------------------------------------------------
def test_compile_is_warmed_on_every_image_and_the_throughput_batch(monkeypatch):
    from lwbench.config import MeasureConfig
    from lwbench.measure.worker import _compiled

    seen: list[torch.Tensor] = []

    def fake_compile(model, **kw):
        def run(x):
            seen.append(x.detach().clone())
            return model(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = torch.rand(5, 3, 8, 8)
    o = MeasureConfig(compile="default", throughput_batch=3)
    _compiled(nn.Conv2d(3, 2, 8), images, torch.device("cpu"), o)
    singles = [x for x in seen if x.shape[0] == 1]
    for i in range(images.shape[0]):  # content-adaptive methods change their token counts image by image
        assert any(torch.equal(x, images[i: i + 1]) for x in singles), f"image {i} was first seen while timed"
    assert any(x.shape[0] == 3 for x in seen)


# -- 6. an out-of-memory throughput batch is freed before the smaller one is tried ---------------------------------
def test_out_of_memory_batch_is_freed_before_the_retry(monkeypatch):
    batches: list[weakref.ref] = []

    class Keep(nn.Module):
        def forward(self, x):
            if not any(r() is x for r in batches):
                batches.append(weakref.ref(x))
            return x.sum()

    state = {"calls": 0}
    alive_at_empty_cache: list[bool] = []

    def fake_time(step, *args):
        state["calls"] += 1
        step()
        if state["calls"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [0.01] * 5

    def empty_cache():
        alive_at_empty_cache.append(batches[0]() is not None)

    monkeypatch.setattr(latency, "_time", fake_time)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    # Only reference counting may free the batch (a reference cycle would need a collection that may not come).
    monkeypatch.setattr(gc, "collect", lambda *a: 0)
    gc.disable()
    try:
        r = latency.measure_throughput(Keep(), torch.rand(4, 3, 8, 8), "cpu", batch_size=32)
    finally:
        gc.enable()
    assert r["throughput_batch"] < 32 and state["calls"] == 2
    assert alive_at_empty_cache == [False]  # the 32-image batch was gone when the cache was emptied
