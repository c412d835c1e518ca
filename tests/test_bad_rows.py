"""Hostile input to the readers of the store: a result file with wrongly typed fields is skipped with one line
naming it (results, report and plot alike), and ``lwbench report --out`` neither crashes on a file nor replaces
files it did not write."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from test_results import make_row

from lwbench.cli import main
from lwbench.results import ResultStore

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"


def _store(root: Path, **bad) -> tuple[Path, str]:
    """Two good rows and one row whose fields ``bad`` are overwritten in its file; the bad file's path and id."""
    store = ResultStore(root)
    store.write(make_row(method="full", k=None, acc=80.0, gmacs=2.0, replicate_id="r0"))
    store.write(make_row(k=16, acc=70.0, gmacs=0.5, replicate_id="r1"))
    path = store.write(make_row(k=32, acc=72.0, gmacs=1.0, replicate_id="r2"))
    row = json.loads(path.read_text())
    row.update(bad)
    path.write_text(json.dumps(row))
    return path, row["run_id"]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lwbench: warning:")]


@pytest.mark.parametrize("bad, says", [
    ({"metric_value": "abc"}, "metric_value is 'abc', not a number"),
    ({"metric_value": [1, 2]}, "metric_value is [1, 2], not a number"),
    ({"metric_value": None}, "metric_value is None, not a number"),
    ({"gmacs": {"a": 1}}, "gmacs is {'a': 1}, not a number"),
    ({"latency_ms": True}, "latency_ms is True, not a number"),
    ({"seed": "x"}, "seed is 'x', not a whole number"),
    ({"n_eval": 1.5}, "n_eval is 1.5, not a whole number"),
    ({"method": ["lookwhere"]}, "method is ['lookwhere'], not a string"),
    ({"regime": {"a": 1}}, "regime is {'a': 1}, not a string"),
    ({"machine_busy": "yes"}, "machine_busy is 'yes', not true or false"),
    ({"config": "k=64"}, "config is 'k=64', not a JSON object"),
])
def test_wrongly_typed_row_is_skipped_with_one_line_naming_its_file(tmp_path, capsys, bad, says):
    path, run_id = _store(tmp_path, **bad)
    store = ResultStore(tmp_path)
    rows = store.rows()
    assert run_id not in {r["run_id"] for r in rows} and len(rows) == 2
    assert not store.has(run_id)  # counts as absent, so rerunning the config rewrites it
    lines = _warnings(capsys.readouterr().err)
    assert lines == [f"lwbench: warning: {path}: {says}; skipped (fix or delete the file)"]


def test_old_rows_without_optional_columns_and_with_null_measurements_load_quietly(tmp_path, capsys):
    row = make_row(replicate_id="r0")
    required = ("run_id", "config_hash", "method", "budget", "task", "source", "backbone", "img_size", "profile",
                "seed", "metric", "metric_value", "config", "status")
    old = {k: row[k] for k in required} | {"gmacs": None, "latency_ms": None, "n_eval": None, "top1": 75,
                                           "budget_value": 64, "throughput_batch": 8.0, "machine_busy": None}
    path = ResultStore(tmp_path).path_for(old)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    assert [r["run_id"] for r in ResultStore(tmp_path).rows()] == [row["run_id"]]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "md"])
def test_results_skips_a_bad_row_in_every_format(tmp_path, capsys, fmt):
    path, run_id = _store(tmp_path, seed="x", gmacs={"a": 1})
    capsys.readouterr()
    assert main(["results", "--results", str(tmp_path), "--format", fmt]) == 0
    out, err = capsys.readouterr()
    assert run_id not in out and "k=16" in out and "full" in out
    assert _warnings(err) == [f"lwbench: warning: {path}: seed is 'x', not a whole number; skipped "
                              f"(fix or delete the file)"]


def test_report_skips_a_bad_row(tmp_path, capsys):
    path, run_id = _store(tmp_path / "store", metric_value="abc")
    out = tmp_path / "report"
    assert main(["report", "--task", "traffic_signs", "--results", str(tmp_path / "store"), "--out", str(out)]) == 0
    assert _warnings(capsys.readouterr().err) == [f"lwbench: warning: {path}: metric_value is 'abc', not a number; "
                                                  f"skipped (fix or delete the file)"]
    assert run_id not in set(pd.read_csv(out / "rows.csv")["run_id"]) and len(pd.read_csv(out / "rows.csv")) == 2


def test_plot_names_the_bad_file_instead_of_calling_its_gmacs_not_measured(tmp_path, capsys):
    path, _ = _store(tmp_path, gmacs={"a": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plot", "pareto", "--task", "traffic_signs", "--results", str(tmp_path),
                     "--out", str(tmp_path / "p.png")]) == 0
    assert not [w for w in caught if "not measured" in str(w.message)]
    assert _warnings(capsys.readouterr().err) == [f"lwbench: warning: {path}: gmacs is {{'a': 1}}, not a number; "
                                                  f"skipped (fix or delete the file)"]


# -- report --out ------------------------------------------------------------------------------------------------
def _report(tmp_path: Path, out: Path, *extra: str) -> int:
    return main(["report", "--task", "traffic_signs", "--results", str(tmp_path / "store"), "--out", str(out), *extra])


def test_report_out_that_is_a_file_is_one_line(tmp_path, capsys):
    _store(tmp_path / "store")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert _report(tmp_path, notes) == 2
    assert capsys.readouterr().err == f"lwbench: error: --out {notes} is a file; give a folder\n"
    assert notes.read_text() == "my notes\n"


def test_report_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys):
    _store(tmp_path / "store")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "table.md").write_text("# my hand-written table\n")
    assert _report(tmp_path, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lwbench: error: --out {out}: {out / 'table.md'} exists and was not written by lwbench "
                          f"report") and "another --out" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "table.md").read_text() == "# my hand-written table\n"
    assert sorted(p.name for p in out.iterdir()) == ["table.md"]  # nothing written
    assert _report(tmp_path, out, "--overwrite") == 0
    assert (out / "table.md").read_text().startswith("# traffic_signs: the reference comparison")


def test_report_rewrites_its_own_files_and_the_committed_reference(tmp_path, capsys):
    from lwbench.report import foreign_files

    _store(tmp_path / "store")
    out = tmp_path / "report"
    assert _report(tmp_path, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["pareto_gmacs.png", "pareto_latency_ms.png", "rows.csv", "table.md"]
    assert foreign_files(out, names) == []
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    assert foreign_files(out, names) == []  # the plots carry lwbench's Software tag themselves
    (out / "table.md").write_text(table)
    (out / "pareto_gmacs.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a plot of an older report, untagged
    assert _report(tmp_path, out) == 0, capsys.readouterr().err
    for folder in ("traffic_signs", "billiards", "newer_methods/traffic_signs", "newer_methods/billiards"):
        assert foreign_files(REFERENCE / folder, ["rows.csv", "table.md", "pareto_gmacs.png"]) == []
    alone = tmp_path / "alone"  # a png beside no report of lwbench's is someone else's
    alone.mkdir()
    (alone / "pareto_gmacs.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (alone / "rows.csv").write_text("a,b\n1,2\n")
    assert foreign_files(alone, ["rows.csv", "table.md", "pareto_gmacs.png"]) == [alone / "rows.csv",
                                                                                   alone / "pareto_gmacs.png"]
