"""End-to-end CLI on tiny configs: run -> results -> plot, skipping, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from lwbench.cli import main

TINY = ["--img-size", "64x96", "--set", "teacher.steps=4", "--set", "teacher.batch_size=8",
        "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "eval.limit=16",
        "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=4",
        "--set", "measure.warmup=1", "--set", "measure.flops_images=2", "--set", "measure.isolate=false",
        "--set", "task.n_train=64", "--set", "task.n_test=16", "--set", "task.n_val=8", "--quiet"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lwbench: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_run_results_plot_roundtrip(capsys, tmp_path):
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY]) == 0
    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=6", *TINY]) == 0
    assert main(["run", "--method", "lowres", "--task", "traffic_signs", "--budget", "size=32", *TINY]) == 0
    capsys.readouterr()
    rows = list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    assert len(rows) == 3
    row = json.loads(rows[0].read_text())
    for key in ("gmacs", "latency_ms", "throughput", "peak_mem_mb", "source", "git_sha", "metric_value"):
        assert key in row
    assert row["source"] == "synthetic"

    assert main(["results", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    df = pd.read_csv(__import__("io").StringIO(csv))
    assert set(df["method"]) == {"full", "random", "lowres"}
    full = df[df.method == "full"].iloc[0]
    rnd = df[df.method == "random"].iloc[0]
    assert rnd.gmacs < full.gmacs and rnd.tokens_mean == 6 and full.tokens_mean == 24

    out = tmp_path / "p.png"
    assert main(["plot", "pareto", "--task", "traffic_signs", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000

    # a finished config is skipped (no new file, same row), --force reruns it
    mtime = rows[0].stat().st_mtime_ns
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY]) == 0
    assert len(list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))) == 3
    assert rows[0].stat().st_mtime_ns == mtime


def test_unknown_method_one_line(capsys):
    assert main(["run", "--method", "lookwher", "--task", "traffic_signs"]) == 2
    line = _one_line_error(capsys)
    assert "unknown method 'lookwher'" in line and "Known:" in line and "full" in line


def test_unknown_task_and_backbone(capsys):
    assert main(["run", "--method", "full", "--task", "trafic_signs"]) == 2
    assert "Did you mean: traffic_signs" in _one_line_error(capsys)
    assert main(["flops", "--method", "full", "--backbone", "vit_tiny_patch16_22", "--img-size", "224"]) == 2
    assert "unknown backbone" in _one_line_error(capsys)


def test_impossible_budget_fails_before_any_training(capsys):
    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=100000", *TINY]) == 2
    assert "valid: k=1..24" in _one_line_error(capsys)
    assert not (Path(os.environ["LWBENCH_CACHE"]) / "teachers").exists()


def test_image_size_not_divisible(capsys):
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--img-size", "100x96"]) == 2
    assert "not divisible by the patch size 16" in _one_line_error(capsys)


def test_source_real_without_data_names_layout(capsys, tmp_path):
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--source", "real",
                 "--data-root", str(tmp_path)]) == 2
    line = _one_line_error(capsys)
    assert "annotations.txt" in line and "Set1" in line


def test_flops_json(capsys):
    assert main(["flops", "--method", "full", "--backbone", "lw_vit_test_p8", "--img-size", "32x48", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["gmacs"] > 0 and rep["params_m"] > 0


def test_bad_set_and_option(capsys):
    assert main(["run", "--method", "random", "--task", "traffic_signs", "--set", "method.nope=1"]) == 2
    assert "unknown key 'method.nope'" in _one_line_error(capsys)


@pytest.mark.parametrize("argv", [["list", "methods"], ["list", "tasks"]])
def test_list(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("lookwhere" in out and "budget" in out) if argv[1] == "methods" else ("traffic_signs" in out)


def test_list_methods_labels_what_each_method_needs_within_120_columns(capsys):
    """Training, attention map, token count and dense output, read from the classes (lwbench.labels), in a listing
    that fits 120 columns, descriptions included."""
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split() == ["method", "kind", "training", "budget", "sweep", "grid", "attn", "map", "tokens",
                                "dense"]
    rows = {ln.split()[0]: ln for ln in table[2:]}
    assert "training-free" in rows["evit"] and " CLS row " in rows["evit"] and " fixed " in rows["evit"]
    assert " per image " in rows["ats"] and " full map " in rows["mctf"]
    assert "pretrain+finetune" in rows["lookwhere"] and " no " in rows["tome"]
    assert rows["tome"].split()[-1] == "yes"  # dense
    assert "Token Merging: r patch tokens" in out  # the descriptions follow the table
    assert max(len(ln) for ln in out.splitlines()) <= 120


def test_list_methods_shows_the_budgets_a_run_of_that_profile_and_task_uses(capsys):
    """The listed default is what `lwbench run --method M --task T` (no --budget) runs, for the profile and task
    asked for, so quick users no longer read the paper's ViT-B/14 grid."""
    from lwbench.config import resolve_config
    from lwbench.runner import Plan

    def listed(*extra):
        assert main(["list", "methods", *extra]) == 0
        out = capsys.readouterr().out
        table = out.split("\n\n")[0].splitlines()[2:]  # the table: descriptions and notes follow a blank line
        return out, {ln.split()[0]: ln for ln in table}

    out, rows = listed()
    assert "profile quick, task traffic_signs: lw_vit_nano_p16 at 240x320 (15x20 = 300 patches)" in out
    for method in ("lookwhere", "tome", "random"):
        budget = Plan(resolve_config(method, "traffic_signs", None, quiet=True)).method.budget_str()
        assert f" {budget} " in rows[method], (method, budget, rows[method])
    _, billiards = listed("--task", "billiards")
    assert billiards["lookwhere"] != rows["lookwhere"]  # 384 patches, not 300: other budgets
    out, paper = listed("--profile", "paper", "--task", "traffic_signs")
    assert "profile paper" in out and paper["lookwhere"] != rows["lookwhere"]


