"""Paired timing (lwbench/measure/paired.py): known answers for the statistics, the protocol's structure on models
whose speed is known, the attention-kernel names, out-of-memory batches, and the row of a run."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from lwbench.measure import paired
from lwbench.measure.paired import (
    interval_is_reliable,
    kernels_of,
    measure_paired,
    median_ratio_interval,
    time_paired,
)


class Sleeper(nn.Module):
    """A model that takes ``seconds`` per call and records which input it saw."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.seen = seconds, []

    def forward(self, x):
        self.seen.append(float(x.flatten()[0]))
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return x.sum(dim=(1, 2, 3))


def test_median_ratio_interval_known_answers():
    assert median_ratio_interval([2.0] * 12) == (2.0, 2.0, 2.0)
    med, low, high = median_ratio_interval([1.0, 2.0, 3.0, 4.0, 5.0] * 4, seed=1)
    assert med == 3.0 and 1.0 <= low <= 3.0 <= high <= 5.0
    assert median_ratio_interval([1.7])[0] == 1.7  # one round: a value, no interval
    assert all(v != v for v in median_ratio_interval([])), "no rounds: NaN"


def test_reliability_rule():
    assert interval_is_reliable(2.0, 2.5) and not interval_is_reliable(2.0, 2.51)
    assert not interval_is_reliable(float("nan"), 2.0) and not interval_is_reliable(0.0, 1.0)


def test_a_model_twice_as_fast_is_two_times_faster_on_the_same_images():
    fast, slow = Sleeper(0.002), Sleeper(0.004)
    images = [torch.full((1, 1, 2, 2), float(i)) for i in range(5)]
    t = time_paired(fast, slow, images, torch.device("cpu"), threads=1, warmup=2, min_run_time=0.05, min_runs=8)
    assert t.ci_low <= t.speedup <= t.ci_high and 1.6 < t.speedup < 2.4, t
    assert t.rounds >= 8 and t.batch == 1 and t.ms < t.reference_ms
    # the timed blocks of a round cycle through the same images for both models
    timed = t.rounds * t.calls_per_block
    assert fast.seen[-timed:] == slow.seen[-timed:]


def test_rounds_grow_while_the_interval_is_too_wide(monkeypatch):
    """A noisy pair keeps being timed past min_runs until max_run_time, and says it stayed wide."""
    # one call per block (min_run_time / min_runs below the reference's 2 ms) and the model's time flipping from
    # pair to pair (the warm-up takes two calls): a pattern flipping from round to round would cancel in a pair
    noise = iter([0.001, 0.001, 0.004, 0.004] * 5_000)

    class Noisy(Sleeper):
        def forward(self, x):
            self.seconds = next(noise)
            return super().forward(x)

    t = time_paired(Noisy(0), Sleeper(0.002), [torch.zeros(1, 1, 2, 2)], torch.device("cpu"), warmup=2,
                    min_run_time=0.006, min_runs=6, max_run_time=0.5)
    assert t.rounds > 6 and 0.45 < t.seconds < 1.5


def test_kernel_names_known_answers():
    assert kernels_of({"aten::linear", "aten::_scaled_dot_product_flash_attention_for_cpu"}) == "cpu_flash"
    assert kernels_of({"aten::_scaled_dot_product_efficient_attention",
                       "aten::_scaled_dot_product_attention_math"}) == "efficient+math"
    assert kernels_of({"aten::bmm", "aten::_softmax"}) == "matmul"
    assert kernels_of({"aten::linear", "aten::gelu"}) == "none"
    # a whole T x T softmax beside SDPA (MCTF's fusing blocks): both kernels; one CLS row beside it (EViT): SDPA's
    flash_and_map = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::matmul", "aten::softmax"}
    assert kernels_of(flash_and_map, square_softmax=True) == "cpu_flash+matmul"
    assert kernels_of(flash_and_map, square_softmax=False) == "cpu_flash"


