"""Sweeps: grid expansion, a failing point does not stop the rest, finished points are skipped."""

from __future__ import annotations

import os
from pathlib import Path

from test_cli import TINY

from lwbench.cli import main


def test_sweep_runs_grid_reports_failure_and_resumes(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  full: null\n"
                     "  random: [k=3, k=100000, k=6]\n  tome: default\n")
    assert main(["sweep", str(sweep), *TINY]) == 1  # one point failed
    err = capsys.readouterr().err
    assert "FAILED random k=100000" in err and "valid: k=1..24" in err
    rows = sorted(p.parent.name for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    n_tome = rows.count("tome")
    assert rows.count("full") == 1 and rows.count("random") == 2 and n_tome >= 3  # tome: its default grid
    # rerun: everything done is skipped, the bad point fails again, nothing is rewritten
    assert main(["sweep", str(sweep), *TINY]) == 1
    assert "already done" not in capsys.readouterr().out
    assert len(list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))) == len(rows)


def test_shard_splits_points(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3, k=4, k=5, k=6]\n")
    assert main(["sweep", str(sweep), "--shard", "1/2", *TINY]) == 0
    budgets = sorted(p.parent.name for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    assert len(budgets) == 2
    assert main(["sweep", str(sweep), "--shard", "2/2", *TINY]) == 2
    assert "--shard must be i/n" in capsys.readouterr().err
