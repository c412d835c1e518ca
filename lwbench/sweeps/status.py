"""Where each point of a sweep stands: done, running, failed or pending (``lwbench sweep FILE --status``), and the
attempt record that a point's work runs under.

A point is **done** when its row is in the results store; nothing else counts, so a point is never reported done
from a half-written state (rows are written atomically). While a sweep works on a point it holds a lock on
``<results>/.sweep/<run_id>/.lock`` and keeps ``.attempt.json`` beside it: who (host, pid), since when, in which
pass, and where its log is. The attempt ends in one of two ways:

- the point fails with an error: the attempt says ``failed`` with the error's first line;
- the process dies (``kill -9``, the out-of-memory killer, a job's time limit): nobody updates the file, but the
  kernel drops the lock with the process, so a free lock on an attempt still marked ``running`` means it died.

A re-run of the sweep retries failed and died points and skips done ones, as every lwbench run does. The same files
serve a sweep in one shell, several shards, or a job array. A job of ``--launcher submitit`` also leaves its id in
``.job.json`` beside them: a point without an attempt record whose job is queued, starting or already dead (killed
before it got to the point) is pending, running or failed as :func:`lwbench.sweeps.jobs.job_status` says.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lwbench.locks import is_held, stage_lock
from lwbench.paths import write_text_atomic
from lwbench.sweeps.jobs import job_status
from lwbench.sweeps.points import point_name, results_of, run_id

STATE_DIR = ".sweep"
ATTEMPT = ".attempt.json"
JOB = ".job.json"
STATES = ("done", "running", "failed", "pending")


def point_dir(results: Path, run_id: str) -> Path:
    return Path(results) / STATE_DIR / run_id


def _write(folder: Path, record: dict, name: str = ATTEMPT) -> None:
    write_text_atomic(folder / name, json.dumps(record, indent=1) + "\n")


def _read(file: Path) -> dict | None:
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_job(results: Path, run_id: str, job: dict) -> None:
    """Keep the submitit job of a point (id, cluster, folder, log) for ``--status``; see :mod:`lwbench.sweeps.jobs`."""
    folder = point_dir(results, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, job, JOB)


@contextlib.contextmanager
def attempt(results: Path, run_id: str, point: str, phase: str) -> Iterator[None]:
    """Hold the point's lock and record the attempt while the ``with`` block works on it. An exception is
    recorded as ``failed`` (its first line) and raised on; success removes the record (the row speaks now, or,
    after a training pass, the cached stages)."""
    folder = point_dir(results, run_id)
    with stage_lock(folder, f"sweep point {point}"):
        record = {"state": "running", "point": point, "run_id": run_id, "phase": phase, "host": socket.gethostname(),
                  "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "log": os.environ.get("LWBENCH_JOB_LOG", "")}
        _write(folder, record)
        try:
            yield
        except BaseException as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            why = first if isinstance(exc, Exception) and str(exc).strip() else f"{type(exc).__name__}: {first}"
            _write(folder, {**record, "state": "failed", "error": why, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raise
        (folder / ATTEMPT).unlink(missing_ok=True)


@dataclass(frozen=True)
class PointStatus:
    point: str
    run_id: str
    state: str  # one of STATES
    detail: str = ""  # the error line of a failed point, the host/pid of a running one
    log: str = ""


def point_status(store, point: str, run_id: str) -> PointStatus:
    """The state of one point from the store and its attempt record (see the module docstring)."""
    if store.has(run_id):
        return PointStatus(point, run_id, "done")
    folder = point_dir(store.root, run_id)
    record, job = _read(folder / ATTEMPT), _read(folder / JOB)
    if is_held(folder):
        who = f"{record.get('host', '?')} pid {record.get('pid', '?')}, {record.get('phase', '?')} pass since " \
              f"{record.get('started', '?')}" if record else "locked by another process"
        return PointStatus(point, run_id, "running", who, (record or {}).get("log", ""))
    if record is None and job is None:
        return PointStatus(point, run_id, "pending")
    if record is None:  # submitted, and its job has not got to the point (yet, or ever)
        return PointStatus(point, run_id, *job_status(job), job.get("stdout", ""))
    if record.get("state") == "failed":
        return PointStatus(point, run_id, "failed", str(record.get("error", "")), record.get("log", ""))
    if job and job.get("stdout") and job.get("stdout") == record.get("log"):  # died in this job: what its job says
        state, detail = job_status(job)
        if state == "failed":
            return PointStatus(point, run_id, "failed", detail, record.get("log", ""))
    return PointStatus(point, run_id, "failed",
                       f"the process ({record.get('host', '?')} pid {record.get('pid', '?')}, {record.get('phase')} "
                       f"pass) ended without a row or an error: killed, out of memory or out of time",
                       record.get("log", ""))


def attempted(cfg, phase: str, step) -> None:
    """``step(cfg)`` under the point's attempt record, so ``--status`` sees it running, failed or dead: the one way
    a local sweep and a submitit job both run a point."""
    with attempt(results_of(cfg), run_id(cfg), point_name(cfg), phase):
        step(cfg)


def sweep_status(points: list) -> list[PointStatus]:
    """Every point's :class:`PointStatus`, in the sweep's order; reads, never runs."""
    from lwbench.errors import LwbenchError
    from lwbench.results import ResultStore

    stores: dict = {}
    out = []
    for cfg in points:
        store = stores.setdefault(results_of(cfg), ResultStore(results_of(cfg)))
        try:
            rid = run_id(cfg)
        except LwbenchError as exc:  # the point cannot even be planned: a sweep run fails it the same way
            out.append(PointStatus(point_name(cfg), "-", "failed", str(exc).splitlines()[0]))
            continue
        out.append(point_status(store, point_name(cfg), rid))
    return out


def format_status(statuses: list[PointStatus]) -> str:
    from tabulate import tabulate

    counts = {s: sum(p.state == s for p in statuses) for s in STATES}
    body = [[p.state, p.point, p.run_id, p.detail + (f" (log: {p.log})" if p.log else "")] for p in statuses]
    table = tabulate(body, headers=["state", "point", "run id", "detail"], tablefmt="simple")
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES)
    return f"{table}\n\n{len(statuses)} points: {summary}"


__all__ = ["attempt", "attempted", "point_status", "sweep_status", "format_status", "PointStatus", "STATES",
           "point_dir", "record_job"]