def test_the_kernel_that_ran_is_read_from_the_ops_dispatched():
    import lwbench

    vit = lwbench.create_model("full", "lw_vit_test_p8", (32, 48)).eval()
    assert paired.attention_kernels(vit, torch.rand(1, 3, 32, 48)) == "cpu_flash"

    class Unfused(nn.Module):  # attention written out as matmuls and a softmax
        def forward(self, x):
            q = x.flatten(2)
            return (q @ q.transpose(1, 2)).softmax(-1) @ q

    assert paired.attention_kernels(Unfused(), torch.rand(1, 3, 4, 4)) == "matmul"

    class Forced(nn.Module):  # SDPA, but only its unfused path allowed
        def forward(self, x):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            q = x.flatten(2)[:, None]
            with sdpa_kernel(SDPBackend.MATH):
                return nn.functional.scaled_dot_product_attention(q, q, q)

    assert paired.attention_kernels(Forced(), torch.rand(1, 3, 4, 4)) == "math"

    class FusedAndMap(nn.Module):  # a fused block and another that writes its T x T map out (MCTF's fusing blocks)
        def forward(self, x):
            q = x.flatten(2)[:, None]
            fused = nn.functional.scaled_dot_product_attention(q, q, q)
            return fused + ((q @ q.transpose(-1, -2)).softmax(-1) @ q)

    class FusedAndRow(nn.Module):  # a fused block and one CLS row of attention beside it (EViT)
        def forward(self, x):
            q = x.flatten(2)[:, None]
            fused = nn.functional.scaled_dot_product_attention(q, q, q)
            return fused.sum() + (q[..., :1, :] @ q.transpose(-1, -2)).softmax(-1).sum()

    assert paired.attention_kernels(FusedAndMap(), torch.rand(1, 3, 4, 4)) == "cpu_flash+matmul"
    assert paired.attention_kernels(FusedAndRow(), torch.rand(1, 3, 4, 4)) == "cpu_flash"


def test_an_out_of_memory_batch_is_reported_and_the_others_kept(monkeypatch):
    """Throughput's batch shrinks as timm's benchmark does; a further batch that does not fit says so."""

    class FakeOOM(Exception):
        pass

    monkeypatch.setattr(paired, "_oom_types", lambda: (FakeOOM,))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real = paired._time_batch

    def time_batch(model, reference, images, batch, device, **kw):
        if batch > 16:
            raise FakeOOM
        return real(model, reference, images, batch, device, **kw)

    monkeypatch.setattr(paired, "_time_batch", time_batch)
    a, b = Sleeper(0.0005), Sleeper(0.001)
    out = measure_paired(a, b, torch.rand(4, 1, 2, 2), torch.device("cpu"), warmup=1, min_run_time=0.01,
                         min_runs=3, throughput_batch=32, batches=(2, 64))
    per = json.loads(out["timing_batches"])
    assert out["throughput_batch"] < 32 and per["32"] == {"error": "out of memory"}
    assert per["64"] == {"error": "out of memory"} and per["2"]["speedup"] > 0 and per["1"]["speedup"] > 0
    assert str(out["throughput_batch"]) in per and per[str(out["throughput_batch"])]["rounds"] >= 1


def test_measure_all_pairs_with_a_reference_and_full_against_itself_is_about_one():
    from lwbench.config import MeasureConfig
    from lwbench.measure.worker import measure_all

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))
    quick = MeasureConfig(warmup=1, min_run_time=0.05, min_runs=5, throughput_batch=4)
    out = measure_all(model, torch.rand(4, 3, 4, 4), quick, threads=1, reference=model)
    assert out["timing_protocol"] == "paired" and out["attention_kernel"] == "none"
    assert 0.5 < out["speedup"] < 2.0 and out["speedup_ci_low"] <= out["speedup"] <= out["speedup_ci_high"]
    assert set(json.loads(out["timing_batches"])) == {"1", "4"}
    alone = measure_all(model, torch.rand(4, 3, 4, 4), MeasureConfig(warmup=1, min_run_time=0.05, min_runs=2,
                                                                      throughput_batch=4), threads=1)
    assert "speedup" not in alone and alone["latency_ms"] > 0


TINY = ["--img-size", "64x96", "--set", "teacher.steps=4", "--set", "teacher.batch_size=8", "--set", "eval.limit=16",
        "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=4", "--set", "measure.warmup=1",
        "--set", "measure.flops_images=2", "--set", "measure.isolate=false", "--set", "task.n_train=64",
        "--set", "task.n_test=16", "--set", "task.n_val=8", "--quiet"]


def test_a_row_carries_its_speedup_over_the_full_row_it_names(tmp_path):
    from lwbench.cli import main
    from lwbench.results import ResultStore

    results = tmp_path / "r"
    assert main(["run", "--method", "tome", "--task", "traffic_signs", "--budget", "r=2", *TINY,
                 "--results", str(results)]) == 0
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY, "--results", str(results)]) == 0
    rows = {r["method"]: r for r in ResultStore(results).rows()}
    tome, full = rows["tome"], rows["full"]
    assert tome["timing_protocol"] == "paired" and tome["reference_run_id"] == full["run_id"]
    assert full["reference_run_id"] == full["run_id"] and full["gmac_ratio"] == pytest.approx(1.0)
    assert tome["gmac_ratio"] == pytest.approx(full["gmacs"] / tome["gmacs"])
    assert tome["conversion"] == pytest.approx(tome["speedup"] / tome["gmac_ratio"])
    assert tome["speedup_ci_low"] <= tome["speedup"] <= tome["speedup_ci_high"]
    assert tome["attention_kernel"] == full["attention_kernel"] == "cpu_flash"
    assert set(json.loads(tome["timing_batches"])) == {"1", "4"}


