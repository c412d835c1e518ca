"""Latency, throughput, memory, the isolated worker and the environment record."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from torch import nn

from lwbench.backbones import create_backbone
from lwbench.config import MeasureConfig
from lwbench.measure import env as env_mod
from lwbench.measure.env import environment, git_info
from lwbench.measure.latency import measure_latency, measure_throughput
from lwbench.measure.memory import measure_memory, model_bytes
from lwbench.measure.worker import measure_all, measure_in_subprocess

FAST = dict(warmup=2, min_run_time=0.2, min_runs=5)


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_latency_is_stable_and_reports_spread():
    model = create_backbone("lw_vit_test_p8", 32)
    imgs = _images(4, 32)
    a = measure_latency(model, imgs, "cpu", threads=1, **FAST)
    b = measure_latency(model, imgs, "cpu", threads=1, **FAST)
    for r in (a, b):
        assert set(r) == {"latency_ms", "latency_iqr_ms", "latency_runs"}
        assert r["latency_ms"] > 0 and r["latency_iqr_ms"] >= 0 and r["latency_runs"] >= 5
    # Generous: the machine is shared with other jobs, but medians of the same model stay close.
    assert 0.33 < a["latency_ms"] / b["latency_ms"] < 3.0


def test_bigger_model_is_slower():
    small = measure_latency(create_backbone("lw_vit_test_p8", 32), _images(2, 32), "cpu", threads=1, **FAST)
    big = measure_latency(create_backbone("lw_vit_nano_p16", 128), _images(2, 128), "cpu", threads=1, **FAST)
    assert big["latency_ms"] > 3 * small["latency_ms"]


class _Recorder(nn.Module):
    """Remembers the batch shapes and the images it was given (by their first pixel)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: set[float] = set()
        self.batches: set[int] = set()
        self.grad_enabled: set[bool] = set()

    def forward(self, x):
        self.batches.add(x.shape[0])
        self.seen.update(float(v) for v in x[:, 0, 0, 0])
        self.grad_enabled.add(torch.is_grad_enabled())
        return self.fc(x[:, 0, 0, :4])


def test_latency_cycles_real_images_at_batch_1_in_inference_mode():
    imgs = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous()
    rec = _Recorder().train()
    measure_latency(rec, imgs, "cpu", threads=1, **FAST)
    assert rec.batches == {1}
    assert rec.seen == {0.0, 1.0, 2.0, 3.0, 4.0}  # every given image, not one image and not noise
    assert rec.grad_enabled == {False} and not rec.training


def test_throughput_fills_the_batch_from_the_given_images():
    imgs = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 3, 4, 4).contiguous()
    rec = _Recorder()
    r = measure_throughput(rec, imgs, "cpu", batch_size=8, threads=1, **FAST)
    assert rec.batches == {8} and rec.seen == {0.0, 1.0, 2.0}
    assert r["throughput_batch"] == 8 and r["throughput"] > 0 and r["throughput_iqr"] >= 0