def test_show_writes_figure(tmp_path, capsys):
    out = tmp_path / "show.png"
    assert main(["show", "--method", "random", "--budget", "k=6", "--task", "traffic_signs", "--out", str(out),
                 "--n", "2", *TINY]) == 0
    assert out.stat().st_size > 5_000


def test_show_without_out_writes_into_the_current_folder(tmp_path, capsys, monkeypatch):
    """The docs' ``lwbench show --method M --task T`` needs no ``--out``: the figure is named after the point."""
    monkeypatch.chdir(tmp_path)
    assert main(["show", "--method", "random", "--budget", "k=6", "--task", "traffic_signs", "--n", "1", *TINY]) == 0
    out = tmp_path / "show_random_k6_traffic_signs.png"
    assert out.stat().st_size > 5_000
    assert str(out) in capsys.readouterr().out


# Fields that come from training and evaluation (not from timing, which varies run to run).
_DETERMINED = ("metric_value", "top1", "object_recall", "object_recall_chance", "where_target_recall",
               "where_target_chance", "selection_warning", "gmacs", "tokens_mean", "run_id")


def test_one_config_one_result(monkeypatch, tmp_path, capsys):
    """Two fresh runs (empty caches) of one tiny config give identical rows, whatever ran before them in the
    process: the seed is set before the teacher's weights are drawn."""
    import torch

    rows = []
    for attempt in range(2):
        monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / f"cache{attempt}"))
        monkeypatch.setenv("LWBENCH_RESULTS", str(tmp_path / f"results{attempt}"))
        torch.rand(17 + attempt)  # someone used the global generator before this run
        assert main(["run", "--method", "lookwhere", "--task", "traffic_signs", "--budget", "k=6", *TINY,
                     "--set", "method.distill.steps=2", "--set", "method.finetune.steps=2",
                     "--set", "teacher.attn_weight=1"]) == 0
        (path,) = (tmp_path / f"results{attempt}").rglob("*.json")
        rows.append(json.loads(path.read_text()))
    a, b = rows
    assert {k: a[k] for k in _DETERMINED} == {k: b[k] for k in _DETERMINED}
    assert 0 <= a["object_recall"] <= 1 and a["object_recall_chance"] == pytest.approx(6 / 24)
    assert a["where_target_chance"] == pytest.approx(6 / 24) and isinstance(a["selection_warning"], str)


def test_rows_carry_object_recall(capsys):
    assert main(["run", "--method", "full", "--task", "billiards", *TINY[2:], "--img-size", "64x96"]) == 0
    assert main(["run", "--method", "lowres", "--budget", "size=32", "--task", "billiards", *TINY]) == 0
    rows = {r["method"]: r for r in (json.loads(p.read_text()) for p in
                                     Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))}
    assert rows["full"]["object_recall"] == 1.0 and rows["full"]["object_recall_chance"] == 1.0
    assert rows["lowres"]["object_recall"] is None  # another grid: not applicable (null in JSON)
    assert rows["full"]["where_target_recall"] is None and rows["full"]["selection_warning"] == ""


