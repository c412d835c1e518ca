"""``lwbench sweep --launcher submitit``: every missing point one job (submitit's local executor here, the code
path SLURM takes too), a limit on jobs at once, a killed job reported and recovered, bad launch options refused."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from test_cli import TINY
from test_sweep import _status

from lwbench.cli import main

pytest.importorskip("submitit")


def _rows(results: Path) -> list[Path]:
    return [p for p in results.glob("*/*/*.json") if not p.name.startswith(".")]


def test_submitit_sweep_runs_every_point_as_a_job_two_at_a_time(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3, k=4, k=6]\n")
    results = Path(os.environ["LWBENCH_RESULTS"])
    assert main(["sweep", str(sweep), "--launcher", "submitit", "--slurm-array-parallelism", "2", *TINY]) == 0
    err = capsys.readouterr().err
    assert "submitting 3 job(s)" in err and err.count("lwbench: sweep: done random") == 3
    # the window: the third job is submitted only after one of the first two has ended
    lines = [ln for ln in err.splitlines() if "submitted random" in ln or "done random" in ln]
    assert [("submitted" in ln) for ln in lines[:3]] == [True, True, False]
    assert len(_rows(results)) == 3
    assert len(list((results / ".sweep" / "jobs").glob("*/*_log.out"))) == 3  # one log per job
    rc, status = _status(sweep, capsys)
    assert rc == 0 and {s[0] for s in status.values()} == {"done"}
    # re-submitted: nothing is missing, no job
    assert main(["sweep", str(sweep), "--launcher", "submitit", *TINY]) == 0
    assert "3 done already, 0 refused, submitting 0 job(s)" in capsys.readouterr().err


def test_a_killed_job_is_reported_and_the_resubmitted_sweep_recovers(tmp_path, capsys, monkeypatch):
    plugin = tmp_path / "killed_once.py"
    plugin.write_text(textwrap.dedent('''
        import os, signal
        from pathlib import Path
        from lwbench.registry import register_method
        from lwbench.methods.random import RandomPatches

        @register_method("killed_once")
        class KilledOnce(RandomPatches):
            """random, but its first build ever is killed (kill -9), as by the OOM killer or a job's time limit."""
            def build(self, vit):
                flag = Path(os.environ["KILL_FLAG"])
                if not flag.exists():
                    flag.write_text("killed")
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().build(vit)
    '''))
    monkeypatch.setenv("KILL_FLAG", str(tmp_path / "flag"))
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  killed_once: [k=3]\n  random: [k=3]\n")
    argv = ["sweep", str(sweep), "--launcher", "submitit", "--plugin", str(plugin), *TINY]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED killed_once k=3" in err and "(log: " in err and "done random k=3" in err
    assert "killed: job " in err and "submitit INFO" not in err
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--status", "--plugin", str(plugin), *TINY]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("failed") and "killed_once" in ln)
    assert "killed: job " in line and "log: " in line and "_log.out" in line
    assert main(argv) == 0  # re-submitted: only the missing point runs, and now it lives
    assert "1 done already, 0 refused, submitting 1 job(s)" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--status", "--plugin", str(plugin), *TINY]) == 0


def test_a_job_killed_before_its_point_started_is_failed_killed_not_pending(tmp_path, capsys):
    """kill -9 while the job starts (importing, loading a plugin: no attempt record yet) is a failed point, killed,
    in the sweep's report and in --status; no submitit log line stands as its reason."""
    plugin = tmp_path / "killed_early.py"
    plugin.write_text(textwrap.dedent('''
        import os, signal
        from lwbench.registry import register_method
        from lwbench.methods.random import RandomPatches

        if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):  # inside the job: killed while it starts
            os.kill(os.getpid(), signal.SIGKILL)

        @register_method("killed_early")
        class KilledEarly(RandomPatches):
            pass
    '''))
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  killed_early: [k=3]\n")
    assert main(["sweep", str(sweep), "--launcher", "submitit", "--plugin", str(plugin), *TINY]) == 1
    failed = next(ln for ln in capsys.readouterr().err.splitlines() if "FAILED killed_early" in ln)
    assert "killed: job " in failed and "submitit INFO" not in failed and "_log.err" in failed
    assert main(["sweep", str(sweep), "--status", "--plugin", str(plugin), *TINY]) == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "killed_early" in ln)
    assert line.startswith("failed") and "killed: job " in line and "submitit" not in line.split("(log:")[0]
    assert "_log.out" in line


class _FakeJob:
    """A SLURM job as submitit shows it: its state (sacct) and its logs."""

    def __init__(self, folder: Path, state: str, stderr: str = ""):
        import submitit

        self.job_id, self.state, self.paths = "77_1", state, submitit.core.utils.JobPaths(folder, "77_1", 0)
        self._stderr = stderr

    def stderr(self):
        return self._stderr


@pytest.mark.parametrize("state, expect", [
    ("PENDING", ("pending", "job 77_1 PENDING")), ("RUNNING", ("running", "job 77_1 RUNNING")),
    ("OUT_OF_MEMORY", ("failed", "out of memory")), ("TIMEOUT", ("failed", "out of time")),
    ("CANCELLED by 1234", ("failed", "killed: cancelled")), ("NODE_FAIL", ("failed", "killed: its node failed")),
    ("UNKNOWN", ("pending", "no state")),
])
def test_slurm_job_states_are_the_points_states(tmp_path, monkeypatch, state, expect):
    from lwbench.sweeps import jobs

    monkeypatch.setattr(jobs, "_job", lambda record: _FakeJob(tmp_path, state))
    got, detail = jobs.job_status({"job_id": "77_1", "cluster": "slurm"})
    assert got == expect[0] and expect[1] in detail and "submitit" not in detail


def test_a_failed_jobs_reason_is_its_error_line_never_a_submitit_log_line(tmp_path, monkeypatch):
    from lwbench.sweeps import jobs

    log = textwrap.dedent("""\
        submitit INFO (2026-12-06 16:17:00,503) - Starting with JobEnvironment(job_id=77_1, hostname=n1)
        submitit INFO (2026-12-06 16:17:00,503) - Loading pickle: /x/77_1_submitted.pkl
        Traceback (most recent call last):
          File "x.py", line 1, in <module>
        ModuleNotFoundError: No module named 'my_plugin'
        submitit ERROR (2026-12-06 16:17:01,000) - Submitted job triggered an exception
    """)
    assert jobs.error_line(log) == "ModuleNotFoundError: No module named 'my_plugin'"
    assert jobs.error_line(log + "lwbench: error: the dataset is missing\n") == \
        "lwbench: error: the dataset is missing"
    assert jobs.error_line("submitit INFO (2026-12-06 16:17:00,503) - Loading pickle: /x.pkl\n") == ""
    monkeypatch.setattr(jobs, "_job", lambda record: _FakeJob(tmp_path, "FAILED", log))
    assert jobs.job_status({"job_id": "77_1", "cluster": "slurm"}) == \
        ("failed", "ModuleNotFoundError: No module named 'my_plugin' (SLURM job 77_1: FAILED)")


def test_bad_launch_options_are_refused_before_any_job(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3]\n")
    assert main(["sweep", str(sweep), "--launcher", "slurmm", *TINY]) == 2
    assert "--launcher must be one of local, submitit" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--launcher", "submitit", "--slurm-opt", "nodashes", *TINY]) == 2
    assert "--slurm-opt must be key=value" in capsys.readouterr().err
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3]\n"
                     "launch: {gpus: 1}\n")
    assert main(["sweep", str(sweep), "--launcher", "submitit", *TINY]) == 2
    assert "unknown key 'launch.gpus'; did you mean 'launch.gpus_per_job'?" in capsys.readouterr().err
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3]\n"
                     "launch: {timeout_min: 0}\n")
    assert main(["sweep", str(sweep), "--launcher", "submitit", *TINY]) == 2
    assert "launch.timeout_min: 0 must be >= 1" in capsys.readouterr().err
    sweep.write_text("source: synthetic\ntasks: [traffic_signs]\nmethods:\n  random: [k=3]\n")
    assert main(["sweep", str(sweep), "--launcher", "submitit", "--timeout-min", "0", *TINY]) == 2
    assert "launch.timeout_min: 0 must be >= 1" in capsys.readouterr().err  # a flag is checked as the file is
    assert not _rows(Path(os.environ["LWBENCH_RESULTS"]))
