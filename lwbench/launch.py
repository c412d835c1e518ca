"""``lwbench sweep FILE --launcher submitit``: every missing point of a sweep as one job of a submitit job array.

lwbench does not schedule anything itself: submitit does (SLURM where ``sbatch`` exists, its local executor
elsewhere, the same code path). Each job runs one point, training and measuring it, exactly as ``lwbench run``
would, under the point's attempt record (:mod:`lwbench.sweep_status`), so ``lwbench sweep FILE --status`` sees it
running, failed (with the error line and the job's log) or dead (killed, out of memory, out of time). Each job's id
is kept beside the point's attempt record (``.job.json``), so a job that is still queued, or that died before it got
to its point (``kill -9``, the out-of-memory killer, ``scancel`` while it starts), shows as pending or failed with its
cause (:func:`job_status`: submitit's state of the job, its process, the error line of its log), never as a point
nobody ran. Points whose row exists are not submitted: re-submitting a sweep submits only what is missing.

On SLURM, ``array_parallelism`` is SLURM's own limit (``%N`` of the array). The local executor has none, so this
module submits at most that many jobs at a time and the next one when one ends: a window, not a scheduler.

Timing caveat: jobs that share a machine time each other's load; every row's ``machine_busy`` says so. For
publishable latency, give each job its own GPU or node (``--gpus-per-job 1``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from lwbench.errors import ConfigError

LAUNCHERS = ("local", "submitit")
# The sweep file's ``launch:`` keys; the command line's flags win over them.
LAUNCH_KEYS = ("partition", "gpus_per_job", "cpus_per_job", "timeout_min", "array_parallelism", "slurm_opts")


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How the jobs of one sweep are requested (``--slurm-*`` flags, or the file's ``launch:`` section)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    timeout_min: int = 240
    array_parallelism: int = 8
    slurm_opts: tuple[tuple[str, str], ...] = ()  # free-form sbatch options, e.g. (("constraint", "a100"),)

    def executor_parameters(self) -> dict[str, Any]:
        """Parameters for ``AutoExecutor.update_parameters``: generic keys for every cluster, ``slurm_*`` keys
        that the local executor ignores."""
        p: dict[str, Any] = {"timeout_min": int(self.timeout_min), "gpus_per_node": int(self.gpus_per_job),
                             "tasks_per_node": 1, "nodes": 1,
                             "slurm_array_parallelism": int(self.array_parallelism)}
        if self.cpus_per_job:
            p["cpus_per_task"] = int(self.cpus_per_job)
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.slurm_opts:
            p["slurm_additional_parameters"] = dict(self.slurm_opts)
        return p


def check_launch_section(value: Any, problems: list[str]) -> dict[str, Any]:
    """The sweep file's ``launch:`` mapping, checked; problems are appended, never raised (one error lists all)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"'launch' must be a mapping with keys {', '.join(LAUNCH_KEYS)}")
        return {}
    out = {}
    for key, v in value.items():
        if key not in LAUNCH_KEYS:
            problems.append(f"launch: unknown key '{key}' (use {', '.join(LAUNCH_KEYS)})")
        elif key == "slurm_opts":
            if not isinstance(v, dict):
                problems.append("launch: slurm_opts must be a mapping of sbatch option -> value")
            else:
                out[key] = tuple((str(k), str(x)) for k, x in v.items())
        elif key == "partition":
            out[key] = str(v)
        elif not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "gpus_per_job" else 1):
            problems.append(f"launch: {key} must be a whole number >= {0 if key == 'gpus_per_job' else 1}, got {v!r}")
        else:
            out[key] = v
    return out


def parse_slurm_opts(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--slurm-opt key=value`` items; a malformed one is refused in one line."""
    out = []
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--slurm-opt must be key=value (an sbatch option without its dashes), got '{item}'")
        out.append((key.strip().lstrip("-"), value.strip()))
    return tuple(out)


def options_from(section: dict[str, Any], args) -> LaunchOptions:
    """The file's ``launch:`` section with every command-line flag that was given on top."""
    base = LaunchOptions(**section)
    flags = {"partition": getattr(args, "slurm_partition", None), "gpus_per_job": getattr(args, "gpus_per_job", None),
             "cpus_per_job": getattr(args, "cpus_per_job", None), "timeout_min": getattr(args, "timeout_min", None),
             "array_parallelism": getattr(args, "slurm_array_parallelism", None)}
    opts = parse_slurm_opts(getattr(args, "slurm_opt", None))
    base = dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})
    if opts:
        base = dataclasses.replace(base, slurm_opts=tuple(dict(base.slurm_opts + opts).items()))
    return base


