"""Sweeps: grid expansion, a failing point does not stop the rest, finished points are skipped, bad files
are refused up front with every problem in one error."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from test_cli import TINY

from lwbench.cli import main
from lwbench.errors import ConfigError
from lwbench.sweeps import expand, parse_spec
from lwbench.sweeps.points import MAX_PROBLEMS


def test_sweep_refuses_a_point_that_cannot_run_before_any_work(tmp_path, capsys):
    """A budget out of range is found when the file is read (every point is planned first), not hours later."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  full: null\n"
                     "  random: [k=3, k=100000, k=6]\n")
    assert main(["sweep", str(sweep), *TINY]) == 2
    err = capsys.readouterr().err
    assert "1 of the sweep's 4 points cannot run (nothing was run)" in err and "valid: k=1..24" in err
    assert not list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))


def test_sweep_runs_grid_reports_failure_and_resumes(tmp_path, capsys, monkeypatch):
    from lwbench.methods.random import RandomPatches

    fit = RandomPatches.fit

    def broken_at_k3(self, ctx):
        if int(self.budget) == 3:
            raise RuntimeError("boom at k=3")
        return fit(self, ctx)

    monkeypatch.setattr(RandomPatches, "fit", broken_at_k3)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  full: null\n"
                     "  random: [k=3, k=4, k=6]\n  tome: default\n")
    assert main(["sweep", str(sweep), *TINY]) == 1  # one point failed
    captured = capsys.readouterr()
    assert "FAILED random k=3" in captured.err and "boom at k=3" in captured.err
    rows = sorted(p.parent.name for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    n_tome = rows.count("tome")
    assert rows.count("full") == 1 and rows.count("random") == 2 and n_tome >= 3  # tome: its default grid
    # the sweep ends with its rows, cheapest first, and where they are
    table = captured.out
    assert "random" in table and "tome" in table and f"rows in {os.environ['LWBENCH_RESULTS']}" in table
    assert table.index("k=4") < table.index("k=6")  # by cost
    assert "lwbench plot pareto --task traffic_signs" in table
    # rerun: everything done is skipped, the bad point fails again, nothing is rewritten
    assert main(["sweep", str(sweep), *TINY]) == 1
    assert "already done" not in capsys.readouterr().out
    assert len(list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))) == len(rows)


