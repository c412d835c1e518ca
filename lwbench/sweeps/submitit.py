"""``lwbench sweep FILE --launcher submitit``: every missing point of a sweep as one job of a submitit job array.

lwbench does not schedule anything itself: submitit does (SLURM where ``sbatch`` exists, its local executor
elsewhere, the same code path). Each job runs one point, training and measuring it, exactly as ``lwbench run``
would, under the point's attempt record (:mod:`lwbench.sweeps.status`), so ``lwbench sweep FILE --status`` sees it
running, failed (with the error line and the job's log) or dead (killed, out of memory, out of time). Each job's id
is kept beside the point's attempt record (``.job.json``), so a job that is still queued, or that died before it got
to its point (``kill -9``, the out-of-memory killer, ``scancel`` while it starts), shows as pending or failed with its
cause (:func:`lwbench.sweeps.jobs.job_status`: submitit's state of the job, its process, the error line of its log),
never as a point nobody ran. Points whose row exists are not submitted: re-submitting a sweep submits only what is
missing.

On SLURM, ``array_parallelism`` is SLURM's own limit (``%N`` of the array). The local executor has none, so this
module submits at most that many jobs at a time and the next one when one ends: a window, not a scheduler.

Timing caveat: jobs that share a machine time each other's load; every row's ``machine_busy`` says so. For
publishable latency, give each job its own GPU or node (``--gpus-per-job 1``).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from lwbench.errors import ConfigError
from lwbench.sweeps.jobs import error_line
from lwbench.sweeps.points import point_name, results_of, run_id
from lwbench.sweeps.spec import LaunchOptions
from lwbench.sweeps.status import attempted, point_status, record_job


def run_point(req, plugins: tuple[str, ...] = ()) -> None:
    """One job: the point's training and measurement, as ``lwbench run`` does, under its attempt record.
    Runs in the job's own process (submitit pickles this function and ``req``)."""
    from lwbench.registry import METHODS
    from lwbench.runner import run

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


def _failure(req, job, local: bool) -> str | None:
    """None when the ended ``job`` ran its point, else why not in one line, as ``--status`` says it."""
    from lwbench.results import ResultStore

    exc = None
    if job.paths.result_pickle.exists() or not local:  # waits a little for the result: a shared disk may lag
        exc = job.exception()
        if exc is None:
            return None
    status = point_status(ResultStore(results_of(req)), point_name(req), run_id(req))
    if status.state == "failed":
        return status.detail
    return error_line(str(exc or "")) or f"job {job.job_id} ended ({job.state}) without its point's row"


def submit_sweep(points: list, options: LaunchOptions, plugins: tuple[str, ...] = (),
                 folder: Path | None = None) -> list[tuple[str, str]]:
    """Submit one job per point whose row is missing, wait for them, and return the failures as (point, one-line
    reason) like :func:`lwbench.sweeps.local.run_local`. Job logs go to ``folder`` (default
    ``<results>/.sweep/jobs``)."""
    from lwbench.results import ResultStore

    todo, failures = [], []
    for req in points:
        try:
            rid = run_id(req)
        except Exception as exc:  # cannot be planned: fails here, as in a local sweep, without a job
            failures.append((point_name(req), str(exc).splitlines()[0]))
            continue
        if not ResultStore(results_of(req)).has(rid) or req.force:
            todo.append(req)
    done = len(points) - len(todo) - len(failures)
    print(f"lwbench: sweep: {len(points)} points, {done} done already, {len(failures)} refused, submitting "
          f"{len(todo)} job(s)", file=sys.stderr, flush=True)
    if not todo:
        return failures
    root = results_of(todo[0])
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
                record_job(results_of(r), run_id(r), {
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


__all__ = ["submit_sweep", "run_point"]
