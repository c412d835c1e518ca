"""The comparison protocol: regimes and equal fine-tuning, the effort columns of every row, intervals in
tables and plots, tied points, sweeps that train everything before timing anything, busy-machine detection."""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import time

import pandas as pd
import pytest
from test_cli import TINY

from lwbench.cli import main
from lwbench.config import resolve_config
from lwbench.errors import ConfigError
from lwbench.results import ResultStore
from lwbench.runner import Plan, resolve_regime
from lwbench.tables import aggregate_seeds, format_results, metric_cell, recipe_note


# -- regimes and effort ---------------------------------------------------------------------------------------
def test_auto_regime_is_off_the_shelf_only_for_training_free_methods():
    from lwbench.registry import get_method

    assert resolve_regime(get_method("tome"), "auto") == "off_the_shelf"
    assert resolve_regime(get_method("full"), "auto") == "off_the_shelf"
    assert resolve_regime(get_method("random"), "auto") == "finetuned"
    assert resolve_regime(get_method("tome"), "finetuned") == "finetuned"
    with pytest.raises(ConfigError, match="method 'dps' needs training.*use --regime finetuned"):
        resolve_regime(get_method("dps"), "off_the_shelf")


def _plan(method, regime="auto", **sets):
    items = [f"{k}={v}" for k, v in sets.items()]
    return Plan(resolve_config(method, "traffic_signs", sets=items, regime=regime, source="synthetic", quiet=True))


def test_every_method_gets_the_same_finetuning_recipe_and_the_row_says_so():
    """In the finetuned regime a training-free method, full included, and a trainable one fine-tune with the one
    train.* recipe; LookWhere's distillation counts as pretraining; off the shelf is no fine-tuning at all."""
    train = {"train.steps": 37, "train.lr": 1e-3}
    efforts = {m: _plan(m, "finetuned", **train).effort() for m in ("full", "tome", "evit", "random", "lookwhere")}
    recipes = {e["finetune_recipe"] for e in efforts.values()}
    assert recipes == {"steps=37 lr=0.001 batch=32 warmup=10"}, efforts
    assert all(e["finetune_steps"] == 37 and e["regime"] == "finetuned" for e in efforts.values())
    assert efforts["lookwhere"]["pretrain_steps"] == 400 and efforts["tome"]["pretrain_steps"] == 0
    assert all(e["teacher_steps"] == 2000 for e in efforts.values())  # the hard scenes' teacher (quick profile)
    off = _plan("tome", **train).effort()
    assert off == {"regime": "off_the_shelf", "init": "scratch", "teacher_steps": 2000, "teacher_probe_steps": 0,
                   "pretrain_steps": 0, "finetune_steps": 0, "finetune_recipe": "-"}
    # a method's own override is honoured and visible, so the comparison can say it is not equal-effort
    own = _plan("random", "finetuned", **train, **{"method.finetune.steps": 5}).effort()
    assert own["finetune_recipe"].startswith("steps=5 ")


def test_regimes_are_different_runs_of_one_teacher():
    off, ft = _plan("evit"), _plan("evit", "finetuned")
    assert off.run_id != ft.run_id and off.teacher_id == ft.teacher_id
    assert off.config["regime"] == "off_the_shelf" and ft.config["regime"] == "finetuned"


def test_finetuned_training_free_method_trains_and_off_the_shelf_does_not(tmp_path):
    """End to end (tiny): tome fine-tuned changes the model and records its steps; off the shelf it is the teacher's
    reduced forward, untrained, with interval columns on both rows."""
    for regime in ("off_the_shelf", "finetuned"):
        assert main(["run", "--method", "tome", "--task", "traffic_signs", "--budget", "r=2", "--regime", regime,
                     "--source", "synthetic", *TINY]) == 0
    rows = {r["regime"]: r for r in ResultStore(os.environ["LWBENCH_RESULTS"]).rows(method="tome")}
    assert rows["finetuned"]["finetune_steps"] == 2 and rows["finetuned"]["method_train_time_s"] > 0
    assert rows["off_the_shelf"]["finetune_steps"] == 0 and rows["off_the_shelf"]["method_train_time_s"] == 0
    for r in rows.values():
        assert r["bootstrap_resamples"] == 1000
        assert r["metric_ci_low"] <= r["metric_value"] <= r["metric_ci_high"]
        assert r["n_eval"] == 16 and isinstance(r["machine_busy"], bool) and r["other_load"] >= 0
        per_image = ResultStore(os.environ["LWBENCH_RESULTS"]).per_image(r)
        assert per_image["top1"].shape == (16,) and per_image["top1"].mean() * 100 == pytest.approx(r["top1"])