def test_dry_run_lists_every_point_and_what_it_will_train(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nregimes: [off_the_shelf, finetuned]\n"
                     "methods:\n  full: null\n  tome: [r=2]\n  random: [k=3]\n")
    assert main(["sweep", str(sweep), "--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(lines) == 5  # full x2 regimes, tome x2, random (trainable: finetuned only)
    assert "train 4 steps" in lines[0] and "(trained above)" in lines[1]  # the teacher, once
    random_line = next(line for line in lines if "random" in line)
    assert "finetuned" in random_line and random_line.split()[-2:] == ["2", "to"] or "to train" in random_line
    assert "5 points, 5 to run, 0 done; nothing was run" in out
    assert not list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    assert not (Path(os.environ["LWBENCH_CACHE"]) / "teachers").exists() or \
        not any((Path(os.environ["LWBENCH_CACHE"]) / "teachers").iterdir())


def test_shard_splits_points(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3, k=4, k=5, k=6]\n")
    assert main(["sweep", str(sweep), "--shard", "1/2", *TINY]) == 0
    budgets = sorted(p.parent.name for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    assert len(budgets) == 2
    assert main(["sweep", str(sweep), "--shard", "2/2", *TINY]) == 2
    assert "--shard must be i/n" in capsys.readouterr().err


def _status(sweep, capsys) -> tuple[int, dict[str, list[str]]]:
    """``lwbench sweep --status``: its exit code and, per point name, [state, run id, detail]."""
    capsys.readouterr()
    rc = main(["sweep", str(sweep), "--status", *TINY])
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        state, rest = line.split(None, 1)
        point, _, tail = rest.partition(")")
        run_id, _, detail = tail.strip().partition(" ")
        rows[point + ")"] = [state, run_id, detail.strip()]
    return rc, rows


def test_status_tells_done_running_failed_pending_and_a_killed_point(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  full: null\n"
                     "  random: [k=3, k=100000, k=6]\n")
    k3, k6, bad = (f"random k={k} auto on traffic_signs (seed 0)" for k in (3, 6, 100000))
    rc, before = _status(sweep, capsys)
    assert rc == 1 and len(before) == 4
    assert before[k3][0] == before[k6][0] == "pending"
    assert before[bad][0] == "failed" and "valid: k=1..24" in before[bad][2]  # cannot even be planned

    assert main(["sweep", str(sweep), *TINY]) == 2  # refused as a whole, nothing run
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  full: null\n  random: [k=3, k=6]\n")
    assert main(["sweep", str(sweep), *TINY]) == 0
    rc, after = _status(sweep, capsys)
    assert rc == 0 and [after[k][0] for k in (k3, k6)] == ["done", "done"]

    # k=6 again, in a process that is killed mid-point: running while it lives, failed (died) after kill -9
    results = Path(os.environ["LWBENCH_RESULTS"])
    run_id = after[k6][1]
    for f in results.glob(f"*/*/{run_id}*"):
        f.unlink()
    assert _status(sweep, capsys)[1][k6][0] == "pending"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lwbench.sweeps.status import attempt\n"
        f"with attempt({str(results)!r}, {run_id!r}, 'random k=6', 'measure'):\n"
        "    print('in', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "in"
        rc, during = _status(sweep, capsys)
        assert during[k6][0] == "running" and f"pid {child.pid}" in during[k6][2]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.1)
    rc, killed = _status(sweep, capsys)
    assert killed[k6][0] == "failed" and "killed, out of memory or out of time" in killed[k6][2]
    assert not any(results.glob(f"*/*/{run_id}*"))  # no half row

    assert main(["sweep", str(sweep), *TINY]) == 0  # the re-run picks up only what is missing
    rc, end = _status(sweep, capsys)
    assert [end[k][0] for k in (k3, k6)] == ["done", "done"] and rc == 0


def test_a_failing_point_records_its_error_line(tmp_path):
    from lwbench.results import ResultStore
    from lwbench.sweeps.status import attempt, point_status

    with pytest.raises(RuntimeError), attempt(tmp_path, "abc123", "p", "train"):
        raise RuntimeError("out of patience\nsecond line")
    st = point_status(ResultStore(tmp_path), "p", "abc123")
    assert (st.state, st.detail) == ("failed", "out of patience")
    with attempt(tmp_path, "abc123", "p", "train"):
        pass  # a success clears the record: the row (or the cached stages) speaks now
    assert point_status(ResultStore(tmp_path), "p", "abc123").state == "pending"
    assert ResultStore(tmp_path).rows() == []  # the state files are never read as rows


# -- validation: every problem of a sweep file in one error, before any point runs -------------------------------


@pytest.fixture
def runs(monkeypatch):
    """Record the requests `lwbench.runner.run` gets instead of running them."""
    calls = []
    monkeypatch.setattr("lwbench.runner.run", lambda req: calls.append(req) or {})
    monkeypatch.setattr("lwbench.runner.train_only", lambda req: True)  # the first pass: nothing to record
    for where in ("points", "status"):  # no Plan to build
        monkeypatch.setattr(f"lwbench.sweeps.{where}.run_id", lambda req: f"fake{id(req)}")
    return calls


def _sweep(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("tasks: [traffic_signs]\nmethods: [full, tome]\n",
     "'methods' must be a mapping of method name to budgets, not a list; write e.g. "
     "methods: {full: null, tome: default}"),
    # one field's type or range: the words of --set (lwbench.options)
    ("tasks: [traffic_signs]\nseeds: [zero]\nmethods: {full: null}\n", "seeds[0]: 'zero' is not an integer"),
    ("tasks: [traffic_signs]\nseeds: [0, true]\nmethods: {full: null}\n", "seeds[1]: True is not an integer"),
    ("tasks: [traffic_signs]\nseeds: [0, -1]\nmethods: {full: null}\n", "seeds[1]: -1 must be >= 0"),
    ("sourse: synthetic\ntasks: [traffic_signs]\nmethods: {full: null}\n",
     "unknown key 'sourse'; did you mean 'source'?"),
    ("tasks: [traffic_signs]\nmethds: {full: null}\n",  # one problem, not also a missing 'methods'
     "unknown key 'methds'; did you mean 'methods'? (valid keys of a sweep file: profile, source, tasks"),
    ("source: synth\ntasks: [traffic_signs]\nmethods: {full: null}\n",
     "source: 'synth' is not one of auto, real, synthetic; did you mean 'synthetic'?"),
    ("tasks: [traffic_signs]\nmethods: {full: null}\nlaunch: {gpus_per_job: two}\n",
     "launch.gpus_per_job: 'two' is not an integer"),
    ("tasks: [traffic_signs]\nmethods: {full: null}\nlaunch: {array_parallelism: 0}\n",
     "launch.array_parallelism: 0 must be >= 1"),
    # what needs the registry or spans fields
    ("tasks: trafic_signs\nmethods: {full: null}\n",
     "tasks: unknown task 'trafic_signs'. Did you mean: traffic_signs?"),
    ("tasks: []\nmethods: {full: null}\n", "'tasks' is missing or empty"),
    ("methods: {full: null}\n", "'tasks' is missing or empty"),
    ("tasks: [traffic_signs]\nmethods: {tomee: default}\n", "methods: unknown method 'tomee'. Did you mean: tome"),
    ("tasks: [traffic_signs]\nmethods: {random: [8, 16]}\n",
     "methods: budget 8 of 'random' must look like key=value, e.g. random: [k=8, k=16]"),
    ("tasks: [traffic_signs]\nmethods: {tome: defualt}\n", "methods: budgets of 'tome' must be null (no budget knob)"),
    ("tasks: [traffic_signs]\nmethods: {tome: [k=4]}\n", "methods: 'tome' takes budgets r=..., not k=..."),
    ("tasks: [traffic_signs]\nmethods: {full: [k=4]}\n", "methods: 'full' has no budget knob; write full: null"),
    ("tasks: [traffic_signs]\nmethods: {full: null}\nset: [teacher.steps]\n", "set: entry 'teacher.steps' must look"),
])
def test_bad_sweep_file_is_one_line_error_and_runs_nothing(tmp_path, capsys, runs, text, expected):
    path = _sweep(tmp_path, text)
    assert main(["sweep", path, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lwbench: error: sweep file {path}: ") and expected in err[0], err[0]
    assert runs == []


def test_all_problems_are_reported_together(tmp_path, capsys, runs):
    path = _sweep(tmp_path, "sourse: synthetic\ntasks: [trafic_signs, billiards, cubb]\nseeds: [zero, 1]\n"
                            "methods: {full: null, tomee: default, random: [k=3]}\n")
    assert main(["sweep", path, *TINY]) == 2
    err = capsys.readouterr().err
    assert f"lwbench: error: sweep file {path} has 5 problems (nothing was run):" in err
    for part in ("unknown key 'sourse'", "seeds[0]: 'zero'", "unknown task 'trafic_signs'", "unknown task 'cubb'",
                 "unknown method 'tomee'"):
        assert part in err
    assert "Traceback" not in err and runs == []


def test_problem_list_is_capped():
    bad = {f"extra{i}": 1 for i in range(14)}
    with pytest.raises(ConfigError) as info:
        parse_spec({**bad, "tasks": ["traffic_signs"], "methods": {"full": None}}, "s.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "sweep file s.yaml has 14 problems (nothing was run):"
    assert len(lines) == 1 + MAX_PROBLEMS + 1 and lines[-1] == "  ... and 4 more"


def test_the_spec_is_normalised_and_parsing_it_again_changes_nothing():
    spec = parse_spec({"tasks": "traffic_signs", "seeds": 3, "methods": {"full": "default", "random": "k=4"},
                       "set": "teacher.steps=4"}, "s.yaml")
    assert (spec.profile, spec.source, spec.tasks, spec.seeds, spec.set, spec.regimes) == \
        (None, None, ["traffic_signs"], [3], ["teacher.steps=4"], ["auto"])
    assert spec.methods == {"full": None, "random": ["k=4"]}  # no knob: one point; one budget: a list of one
    assert spec.launch.gpus_per_job == 0 and spec.launch.timeout_min == 240
    assert parse_spec(spec, "s.yaml") == spec
    assert parse_spec(dataclasses.asdict(spec), "s.yaml") == spec


def test_task_string_expands_to_the_right_points(tmp_path, capsys, runs):
    path = _sweep(tmp_path, "source: synthetic\ntasks: traffic_signs\nseeds: [0, 1]\n"
                            "methods:\n  full: null\n  random: [k=3, k=6]\n  tome: default\n")
    assert main(["sweep", path, *TINY]) == 0
    got = [(r.method, r.task, r.budget, r.seed) for r in runs]
    tome = [b for m, _, b, s in got if m == "tome" and s == 0]
    assert len(tome) >= 3 and all(b.startswith("r=") for b in tome)  # tome: its default grid
    per_seed = [("traffic_signs", "full", None), ("traffic_signs", "random", "k=3"), ("traffic_signs", "random", "k=6")]
    per_seed += [("traffic_signs", "tome", b) for b in tome]
    assert sorted(got) == sorted((m, t, b, s) for s in (0, 1) for t, m, b in per_seed)
    assert {r.source for r in runs} == {"synthetic"}  # the file's source reaches every point
    assert "sweep done: " in capsys.readouterr().err


def test_file_set_applies_to_every_point_and_the_callers_set_wins():
    spec = parse_spec({"tasks": ["traffic_signs", "billiards"], "methods": {"random": ["k=3"]},
                       "set": ["teacher.steps=9", "eval.limit=4"]})
    sets = ["teacher.steps=2"]
    points = expand(spec, {}, sets)
    assert [(p.task, p.teacher.steps, p.eval.limit) for p in points] == [("traffic_signs", 2, 4), ("billiards", 2, 4)]
    assert sets == ["teacher.steps=2"] and spec.set == ["teacher.steps=9", "eval.limit=4"]  # nothing is changed


def test_the_profile_given_wins_over_the_files_whoever_calls(tmp_path, runs):
    """The file's ``profile:`` applies unless the caller gives one: the command line, the Python API or a script
    of one's own, whatever its own ``sys.argv`` holds (it was read from there once)."""
    import lwbench

    spec = parse_spec({"profile": "paper", "tasks": ["traffic_signs"], "methods": {"full": None}})
    assert [p.profile for p in expand(spec)] == ["paper"]
    assert [p.profile for p in expand(spec, {"profile": "quick"})] == ["quick"]
    path = _sweep(tmp_path, "profile: paper\nsource: synthetic\ntasks: [traffic_signs]\nmethods: {full: null}\n")
    assert main(["sweep", path, "--profile", "quick", *TINY]) == 0
    assert [r.profile for r in runs] == ["quick"]
    runs.clear()
    assert lwbench.sweep(path, profile="quick", quiet=True) == []
    assert [r.profile for r in runs] == ["quick"]
    runs.clear()
    assert lwbench.sweep(path, quiet=True) == []
    assert [r.profile for r in runs] == ["paper"]


def test_seed_and_regime_given_by_the_caller_replace_the_files_lists():
    spec = parse_spec({"tasks": ["traffic_signs"], "seeds": [0, 1], "regimes": ["off_the_shelf", "finetuned"],
                       "methods": {"full": None}})
    assert [(p.seed, p.regime) for p in expand(spec)] == [(0, "off_the_shelf"), (0, "finetuned"),
                                                          (1, "off_the_shelf"), (1, "finetuned")]
    assert [(p.seed, p.regime) for p in expand(spec, {"seed": 5, "regime": "finetuned"})] == [(5, "finetuned")]
    with pytest.raises(ConfigError, match="unknown flag 'sed'"):
        expand(spec, {"sed": 1})


def test_every_shipped_sweep_file_is_valid():
    """configs/sweeps/*.yaml: each one passes the checks a user's run would hit first (names, budgets, launch)."""
    from lwbench.config import load_yaml

    files = sorted((Path(__file__).parents[1] / "configs" / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"quick.yaml", "paper.yaml"}
    for f in files:
        spec = parse_spec(load_yaml(f), str(f))
        assert spec.methods and spec.tasks, f.name
    paper = parse_spec(load_yaml(files[[f.name for f in files].index("paper.yaml")]), "paper.yaml")
    from lwbench.registry import METHODS

    # every built-in method, except those that run on some tasks only (a sweep plans every method on every task)
    task_limited = {"oracle": "needs annotated object boxes (traffic_signs, billiards), not imagenet/ade20k/cub"}
    assert set(paper.methods) == set(METHODS._builtins) - set(task_limited)
    assert len(paper.tasks) == 5 and paper.seeds == [0, 1, 2]
    assert paper.launch.gpus_per_job == 1