def run_point(req, plugins: tuple[str, ...] = ()) -> None:
    """One job: the point's training and measurement, as ``lwbench run`` does, under its attempt record.
    Runs in the job's own process (submitit pickles this function and ``req``)."""
    from lwbench.registry import METHODS
    from lwbench.runner import run
    from lwbench.sweep import attempted

    for spec in plugins:  # a plugin's methods must be registered in the job's process too
        METHODS.load_module(spec)
    try:
        import submitit

        os.environ.setdefault("LWBENCH_JOB_LOG", str(submitit.JobEnvironment().paths.stdout))
    except Exception:  # not inside a submitit job (tests call this directly): no log path to record
        pass
    attempted(req, "job", run)


def _executor(folder: Path, options: LaunchOptions):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs submitit: pip install 'lwbench[scale]' (or pip install "
                          "submitit)") from None
    executor = submitit.AutoExecutor(folder=str(folder / "%j"))
    try:
        executor.update_parameters(name="lwbench-sweep", **options.executor_parameters())
    except (ValueError, TypeError) as exc:  # an option submitit does not know
        raise ConfigError(f"submitit refused the job options: {exc}") from None
    return executor


# submitit's own log lines ("submitit INFO (2026-12-06 16:17:00,503) - Loading pickle: ..."): never a reason
_SUBMITIT_LOG = re.compile(r"^submitit (DEBUG|INFO|WARNING|ERROR|CRITICAL) \(")
# SLURM's states of a job that ended without its point's row, as the point's cause
_SLURM_ENDED = {"OUT_OF_MEMORY": "out of memory", "TIMEOUT": "out of time (the job's time limit)",
                "DEADLINE": "out of time (the job's deadline)", "CANCELLED": "killed: cancelled (scancel)",
                "NODE_FAIL": "killed: its node failed", "BOOT_FAIL": "killed: its node failed to boot",
                "PREEMPTED": "killed: preempted", "REVOKED": "killed: revoked"}
_SLURM_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "CONFIGURING")
_SLURM_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")


def error_line(log: str | None) -> str:
    """The line of a job's log (or of submitit's error message) that says why it failed: the last
    ``lwbench: error:`` line, else the exception line of the last traceback, else a ``Fatal Python error`` line;
    never one of submitit's log lines. "" when the log has none (a process killed by a signal writes nothing)."""
    lines = [ln.rstrip() for ln in (log or "").splitlines() if ln.strip() and not _SUBMITIT_LOG.match(ln.strip())]
    for ln in reversed(lines):
        if ln.strip().startswith("lwbench: error:"):
            return ln.strip()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if starts:  # the exception line is the first unindented line after the traceback's frames
        return next((ln for ln in lines[starts[-1] + 1:] if not ln[0].isspace() and set(ln) != {"-"}), "")
    return next((ln.strip() for ln in reversed(lines) if ln.strip().startswith("Fatal Python error")), "")


def _job(record: dict[str, Any]):
    """The submitit job of a ``.job.json`` record, seen from any process."""
    import submitit

    cls = submitit.SlurmJob if record.get("cluster") == "slurm" else submitit.LocalJob
    return cls(folder=record["folder"], job_id=str(record["job_id"]))


def _local_job_runs(job_id: str) -> bool:
    """Whether the local executor's job ``job_id`` (its controller's pid) still runs."""
    import psutil

    try:
        proc = psutil.Process(int(job_id))
        return proc.status() != psutil.STATUS_ZOMBIE and "submitit" in " ".join(proc.cmdline())
    except (psutil.Error, ValueError):
        return False


def job_status(record: dict[str, Any]) -> tuple[str, str]:
    """(state, detail) of the job that was submitted for a point which has neither its row nor a live attempt:
    ``pending`` while it waits in the queue, ``running`` while it starts, ``failed`` with its cause once it has ended:
    the job's exception line, out of memory or out of time (SLURM's state), or killed (a process that ended by a
    signal writes no result and no error). ``record`` is the point's ``.job.json``."""
    jid, cluster = str(record.get("job_id", "?")), record.get("cluster", "local")
    try:
        job = _job(record)
    except Exception as exc:  # submitit is gone, or the record is damaged
        return "pending", f"job {jid} ({cluster}): its state cannot be read ({type(exc).__name__}: {exc})"
    if job.paths.result_pickle.exists():  # the job's function returned or raised
        exc = job.exception()
        if exc is None:  # it ran the point, whose row is gone since
            return "pending", f"job {jid} ran it, but its row is gone"
        return "failed", error_line(str(exc)) or f"job {jid} failed"
    if cluster != "slurm":
        if record.get("host", socket.gethostname()) != socket.gethostname():
            return "pending", f"job {jid} runs on {record.get('host')}: ask there"
        if _local_job_runs(jid):
            return "running", f"job {jid} (local) is starting"
        return "failed", error_line(job.stderr()) or f"killed: job {jid} ended without a result or an error " \
                                                     f"(SIGKILL: kill -9, the out-of-memory killer or a time limit)"
    try:
        state = str(job.state)
    except Exception:  # no sacct here
        state = "UNKNOWN"
    key = state.split()[0] if state.strip() else "UNKNOWN"
    if key in _SLURM_WAITING:
        return "pending", f"job {jid} {state} on SLURM"
    if key in _SLURM_RUNNING:
        return "running", f"job {jid} {state} on SLURM, starting"
    if key in _SLURM_ENDED:
        return "failed", f"{_SLURM_ENDED[key]} (SLURM job {jid}: {state})"
    if key == "UNKNOWN":
        return "pending", f"job {jid}: SLURM reports no state for it (sacct: UNKNOWN)"
    why = error_line(job.stderr()) or f"killed: no result and no error in {job.paths.stderr}"
    return "failed", f"{why} (SLURM job {jid}: {state})"


