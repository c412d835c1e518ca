from __future__ import annotations

import hashlib
import io
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lwbench import results as R
from lwbench.results import ResultStore
from lwbench.schema import FIELD_NAMES, FIELDS, REQUIRED, ResultError, config_hash, jsonable
from lwbench.tables import format_results

README = Path(__file__).resolve().parents[1] / "results" / "README.md"


def make_row(method="lookwhere", k=64, acc=75.0, gmacs=1.5, source="synthetic", task="traffic_signs", seed=0,
             **extra):
    budget = f"k={k}" if k is not None else "-"
    config = {"method": method, "budget": budget, "task": task, "source": source, "backbone": "lw_vit_test_p8",
              "img_size": [64, 64], "profile": "quick", "seed": seed, "finetune": {"steps": 10, "lr": 5e-4}}
    h = config_hash(config)
    row = dict(run_id=h, config_hash=h, method=method, budget=budget, budget_key="k" if k is not None else "-",
               budget_value=float(k) if k is not None else math.nan, task=task, source=source,
               backbone="lw_vit_test_p8", img_size="64x64", profile="quick", seed=seed, metric="top1",
               metric_value=acc, top1=acc, top5=math.nan, miou=math.nan, pixel_acc=math.nan, n_eval=100,
               gmacs=gmacs, latency_ms=2.5, throughput=400.0, peak_mem_mb=12.0, mem_kind="cpu_peak_rss_delta",
               tokens_mean=float(k or 64), train_time_s=3.0, device="cpu", git_dirty=False, config=config,
               status="ok")
    row.update(extra)
    return row


# -- config_hash ---------------------------------------------------------------------------------------


def test_config_hash_is_sha1_prefix_of_sorted_json():
    cfg = {"b": 1, "a": [1, 2], "c": {"y": 0.5, "x": "s"}}
    expected = hashlib.sha1(b'{"a":[1,2],"b":1,"c":{"x":"s","y":0.5}}').hexdigest()[:12]
    assert config_hash(cfg) == expected
    assert re.fullmatch(r"[0-9a-f]{12}", expected)


def test_config_hash_stable_under_order_tuples_and_runtime_keys():
    a = {"method": "tome", "img_size": (224, 224), "seed": 0, "opts": {"r": 8, "trace": False}}
    b = {"opts": {"trace": False, "r": 8}, "seed": 0, "img_size": [224, 224], "method": "tome"}
    assert config_hash(a) == config_hash(b)
    assert config_hash({**a, "force": True, "quiet": True, "results_dir": "/x"}) == config_hash(a)
    assert config_hash({**a, "seed": 1}) != config_hash(a)
    assert config_hash({**a, "opts": {"r": 9, "trace": False}}) != config_hash(a)
    # numpy scalars and Paths hash like their plain values; a JSON round trip keeps the hash
    assert config_hash({**a, "seed": np.int64(0)}) == config_hash(a)
    assert config_hash({"p": Path("/d/x")}) == config_hash({"p": "/d/x"})
    assert config_hash(json.loads(json.dumps(jsonable(a)))) == config_hash(a)


# -- writing ---------------------------------------------------------------------------------------