def test_measure_paired_false_times_the_method_alone(tmp_path):
    from lwbench.cli import main
    from lwbench.results import ResultStore

    assert main(["run", "--method", "tome", "--task", "traffic_signs", "--budget", "r=2", *TINY,
                 "--set", "measure.paired=false", "--results", str(tmp_path)]) == 0
    (row,) = ResultStore(tmp_path).rows()
    assert row["timing_protocol"] == "" and row["reference_run_id"] == "" and row["speedup"] != row["speedup"]
    assert row["latency_ms"] > 0


def test_a_timing_interrupted_by_ctrl_c_writes_no_row(tmp_path, monkeypatch):
    from lwbench import runner
    from lwbench.cli import main
    from lwbench.results import ResultStore

    def interrupted(plan, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "measure_cost", interrupted)
    assert main(["run", "--method", "tome", "--task", "traffic_signs", "--budget", "r=2", *TINY,
                 "--results", str(tmp_path)]) == 130
    assert ResultStore(tmp_path).rows() == [] and not list(tmp_path.rglob("*.npz"))


class _Positional(nn.Module):
    """A model whose block time is known: ``seconds``, times ``second_factor`` when its block runs second in a
    round (the effect a warm cache or the allocator's state has on whichever model runs second)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        return x


def _positional_clock(monkeypatch, second_factor: float):
    """A fake clock: each block returns its model's seconds, scaled when it is the second block of a round (the
    warm-up blocks come in pairs too, so the parity holds)."""
    count = {"blocks": 0}

    def block(self, call, indices):
        model = next(c.cell_contents for c in call.__closure__ if isinstance(c.cell_contents, nn.Module))
        second = count["blocks"] % 2 == 1
        count["blocks"] += 1
        return model.seconds * (second_factor if second else 1.0)

    monkeypatch.setattr(paired._Clock, "block", block)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_block_faster_when_second_in_its_round_does_not_bias_the_speedup(monkeypatch, seed):
    """Balanced pairs (ABBA): a second block 10% faster cancels exactly, whatever the random orders. Drawn per
    round (the protocol before 2026-12-07), seed 0 put the reference first in 7 of 10 rounds and a model timed
    against itself read 1.04x at 518 px; here the same fake machine would read 1/0.9 or 0.9."""
    _positional_clock(monkeypatch, 0.9)
    m = _Positional(0.01)
    x = [torch.zeros(1, 1, 2, 2)]
    t = time_paired(m, m, x, torch.device("cpu"), threads=1, warmup=2, min_run_time=0.0, min_runs=10, seed=seed)
    assert t.speedup == pytest.approx(1.0, abs=1e-12) and t.ci_low == pytest.approx(1.0, abs=1e-12)
    assert t.rounds % 2 == 0 and t.rounds >= 10
    half = time_paired(_Positional(0.005), m, x, torch.device("cpu"), threads=1, warmup=2, min_run_time=0.0,
                       min_runs=7, seed=seed)
    assert half.speedup == pytest.approx(2.0, rel=1e-12) and half.rounds == 8  # 7 rounds -> 4 whole pairs


def test_pair_ratios_known_answers():
    assert paired.pair_ratios([2.0, 0.5, 4.0, 1.0, 9.0], [True, True, True, False, True]) == ([1.0, 2.0],
                                                                                              [True, False])


def test_a_throughput_batch_of_one_is_the_latency_pass_not_a_second_timing(monkeypatch):
    calls = []
    real = paired.time_paired

    def counting(*a, **k):
        calls.append(a[2][0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(paired, "time_paired", counting)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))
    out = measure_paired(model, model, torch.rand(3, 3, 4, 4), torch.device("cpu"), warmup=1, min_run_time=0.01,
                         min_runs=2, throughput_batch=1)
    assert calls == [1], "one paired timing at batch 1"
    assert set(json.loads(out["timing_batches"])) == {"1"} and out["throughput_batch"] == 1
    assert out["throughput_speedup"] == out["speedup"]
