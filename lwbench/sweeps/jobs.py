"""What became of a submitted job: its state (queued, starting, ended and why) and the line of its log that says why.

A job of ``--launcher submitit`` leaves its record (``.job.json``: id, cluster, host, folder, log) beside its
point's attempt record; :func:`job_status` reads submitit's view of it from any process, so ``lwbench sweep FILE
--status`` can say pending, running or failed (out of memory, out of time, killed, or the job's error line) for a
point whose job never got to run it.
"""

from __future__ import annotations

import re
import socket
from typing import Any

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


__all__ = ["job_status", "error_line"]