def _failure(req, job, local: bool) -> str | None:
    """None when the ended ``job`` ran its point, else why not in one line, as ``--status`` says it."""
    from lwbench.results import ResultStore
    from lwbench.sweep import _results_of, _run_id, point_name
    from lwbench.sweep_status import point_status

    exc = None
    if job.paths.result_pickle.exists() or not local:  # waits a little for the result: a shared disk may lag
        exc = job.exception()
        if exc is None:
            return None
    status = point_status(ResultStore(_results_of(req)), point_name(req), _run_id(req))
    if status.state == "failed":
        return status.detail
    return error_line(str(exc or "")) or f"job {job.job_id} ended ({job.state}) without its point's row"


def submit_sweep(points: list, options: LaunchOptions, plugins: tuple[str, ...] = (),
                 folder: Path | None = None) -> list[tuple[str, str]]:
    """Submit one job per point whose row is missing, wait for them, and return the failures as (point, one-line
    reason) like :func:`lwbench.sweep.run_sweep`. Job logs go to ``folder`` (default ``<results>/.sweep/jobs``)."""
    from lwbench.results import ResultStore
    from lwbench.sweep import _results_of, _run_id, point_name
    from lwbench.sweep_status import record_job

    todo, failures = [], []
    for req in points:
        try:
            rid = _run_id(req)
        except Exception as exc:  # cannot be planned: fails here, as in a local sweep, without a job
            failures.append((point_name(req), str(exc).splitlines()[0]))
            continue
        if not ResultStore(_results_of(req)).has(rid) or req.force:
            todo.append(req)
    done = len(points) - len(todo) - len(failures)
    print(f"lwbench: sweep: {len(points)} points, {done} done already, {len(failures)} refused, submitting "
          f"{len(todo)} job(s)", file=sys.stderr, flush=True)
    if not todo:
        return failures
    root = _results_of(todo[0])
    executor = _executor(folder or root / ".sweep" / "jobs", options)
    local = executor.cluster != "slurm"
    window = max(1, int(options.array_parallelism)) if local else len(todo)
    pending, running, t0 = list(todo), [], time.perf_counter()
    while pending or running:
        while pending and len(running) < window:
            req = pending.pop(0)
            if local:
                job = executor.submit(run_point, req, tuple(plugins))
                running.append((req, job))
            else:  # one array for everything; SLURM applies array_parallelism itself
                jobs = executor.map_array(run_point, [req, *pending], [tuple(plugins)] * (1 + len(pending)))
                running.extend(zip([req, *pending], jobs, strict=True))
                pending = []
            for r, j in running[-1 if local else 0:]:  # the job ids, for --status while no attempt exists
                record_job(_results_of(r), _run_id(r), {
                    "job_id": str(j.job_id), "cluster": executor.cluster, "host": socket.gethostname(),
                    "folder": str(j.paths.folder), "stdout": str(j.paths.stdout),
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            print(f"lwbench: sweep: submitted {point_name(running[-1][0])} as job {running[-1][1].job_id}",
                  file=sys.stderr, flush=True)
        time.sleep(0.5)
        still = []
        for req, job in running:
            if not job.done():
                still.append((req, job))
                continue
            name, why = point_name(req), _failure(req, job, local)
            if why is None:
                print(f"lwbench: sweep: done {name} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
            else:
                failures.append((name, why))
                print(f"lwbench: sweep: FAILED {name}: {why} (log: {job.paths.stderr})", file=sys.stderr)
        running = still
    return failures


__all__ = ["LAUNCHERS", "LaunchOptions", "submit_sweep", "run_point", "options_from", "check_launch_section",
           "job_status", "error_line"]