def test_guard_warning_reaches_row_table_and_figure(monkeypatch, tmp_path, capsys):
    """A teacher whose attention misses the objects: the run warns, the row and the table say so, and so does
    the ``lwbench show`` figure."""
    from lwbench import diagnostics, show

    monkeypatch.setattr(diagnostics, "where_target_recall",
                        lambda *a, **k: {"where_target_recall": 0.0, "where_target_chance": 0.25})
    lw = ["--method", "lookwhere", "--task", "traffic_signs", "--budget", "k=6", *TINY,
          "--set", "method.distill.steps=2", "--set", "method.finetune.steps=2"]
    lw.remove("--quiet")
    assert main(["run", *lw]) == 0
    err = capsys.readouterr().err
    assert "warning: lookwhere: the teacher's attention does not cover the objects" in err
    (path,) = Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json")
    assert "miss them" in json.loads(path.read_text())["selection_warning"]
    assert main(["results"]) == 0
    assert "warning: lookwhere k=6 seed 0: the teacher's attention" in capsys.readouterr().out

    texts = []
    real_save = show.save_figure
    monkeypatch.setattr(show, "save_figure",
                        lambda fig, out, rect=None: (texts.extend(t.get_text() for t in fig.texts),
                                                     real_save(fig, out, rect))[1])
    assert main(["show", *lw, "--out", str(tmp_path / "s.png"), "--n", "1"]) == 0
    assert any(t.startswith("WARNING: the teacher's attention does not cover") for t in texts)


def test_show_warns_when_the_selector_is_untrained(monkeypatch, tmp_path, capsys):
    from lwbench import show

    texts = []
    real_save = show.save_figure
    monkeypatch.setattr(show, "save_figure",
                        lambda fig, out, rect=None: (texts.extend(t.get_text() for t in fig.texts),
                                                     real_save(fig, out, rect))[1])
    lw = ["--method", "lookwhere", "--task", "traffic_signs", "--budget", "k=6", *TINY,
          "--set", "method.distill.steps=0", "--set", "method.finetune.steps=1"]
    assert main(["show", *lw, "--out", str(tmp_path / "s.png"), "--n", "1"]) == 0
    assert "selector drawn here is untrained" in capsys.readouterr().err
    assert any("WARNING: the lookwhere selector drawn here is untrained" in t for t in texts)
    texts.clear()
    trained = [a if a != "method.distill.steps=0" else "method.distill.steps=2" for a in lw]
    assert main(["show", *trained, "--out", str(tmp_path / "t.png"), "--n", "1"]) == 0
    assert not any("untrained" in t for t in texts)


def test_cache_list_show_rm_one_stage_and_the_run_redoes_only_it(tmp_path, capfd):
    """After a run: `cache list` names its stages, `cache show` their steps; removing the fine-tuning stage makes
    the next --force run retrain exactly that stage and reuse the teacher."""
    from lwbench.paths import cache_dir

    argv = ["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=6", *TINY, "--set",
            "method.finetune.steps=2"]
    argv.remove("--quiet")
    assert main(argv) == 0
    capfd.readouterr()
    assert main(["cache", "list"]) == 0
    out = capfd.readouterr().out
    run_dir = next((cache_dir() / "runs").iterdir())
    assert run_dir.name in out and "teacher" in out
    stages = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert stages == ["random-6"], stages  # one fine-tuning stage at the budget, not two
    stage = run_dir / stages[0]
    assert main(["cache", "show", run_dir.name]) == 0
    assert f"stage {stage.name}: done, 2 steps" in capfd.readouterr().out
    assert main(["cache", "rm", str(stage)]) == 0
    assert not stage.exists()
    assert main([*argv, "--force"]) == 0
    err = capfd.readouterr().err
    assert "loaded from cache" in err  # the teacher is not retrained ...
    assert "reused from the cache" not in err  # ... the removed stage is
    assert (stage / "done.json").is_file()
    assert main([*argv, "--force"]) == 0
    assert f"reused from the cache (2 steps, {stage}" in capfd.readouterr().err


def _subcommands() -> list[str]:
    import argparse

    from lwbench.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"], ["-h"]] + [[name, "--help"] for name in _subcommands()] +
                         [["pretrain", "lookwhere", "--help"]])
def test_help_of_every_command_prints_usage(argv, capsys):
    """The first thing anyone types: a '%' in a help string once made ``lwbench --help`` a TypeError."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lwbench") and len(out.splitlines()) > 3


def test_unknown_profile_suggests_the_close_one(capsys):
    assert main(["config", "show", "--method", "full", "--task", "traffic_signs", "--profile", "quik"]) == 2
    line = _one_line_error(capsys)
    assert "unknown profile 'quik'" in line and "Did you mean: quick?" in line


@pytest.mark.parametrize("content", [b"", "legacy"])
def test_an_empty_or_truncated_weights_file_says_why(content, tmp_path):
    """An empty file and a truncated legacy .pth (``EOFError()`` has no message) once gave
    ``cannot read weights file X: `` with nothing after the colon."""
    import io

    import torch

    from lwbench.backbones import read_state_dict
    from lwbench.errors import CheckpointError

    if content == "legacy":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(10)}, buf, _use_new_zipfile_serialization=False)
        content = buf.getvalue()[:40]
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path)
    reason = str(exc.value).split(str(path), 1)[1].strip(" :")
    assert reason and ("empty (0 bytes)" in reason if not content else "EOFError" in reason), str(exc.value)