# -- sweeps ---------------------------------------------------------------------------------------------------
def test_sweep_expands_regimes_and_trains_everything_before_timing_anything(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lwbench.runner.train_only", lambda req: calls.append(("train", req.method, req.regime)))
    monkeypatch.setattr("lwbench.runner.run", lambda req: calls.append(("measure", req.method, req.regime)))
    path = tmp_path / "s.yaml"
    path.write_text("source: synthetic\ntasks: [traffic_signs]\nregimes: [off_the_shelf, finetuned]\n"
                    "methods:\n  full: null\n  random: [k=8]\n")
    from lwbench.sweeps import run_sweep

    flags = {"quiet": True}
    assert run_sweep(str(path), flags) == []
    points = [("full", "off_the_shelf"), ("full", "finetuned"), ("random", "finetuned")]  # random: no off-the-shelf
    assert calls == [("train", *p) for p in points] + [("measure", *p) for p in points]
    calls.clear()
    assert run_sweep(str(path), flags, phase="measure") == []
    assert [c[0] for c in calls] == ["measure"] * 3
    with pytest.raises(ConfigError, match="--phase must be one of"):
        run_sweep(str(path), flags, phase="timing")


def test_sweep_regimes_are_validated(tmp_path):
    from lwbench.sweeps import parse_spec

    with pytest.raises(ConfigError, match="regimes\\[0\\]: 'fine_tuned' is not one of .*did you mean 'finetuned'"):
        parse_spec({"tasks": ["traffic_signs"], "methods": {"full": None}, "regimes": ["fine_tuned"]}, "s.yaml")
    spec = parse_spec({"tasks": ["traffic_signs"], "methods": {"full": None}}, "s.yaml")
    assert spec.regimes == ["auto"]


# -- tables ---------------------------------------------------------------------------------------------------
def _rows():
    base = dict(task="traffic_signs", source="synthetic", metric="top1", teacher_id="t", budget="k=8", method="random",
                regime="finetuned", finetune_steps=100, finetune_recipe="steps=100 lr=0.0005 batch=32 warmup=10")
    return [dict(base, seed=s, metric_value=v, metric_ci_low=v - 1, metric_ci_high=v + 1, replicate_id="rep")
            for s, v in ((0, 90.0), (1, 92.0), (2, 94.0))]


def test_metric_cells_carry_the_interval_or_the_seed_spread():
    assert metric_cell({"metric_value": 94.12, "metric_ci_low": 93.2, "metric_ci_high": 95.0}) == "94.1 [93.2, 95.0]"
    assert metric_cell({"metric_value": 94.12}) == "94.1"
    agg = aggregate_seeds(pd.DataFrame(_rows()))
    assert len(agg) == 1 and agg.loc[0, "n_seeds"] == 3 and agg.loc[0, "seeds"] == "0,1,2"
    assert agg.loc[0, "metric_value"] == pytest.approx(92.0) and agg.loc[0, "metric_std"] == pytest.approx(2.0)
    assert metric_cell(agg.loc[0]) == "92.0 ± 2.0 (3 seeds)"
    text = format_results(pd.DataFrame(_rows()), "table")  # the terminal's: one decimal
    assert "92.0 ± 2.0 (3 seeds)" in text and "[95% CI]" in text and "regime" in text and "ft steps" in text
    assert "92.00 ± 2.00 (3 seeds)" in format_results(pd.DataFrame(_rows()), "md")


def test_tables_say_when_finetuned_rows_had_different_recipes():
    rows = _rows()[:1] + [dict(_rows()[0], method="lookwhere", replicate_id="other",
                               finetune_recipe="steps=900 lr=0.002 batch=32 warmup=10")]
    note = recipe_note(pd.DataFrame(rows))
    assert note.startswith("not equal-effort: fine-tuned with different recipes") and "steps=900" in note
    assert recipe_note(pd.DataFrame(_rows())) == ""
    text = format_results(pd.DataFrame(rows), "table")  # said once, as the recipe difference (lwbench.mixing)
    assert "note: rows differ in fine-tuning recipe: 1 row on ft steps=900 lr=0.002, 1 row on ft steps=100" in text
    assert "not equal-effort" not in text


# -- plots ----------------------------------------------------------------------------------------------------
def _plot_frame():
    rows = []
    spec = [("full", "-", 1.0, 95.0, "finetuned"), ("lookwhere", "k=8", 0.1, 94.5, "finetuned"),
            ("random", "k=8", 0.1, 80.0, "finetuned"), ("tome", "r=4", 0.5, 94.0, "off_the_shelf"),
            ("tome", "r=4", 0.5, 90.0, "finetuned")]
    for i, (m, b, g, acc, regime) in enumerate(spec):
        rows.append(dict(method=m, budget=b, budget_value=float(b.split("=")[1]) if "=" in b else math.nan,
                         task="traffic_signs", source="synthetic", metric="top1", metric_value=acc,
                         metric_ci_low=acc - 1.0, metric_ci_high=acc + 1.0, gmacs=g, latency_ms=g * 10,
                         peak_mem_mb=10.0, seed=0, device="cpu", device_name="Test CPU", threads=1,
                         replicate_id=f"r{i}", regime=regime, teacher_id="t",
                         finetune_recipe="-" if regime == "off_the_shelf" else "steps=100"))
    return pd.DataFrame(rows)


def test_pareto_draws_intervals_marks_ties_and_keeps_regimes_apart():
    from matplotlib.collections import LineCollection

    from lwbench.plots import pareto_figure

    fig = pareto_figure(_plot_frame(), "traffic_signs")
    ax = fig.axes[0]
    bars = sorted((round(float(a[0]), 3), float(a[1]), float(b[1])) for c in ax.collections
                  if isinstance(c, LineCollection) for a, b in c.get_segments())
    assert (0.1, 93.5, 95.5) in bars and len(bars) == 5  # every point has its 95% interval
    tied = [c for c in ax.collections if c.get_gid() == "tied_with_frontier"]
    # frontier: lookwhere (0.1, 94.5) and full (1.0, 95.0); tome off the shelf (0.5, 94 [93, 95]) overlaps
    # lookwhere's [93.5, 95.5]: tied; tome fine-tuned (90 [89, 91]) and random (80) are beaten
    assert len(tied) == 1 and tied[0].get_offsets().tolist() == [[0.5, 94.0]]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("tome (off the shelf)" in t for t in labels) and any(t.startswith("tome (r)") for t in labels)
    assert "95% bootstrap CI" in fig._suptitle.get_text()
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1  # the off-the-shelf line


# -- timing hygiene -------------------------------------------------------------------------------------------
def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_other_load_is_system_time_minus_this_process_and_its_children(monkeypatch):
    """Known answer with fake clocks: 3 s of busy system CPU in 1 s of wall, 1.5 s of it ours -> 1.5 other cores."""
    import psutil

    from lwbench.measure import contract

    clock = {"sys": 10.0, "own": 4.0, "wall": 100.0}
    monkeypatch.setattr(psutil, "cpu_times", lambda: argparse.Namespace(user=clock["sys"], system=0.0))
    monkeypatch.setattr(os, "times", lambda: argparse.Namespace(user=clock["own"], system=0.0, children_user=0.0,
                                                                 children_system=0.0))
    monkeypatch.setattr(contract.time, "perf_counter", lambda: clock["wall"])
    with contract.OtherLoad() as load:
        clock.update(sys=13.0, own=5.5, wall=101.0)
    assert load.cores == pytest.approx(1.5)


def test_other_load_sees_a_process_spinning_beside_it():
    from lwbench.measure.contract import OtherLoad

    proc = mp.get_context("spawn").Process(target=_spin, args=(3.0,))
    proc.start()
    time.sleep(1.0)  # let the child start spinning
    with OtherLoad() as other:
        time.sleep(1.0)
    proc.join()
    assert other.cores > 0.5, other.cores


def test_busy_rule_compares_other_load_with_the_idle_cores(monkeypatch):
    from lwbench.measure.contract import OtherLoad

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    load = OtherLoad()
    load.cores = 0.1
    assert not load.busy(4)  # noise
    load.cores = 1.0
    assert load.busy(4) and not load.busy(2)  # 2 of 4 cores idle: another job on one of them does not compete
    load.cores = math.nan
    assert not load.busy(4)


def test_run_seeds_expands_into_one_point_per_seed(capsys):
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--seeds", "0-2", "--source", "synthetic",
                 "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    replicates = {line.split("replicate id ")[1].split()[0] for line in out.splitlines() if "replicate id" in line}
    assert out.count("# run id") == 3 and len(replicates) == 1
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--seeds", "0,x", "--dry-run"]) == 2
    assert "--seeds must be a list like 0,1,2" in capsys.readouterr().err


def test_report_writes_rows_table_with_paired_differences_and_plots(tmp_path):
    for method, budget in (("full", []), ("tome", ["--budget", "r=2"])):
        assert main(["run", "--method", method, "--task", "traffic_signs", *budget, "--source", "synthetic",
                     *TINY]) == 0
    out = tmp_path / "report"
    assert main(["report", "--task", "traffic_signs", "--out", str(out), "--command-line", "lwbench sweep x"]) == 0
    # rows timed paired against full carry a speed-up: the report draws their conversion plot and tables them
    paired = bool(pd.read_csv(out / "rows.csv")["speedup"].notna().any())
    assert sorted(p.name for p in out.iterdir()) == [*(["conversion.png"] if paired else []), "pareto_gmacs.png",
                                                     "pareto_latency_ms.png", "rows.csv", "table.md"]
    text = (out / "table.md").read_text()
    assert ("speed-up bs1 [95% CI]" in text) == paired
    assert "lwbench sweep x" in text and "[95% CI]" in text and "difference to full [95% CI, paired]" in text
    pair = [line for line in text.splitlines() if line.startswith("| tome")][-1]
    assert "off_the_shelf" in pair and "[" in pair and pair.rstrip(" |").endswith("x")
    assert len(pd.read_csv(out / "rows.csv")) == 2
    from lwbench.report import write_report
    from lwbench.schema import ResultError

    with pytest.raises(ResultError, match="no results for task 'billiards'"):
        write_report(ResultStore(os.environ["LWBENCH_RESULTS"]), "billiards", out)