def test_cpu_path_never_touches_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA API called on the CPU path")

    for name in ("is_available", "synchronize", "Event", "get_device_name", "reset_peak_memory_stats",
                 "max_memory_allocated", "empty_cache", "device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, boom)
    model = create_backbone("lw_vit_test_p8", 32)
    r = measure_all(model, _images(2, 32), MeasureConfig(throughput_batch=2, **FAST), threads=1)
    assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["peak_memory_mb"] > 0
    assert environment("cpu")["device_name"]


def test_memory_counts_weights_plus_growth():
    model = create_backbone("lw_vit_test_p8", 32)
    r = measure_memory(model, _images(1, 32), "cpu")
    assert r["param_mb"] == pytest.approx(model_bytes(model) / 2**20)
    assert r["peak_memory_mb"] == pytest.approx(r["param_mb"] + r["activation_mb"])
    assert r["activation_mb"] >= 0 and r["memory_batch"] == 1


def test_subprocess_worker_returns_the_same_fields_isolated():
    model = create_backbone("lw_vit_test_p8", 32)
    imgs = _images(3, 32)
    quick = MeasureConfig(throughput_batch=4, **FAST)
    iso = measure_in_subprocess(model, imgs, quick, threads=1)
    local = measure_all(create_backbone("lw_vit_test_p8", 32), imgs, quick, threads=1)
    assert iso["isolated"] is True
    assert set(local) <= set(iso)
    assert iso["throughput_batch"] == 4 and iso["threads"] == 1 and iso["dtype"] == "float32"
    assert iso["latency_ms"] > 0 and iso["throughput"] > 0
    # A fresh process: the forward's own peak is visible, on top of the weights.
    assert iso["memory_exact"] is True and iso["peak_memory_mb"] > iso["param_mb"] > 0


class _Unpicklable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fn = lambda t: t  # lambdas cannot be pickled

    def forward(self, x):
        return self.fc(self.fn(x[:, 0, 0, :4]))


def test_subprocess_falls_back_in_process_and_says_so(capsys):
    quick = MeasureConfig(throughput_batch=2, **FAST)
    r = measure_in_subprocess(_Unpicklable(), torch.rand(2, 3, 4, 4), quick, threads=1)
    assert r["isolated"] is False and r["isolation_error"]
    assert r["latency_ms"] > 0 and r["memory_exact"] is False
    assert "isolated measurement failed" in capsys.readouterr().err


def test_environment_records_versions_and_this_checkout(monkeypatch, tmp_path):
    e = environment("cpu", threads=2)
    for key in ("device_name", "torch_version", "timm_version", "threads", "dtype", "attention_backend",
                "machine_id", "git_sha", "git_dirty"):
        assert key in e
    assert e["threads"] == 2 and e["dtype"] == "float32" and e["torch_version"] == torch.__version__
    assert e["attention_backend"].startswith("sdpa")
    assert re.fullmatch(r"[0-9a-f]{12}", e["machine_id"])
    assert re.fullmatch(r"[0-9a-f]{40}", e["git_sha"]) and isinstance(e["git_dirty"], bool)
    # git runs in the package's directory, not the current one (tmp_path is not a checkout).
    monkeypatch.chdir(tmp_path)
    git_info.cache_clear()
    sha = git_info()["git_sha"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=env_mod.PACKAGE_DIR, capture_output=True, text=True)
    assert sha == head.stdout.strip()


def test_git_info_is_none_outside_a_checkout(monkeypatch, tmp_path):
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(env_mod, "PACKAGE_DIR", tmp_path)
    git_info.cache_clear()
    try:
        assert git_info() == {"git_sha": None, "git_dirty": None}
    finally:
        git_info.cache_clear()


def test_compiled_timing_is_its_own_measurement(monkeypatch):
    """measure.compile: the timed model is torch.compile'd after the (eager) memory pass and compiled for both
    timed shapes before any timed call; its compile time is reported apart, and eager runs never touch it."""
    calls = []
    real = torch.compile

    def spy(model, mode=None, **kw):
        calls.append(mode)
        return real(model, mode=mode, backend="eager", **kw)  # dynamo's graph capture without a C++ build

    monkeypatch.setattr(torch, "compile", spy)
    model = create_backbone("lw_vit_test_p8", 32)
    eager = measure_all(model, _images(2, 32), MeasureConfig(throughput_batch=2, **FAST), threads=1)
    assert calls == [] and "compile_time_s" not in eager
    r = measure_all(model, _images(2, 32), MeasureConfig(throughput_batch=2, compile="max-autotune", **FAST), threads=1)
    assert calls == ["max-autotune"] and r["compile_time_s"] > 0 and r["latency_ms"] > 0 and r["throughput"] > 0
    measure_all(model, _images(2, 32), MeasureConfig(throughput_batch=2, compile="default", **FAST), threads=1)
    assert calls[-1] is None  # torch.compile's own default mode


def test_compile_mode_enters_the_run_id_only_when_set():
    from lwbench.config import resolve_config
    from lwbench.runner import Plan

    def rid(*sets):
        return Plan(resolve_config("full", "traffic_signs", None, profile="quick", sets=list(sets))).run_id

    assert rid() == rid("measure.compile=none")  # every row before the option existed keeps its id
    assert rid("measure.compile=default") != rid() != rid("measure.compile=max-autotune")
    with pytest.raises(Exception, match="compile"):
        rid("measure.compile=fast")


_TIMED_PLUGIN = '''
from torch import nn


class PluginModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x[:, 0, 0, :4])
'''


def test_a_plugin_file_model_is_timed_in_the_isolated_worker(tmp_path, capsys):
    """A method from ``--plugin FILE.py`` lives in a module only the parent had imported: the worker loads the same
    plugin files, so it is timed in a fresh process like a built-in (not in-process, with other memory)."""
    import sys

    from lwbench.registry import METHODS

    path = tmp_path / "timed_plugin.py"
    path.write_text(_TIMED_PLUGIN)
    METHODS.load_module(str(path))
    module = next(m for name, m in sys.modules.items() if name.startswith("lwbench_plugin_timed_plugin_"))
    quick = MeasureConfig(throughput_batch=2, **FAST)
    r = measure_in_subprocess(module.PluginModel(), torch.rand(2, 3, 4, 4), quick, threads=1)
    assert r["isolated"] is True, r.get("isolation_error")
    assert "isolated measurement failed" not in capsys.readouterr().err


def test_cpu_timing_prints_no_cuda_runtime_notice(tmp_path):
    """torch.utils.benchmark imports torch.utils.cpp_extension, which logs "No CUDA runtime is found, using
    CUDA_HOME=..." on a machine with a CUDA toolkit and no GPU: noise in every timing process of a CPU run."""
    import os
    import sys

    code = ("import torch\nfrom lwbench.measure.latency import measure_latency\n"
            "measure_latency(torch.nn.Linear(4, 4), torch.rand(2, 4), 'cpu', threads=1, warmup=1, min_run_time=0.01, "
            "min_runs=1)\nprint('timed')\n")
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}  # a toolkit, no usable GPU
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "timed" in proc.stdout, proc.stderr
    assert "No CUDA runtime" not in proc.stderr