def test_write_layout_and_strict_json(tmp_path):
    store = ResultStore(tmp_path)
    row = make_row()
    path = store.write(row)
    assert path == tmp_path / "traffic_signs" / "lookwhere" / f"{row['run_id']}.json"
    text = path.read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)  # NaN was written as null
    assert data["top5"] is None and data["run_id"] == row["run_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["created_at"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    back = store.get(row["run_id"])
    assert math.isnan(back["top5"]) and back["top1"] == 75.0 and back["config"]["finetune"]["lr"] == 5e-4


def test_has_skip_and_force_overwrite(tmp_path):
    store = ResultStore(tmp_path)
    rows = [make_row(k=k, acc=50.0 + k / 8) for k in (16, 32, 64)]
    store.write(rows[0])
    done = []
    for row in rows:  # what the runner does: skip configs that already have a row
        if store.has(row["run_id"]):
            continue
        store.write(row)
        done.append(row["budget"])
    assert done == ["k=32", "k=64"]
    assert not store.has("0123456789ab") and not store.has("../etc") and not store.has("")
    # --force: same run_id, new numbers replace the old file
    store.write({**rows[0], "metric_value": 99.0, "top1": 99.0})
    assert store.get(rows[0]["run_id"])["metric_value"] == 99.0
    assert len(store.rows()) == 3


def test_leftover_temp_file_from_killed_writer_is_ignored(tmp_path):
    """A real crash: the writer process dies between writing the temp file and os.replace."""
    row = make_row()
    src = (
        "import json, os, sys\n"
        "import lwbench.results as R\n"
        "R.os.replace = lambda *a: os._exit(9)\n"
        "R.ResultStore(sys.argv[1]).write(json.loads(sys.argv[2]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", src, str(tmp_path), json.dumps(jsonable(row))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    folder = tmp_path / "traffic_signs" / "lookwhere"
    leftovers = list(folder.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{row['run_id']}.")
    assert leftovers[0].name.endswith(".tmp") and leftovers[0].stat().st_size > 100
    store = ResultStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a temp file is not even worth a warning
        assert store.rows() == [] and not store.has(row["run_id"])
        assert store.frame().empty
    store.write(row)  # the rerun succeeds next to the leftover
    assert store.has(row["run_id"]) and len(store.rows()) == 1


def test_failed_overwrite_keeps_previous_row(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    row = make_row(acc=70.0, top1=70.0)
    store.write(row)

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write({**row, "metric_value": 10.0, "top1": 10.0})
    monkeypatch.undo()
    assert store.get(row["run_id"])["metric_value"] == 70.0
    assert len(list((tmp_path / "traffic_signs" / "lookwhere").iterdir())) == 1  # temp file cleaned up


def test_damaged_file_is_skipped_with_one_warning_and_counts_as_absent(tmp_path, capsys):
    store = ResultStore(tmp_path)
    good = make_row(k=16)
    bad = make_row(k=32)
    store.write(good)
    path = store.write(bad)
    path.write_text(path.read_text()[:120])  # truncated, e.g. a half-finished copy
    (path.parent / "notarow.json").write_text("[1, 2]")
    rows = store.rows()
    assert [r["run_id"] for r in rows] == [good["run_id"]]
    lines = sorted(capsys.readouterr().err.splitlines(), key=lambda line: "notarow" in line)
    assert len(lines) == 2  # one per damaged file, naming it
    assert lines[0].startswith(f"lwbench: warning: {path}: unreadable (") and lines[0].endswith(
        "; skipped (delete it or rerun that config with --force)")
    assert lines[1].startswith(f"lwbench: warning: {path.parent / 'notarow.json'}: unreadable (not a JSON object)")
    assert len(store.rows()) == 1  # ... and only once
    assert not store.has(bad["run_id"])
    assert capsys.readouterr().err == ""
    store.write(bad)  # rerunning repairs it
    assert store.has(bad["run_id"]) and len(store.rows()) == 2


@pytest.mark.parametrize("change, match", [
    ({"metric_value": math.nan, "top1": math.nan}, "refusing to store .* not a finite number"),
    ({"metric_value": None}, "not a finite number"),
    ({"metric_value": 80.0}, "differs from top1"),
    ({"source": "fake"}, "source must be one of real, synthetic"),
    ({"run_id": "aaaaaaaaaaaa"}, "must equal config_hash"),
    ({"tokens_mean": [1, 2]}, "must be a scalar"),
    ({"config": "k=64"}, "'config' must be a dict"),
])
def test_write_refuses_bad_rows_and_writes_nothing(tmp_path, change, match):
    store = ResultStore(tmp_path)
    with pytest.raises(ResultError, match=match):
        store.write({**make_row(), **change})
    assert not any(tmp_path.rglob("*"))


def test_write_refuses_missing_fields_and_stale_hash(tmp_path):
    store = ResultStore(tmp_path)
    row = make_row()
    del row["metric"], row["seed"]
    with pytest.raises(ResultError, match="lacks required field.*seed, metric"):
        store.write(row)
    row = make_row()
    row["config"] = {**row["config"], "seed": 7}  # config changed, hash not recomputed
    with pytest.raises(ResultError, match="does not match its config"):
        store.write(row)
    assert isinstance(ResultError("x"), ValueError)


def test_row_names_must_be_file_safe(tmp_path):
    with pytest.raises(ResultError, match="not usable in a file name"):
        ResultStore(tmp_path).write(make_row(task="../escape"))


# -- reading --------------------------------------------------------------------------------------------


@pytest.fixture()
def filled(tmp_path):
    store = ResultStore(tmp_path)
    for k, acc, g in ((16, 60.0, 0.4), (64, 75.0, 1.1)):
        store.write(make_row("lookwhere", k, acc, g))
    store.write(make_row("lookwhere", 64, 78.0, 1.1, source="real"))
    store.write(make_row("full", None, 80.0, 4.0))
    store.write(make_row("tome", 8, 77.0, 2.0, task="billiards", metric_value=77.0))
    return store


def test_rows_and_frame_filtering(filled):
    assert len(filled.rows()) == 5
    assert {r["method"] for r in filled.rows(task="traffic_signs")} == {"lookwhere", "full"}
    assert len(filled.rows(method="lookwhere")) == 3
    assert len(filled.rows(task="traffic_signs", method="lookwhere", source="synthetic")) == 2
    assert len(filled.rows(budget=["k=16", "-"])) == 2
    assert filled.rows(task="nope") == []
    df = filled.frame(task="traffic_signs")
    assert list(df.columns[: len(FIELD_NAMES) - 1]) == [c for c in FIELD_NAMES if c != "config"]
    assert "config" not in df.columns and len(df) == 4
    # sorted by task, source (real first), method, gmacs
    assert list(zip(df["source"], df["method"], df["gmacs"], strict=True)) == [
        ("real", "lookwhere", 1.1), ("synthetic", "full", 4.0), ("synthetic", "lookwhere", 0.4),
        ("synthetic", "lookwhere", 1.1)]
    assert df["budget_value"].dtype == float and math.isnan(df.loc[1, "budget_value"])
    assert df["throughput_iqr"].isna().all()  # absent in every row -> NaN column, not missing
    kept = filled.frame(method="full", keep_config=True)
    assert json.loads(kept.loc[0, "config"])["method"] == "full"


def test_empty_store_gives_empty_frame_with_columns(tmp_path):
    df = ResultStore(tmp_path / "none").frame()
    assert df.empty and "metric_value" in df.columns and "gmacs" in df.columns
    assert format_results(df, "table") == "(no results)\n"
    assert json.loads(format_results(df, "json")) == []


# -- formatting --------------------------------------------------------------------------------------------


def test_csv_round_trip(filled):
    df = filled.frame()
    text = format_results(df, "csv")
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == list(df.columns) and len(back) == len(df)
    for col in ("metric_value", "gmacs", "budget_value", "latency_ms", "top5"):
        np.testing.assert_allclose(back[col].to_numpy(float), df[col].to_numpy(float), equal_nan=True)
    assert list(back["run_id"]) == list(df["run_id"]) and list(back["source"]) == list(df["source"])
    assert list(back["task"]) == ["billiards"] + ["traffic_signs"] * 4


def test_csv_keeps_config_as_json(filled):
    back = pd.read_csv(io.StringIO(format_results(filled.frame(keep_config=True), "csv")))
    assert json.loads(back.loc[0, "config"])["task"] == "billiards"


def test_table_and_md_label_synthetic_and_never_mix_sources(filled):
    df = filled.frame(task="traffic_signs")
    for fmt in ("table", "md"):
        text = format_results(df, fmt)
        assert "SYNTHETIC" in text and ("top1 (%)" if fmt == "md" else "top1 %") in text and "GMACs" in text
        blocks = [b for b in text.split("\n\n") if "task traffic_signs" in b]
        assert len(blocks) == 2 and "real data" in blocks[0] and "SYNTHETIC data" in blocks[1]
        real_part, synth_part = text.split("SYNTHETIC data", 1)
        assert "SYNTHETIC" not in real_part  # the real block holds no synthetic row
        assert real_part.count("lookwhere") == 1 and synth_part.count("lookwhere") == 2
    md = format_results(df, "md")
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table_lines) == 2 * 2 + 4  # two header+rule pairs, four rows
    assert "| full " in md and "75.00" in md and "0.400" in md and "4.00" in md


def test_table_shows_varying_identity_columns_and_metric_names(tmp_path):
    store = ResultStore(tmp_path)
    store.write(make_row(k=16, seed=0))
    store.write(make_row(k=16, seed=1, acc=76.0))
    seg = make_row("full", None, 40.0, 3.0, task="ade20k", metric="miou", metric_value=40.0, miou=40.0,
                   top1=math.nan)
    store.write(seg)
    text = format_results(store.frame(), "table")
    assert "mIoU %" in text and "seed" in text.split("task traffic_signs")[1]
    assert "mIoU (%)" in format_results(store.frame(), "table", wide=True)
    assert "seed" not in text.split("task traffic_signs")[0]  # ade20k block: one seed, no seed column


def test_table_sorts_by_cost_names_what_tells_twin_rows_apart_and_says_the_teacher_once(tmp_path):
    """Two rows that differ only in the fine-tuning lr get a run id and a `differs` cell; rows run cheapest
    first; latency carries its IQR; the teacher's training time is said once, not added to each row."""
    store = ResultStore(tmp_path)
    cheap = make_row(k=8, gmacs=0.5, latency_iqr_ms=0.25, teacher_id="t1", teacher_train_time_s=900.0,
                     method_train_time_s=12.0)
    store.write(cheap)
    for lr in (5e-4, 1e-3):
        row = make_row(k=28, gmacs=1.0, teacher_id="t1", teacher_train_time_s=900.0, method_train_time_s=30.0)
        row["config"] = {**row["config"], "finetune": {"steps": 10, "lr": lr}}
        row["run_id"] = row["config_hash"] = config_hash(row["config"])
        store.write(row)
    store.write(make_row("full", None, 80.0, 3.0, teacher_id="t1", teacher_train_time_s=900.0,
                         method_train_time_s=0.0))
    text = format_results(store.frame(keep_config=True), "table")
    body = [ln for ln in text.splitlines() if ln.startswith(("lookwhere", "full"))]
    assert [ln.split()[1] for ln in body] == ["k=8", "k=28", "k=28", "-"]  # by GMACs, not by name
    assert "finetune.lr=0.0005" in body[1] + body[2] and "finetune.lr=0.001" in body[1] + body[2]
    assert "differs" in text and "finetune.lr" not in body[0]
    assert "2.50 [0.25]" in body[0]
    assert "method train (s)" in format_results(store.frame(keep_config=True), "table", wide=True)
    assert " 900.0" not in text
    assert "teacher (shared by these rows, not in 'method train'): t1 (900 s of training" in text
    # without the config (a plain frame) the twins are still told apart by their columns, never silently equal
    plain = format_results(store.frame(), "table")
    assert "differs" in plain


def test_json_format_and_unknown_format(filled):
    data = json.loads(format_results(filled.frame(), "json"))
    assert len(data) == 5 and data[0]["task"] == "billiards" and data[1]["top5"] is None
    with pytest.raises(ResultError, match="unknown results format 'xlsx'"):
        format_results(filled.frame(), "xlsx")


def test_readme_documents_every_field():
    """One schema: README's table lists exactly FIELDS, with the same types."""
    text = README.read_text()
    missing = [f for f in FIELD_NAMES if f"| `{f}` |" not in text]
    assert not missing, f"results/README.md does not document {missing}"
    documented = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", text, re.M))
    declared = {name: kind for name, kind, _ in FIELDS}
    assert documented == declared
    for name in REQUIRED:
        assert re.search(rf"\| `{name}` \| \w+ \| \*\*required\*\*", text), name


def test_table_shows_object_recall_and_the_guard_warning(tmp_path):
    store = ResultStore(tmp_path)
    store.write(make_row(k=16, object_recall=0.91, selection_warning=""))
    store.write(make_row(k=32, seed=1, object_recall=0.05,
                         selection_warning="the teacher's attention does not cover the objects"))
    text = format_results(store.frame(), "table")
    assert "recall" in text and "0.91" in text and "0.05" in text
    warnings_ = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert warnings_ == ["warning: lookwhere k=32 seed 1: the teacher's attention does not cover the objects"]


def test_rows_per_image_files_and_plots_are_readable_by_colleagues(tmp_path):
    """Atomic writes go through a temporary file; it must end with an ordinary file's mode (0666 less the umask),
    not mkstemp's 0600."""
    import os
    import stat

    from lwbench.plots import pareto_plot
    from lwbench.results import ResultStore

    umask = os.umask(0o022)
    try:
        store = ResultStore(tmp_path / "res")
        rows = [make_row(k=k, acc=50.0 + k / 8) for k in (16, 32)]
        paths = [store.write(r) for r in rows]
        npz = store.write_per_image(rows[0], {"top1": np.ones(4, np.uint8)})
        png = pareto_plot(store.frame(), "traffic_signs", out=tmp_path / "p.png")
    finally:
        os.umask(umask)
    for p in [*paths, npz, png]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p


def test_tables_label_what_each_method_needs():
    """A ``labels`` column read from each method's class (lwbench.labels) and a legend line under the block, in the
    terminal (within 120 columns) and in markdown; ``?`` for a method this process does not know; not in csv/json,
    which hold the rows as stored."""
    rows = [make_row("evit", 64, 70.0, gmacs=1.2), make_row("ats", 64, 71.0, gmacs=1.1),
            make_row("lookwhere", 64, 75.0), make_row("full", None, 80.0, gmacs=3.0),
            make_row("not_loaded_plugin", 64, 60.0, gmacs=1.4)]
    df = R.rows_to_frame(rows)
    text = format_results(df, "table")
    assert max(len(ln) for ln in text.splitlines()) <= 120
    lines = text.splitlines()
    assert next(ln for ln in lines if ln.startswith("method")).split()[:2] == ["method", "labels"]
    codes = {ln.split()[0]: ln.split()[1] for ln in lines if ln.split() and ln.split()[0] in
             {"evit", "ats", "lookwhere", "full", "not_loaded_plugin"}}
    assert codes == {"evit": "Fcfd", "ats": "Fcvd", "lookwhere": "T-fd", "full": "F-fd", "not_loaded_plugin": "?"}
    assert "labels: F training-free, T trained" in text and "?: a method not registered here" in text
    md = format_results(df, "md")
    assert next(ln for ln in md.splitlines() if ln.startswith("| method")).split("|")[2].strip() == "labels"
    assert "| Fcvd " in md and "labels: F training-free" in md
    assert "labels" not in format_results(df, "csv").splitlines()[0].split(",")
    assert "labels" not in json.loads(format_results(df, "json"))[0]
    known = R.rows_to_frame(rows[:4])
    assert "?: a method" not in format_results(known, "table")


def test_terminal_table_fits_120_columns_wide_shows_all_and_md_keeps_every_column():
    """The terminal table was 300+ characters wide (the reference store: 307): it now fits 120, names what it
    left out, and --wide / md keep every column."""
    from test_conversion import speed_frame

    df = speed_frame().assign(object_recall=0.9, hard_value=80.0, hard_ci_low=70.0, hard_ci_high=90.0,
                              tokens_mean=28.0, method_train_time_s=120.0, finetune_steps=100, regime="finetuned")
    text = format_results(df, "table")
    assert max(len(ln) for ln in text.splitlines()) <= 120
    head = next(ln for ln in text.splitlines() if ln.startswith("method"))
    for h in ("budget", "regime", "top1 % [95% CI]", "GMACs", "speed-up bs1"):
        assert h in head
    assert "note: " in text and "more column(s) with --wide:" in text and "attn" in text.split("--wide:")[1]
    wide = format_results(df, "table", wide=True)
    for h in ("speed-up bs1 [95% CI]", "conv bs1", "attn", "ms bs1 [IQR]", "peak mem (MB)", "tokens",
              "method train (s)", "hard subset [95% CI]", "object recall", "source"):
        assert h in wide
    assert max(len(ln) for ln in wide.splitlines()) > 120 and "--wide" not in wide
    md = format_results(df, "md")
    md_head = next(ln for ln in md.splitlines() if ln.startswith("| method"))
    for h in ("speed-up bs1 [95% CI]", "conv bs1", "attn", "ms bs1 [IQR]", "mem MB", "tokens", "train s",
              "hard [95% CI]", "recall", "GMACs"):
        assert h in md_head
    assert "ft steps" not in md_head and "fine-tuned rows: 100 steps" in md  # said once, in the heading
    assert "| source" not in md_head and "SYNTHETIC data" in md
    assert max(len(ln) for ln in md.splitlines() if ln.startswith("|")) < 300
