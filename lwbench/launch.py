"""``lwbench sweep FILE --launcher submitit``: every missing point of a sweep as one job of a submitit job array.

lwbench does not schedule anything itself: submitit does (SLURM where ``sbatch`` exists, its local executor
elsewhere, the same code path). Each job runs one point, training and measuring it, exactly as ``lwbench run``
would, under the point's attempt record (:mod:`lwbench.sweep_status`), so ``lwbench sweep FILE --status`` sees it
running, failed (with the error line and the job's log) or dead (killed, out of memory, out of time). Points
whose row exists are not submitted: re-submitting a sweep submits only what is missing.

On SLURM, ``array_parallelism`` is SLURM's own limit (``%N`` of the array). The local executor has none, so this
module submits at most that many jobs at a time and the next one when one ends: a window, not a scheduler.

Timing caveat: jobs that share a machine time each other's load; every row's ``machine_busy`` says so. For
publishable latency, give each job its own GPU or node (``--gpus-per-job 1``).
"""

from __future__ import annotations

import dataclasses
import os
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


def _reason(exc: BaseException) -> str:
    """One line for a failed job: the last non-empty line of submitit's message (the job's own exception)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def submit_sweep(points: list, options: LaunchOptions, plugins: tuple[str, ...] = (),
                 folder: Path | None = None) -> list[tuple[str, str]]:
    """Submit one job per point whose row is missing, wait for them, and return the failures as (point, one-line
    reason) like :func:`lwbench.sweep.run_sweep`. Job logs go to ``folder`` (default ``<results>/.sweep/jobs``)."""
    from lwbench.results import ResultStore
    from lwbench.sweep import _results_of, _run_id, point_name

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
            print(f"lwbench: sweep: submitted {point_name(running[-1][0])} as job {running[-1][1].job_id}",
                  file=sys.stderr, flush=True)
        time.sleep(0.5)
        still = []
        for req, job in running:
            if not job.done():
                still.append((req, job))
                continue
            name = point_name(req)
            try:
                job.result()
                print(f"lwbench: sweep: done {name} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
            except Exception as exc:
                failures.append((name, _reason(exc)))
                print(f"lwbench: sweep: FAILED {name}: {_reason(exc)} (log: {job.paths.stderr})", file=sys.stderr)
        running = still
    return failures


__all__ = ["LAUNCHERS", "LaunchOptions", "submit_sweep", "run_point", "options_from", "check_launch_section"]
