"""How long a point will take before it runs: the training not cached yet, then one evaluation and paired timing.

Read from the rows already stored for the task (this machine's own results first; else the committed reference rows
of the task, measured on a 2-core CPU; else a coarse rule), so a newcomer sees "about 4 min" before pressing enter,
and where that number came from. A cached teacher or training stage costs nothing; a done point is skipped.
Estimates are for planning, never stored in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

#: Coarse rule when no row of the task exists: seconds per training step (the quick traffic-signs teacher took
#: 2995 s for 2000 steps on the reference 2-core CPU) and per evaluation + paired timing (21-124 s there).
RULE_S_PER_STEP = 1.5
RULE_MEASURE_S = 60.0

_TIME_COLUMNS = ("method", "regime", "method_train_time_s", "wall_time_s", "pretrain_steps", "finetune_steps",
                 "teacher_train_time_s", "teacher_steps")


@dataclass(frozen=True)
class Estimate:
    """``seconds`` to finish a point (0 when its row exists) and which rows the estimate was read from."""

    seconds: float
    source: str


def reference_rows_path(task: str) -> Path:
    """The committed reference rows of ``task`` in a clone of the repository (absent in a wheel install)."""
    return Path(__file__).resolve().parents[1] / "benchmarks" / "reference" / task / "rows.csv"


def timing_history(task: str, stored: pd.DataFrame | None = None) -> list[tuple[pd.DataFrame, str]]:
    """Rows to estimate from, best first: ``stored`` rows of ``task`` that carry their times (this machine), then
    the committed reference rows (absent in a wheel install). :func:`point_estimate` reads each method from the
    first that has it, so one LookWhere row of yours does not stand in for `full` when the reference has `full`."""
    out = []
    if stored is not None and len(stored) and "method_train_time_s" in stored:
        mine = stored[stored["task"] == task] if "task" in stored else stored
        if len(mine):
            out.append((mine[[c for c in _TIME_COLUMNS if c in mine]], "your stored rows"))
    path = reference_rows_path(task)
    if path.is_file():
        ref = pd.read_csv(path)
        out.append((ref[[c for c in _TIME_COLUMNS if c in ref]], "the committed reference rows (2-core CPU)"))
    return out


def _pick(histories: list[tuple[pd.DataFrame, str]], method: str) -> tuple[pd.DataFrame, str]:
    """The first history with rows of ``method``, else the first with any row, else an empty one (the rule)."""
    for frame, source in histories:
        if "method" in frame and (frame["method"] == method).any():
            return frame, source
    for frame, source in histories:
        if len(frame):
            return frame, source
    return pd.DataFrame(columns=list(_TIME_COLUMNS)), "a rule of thumb"


def _median(values: Any) -> float | None:
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    return float(v.median()) if len(v) else None


def _per_step(history: pd.DataFrame, method: str) -> float | None:
    """Seconds per training step of ``method`` (any row of it that trained), else of any method."""
    trained = history[pd.to_numeric(history.get("finetune_steps", 0), errors="coerce").fillna(0)
                      + pd.to_numeric(history.get("pretrain_steps", 0), errors="coerce").fillna(0) > 0]
    if not len(trained):
        return None
    steps = trained["finetune_steps"].astype(float) + trained["pretrain_steps"].astype(float)
    rate = trained["method_train_time_s"].astype(float) / steps
    own = rate[trained["method"] == method]
    return _median(own) if len(own.dropna()) else _median(rate)


def point_estimate(plan: Any, histories: list[tuple[pd.DataFrame, str]], done: bool = False,
                   teacher_counted: set[str] | None = None) -> Estimate:
    """Seconds until ``plan``'s row is stored, from the first of ``histories`` (:func:`timing_history`) that has
    the method. ``teacher_counted``: teacher ids already charged to an earlier point of the same plan (a teacher
    trains once); the set is updated."""
    from lwbench.sweeps.local import stage_state, teacher_state

    history, source = _pick(histories, plan.cfg.method)
    if done:
        return Estimate(0.0, source)
    seconds = 0.0
    seen = teacher_counted if teacher_counted is not None else set()
    state = teacher_state(plan, seen)
    if state.startswith("train"):
        steps = int(plan.cfg.teacher.steps) + int(plan.cfg.teacher.probe_steps)
        rates = (history["teacher_train_time_s"].astype(float) / history["teacher_steps"].astype(float)
                 if {"teacher_train_time_s", "teacher_steps"} <= set(history) and len(history) else [])
        seconds += steps * (_median(rates) or RULE_S_PER_STEP)
    effort = plan.effort()
    steps = int(effort["pretrain_steps"]) + int(effort["finetune_steps"])
    if steps and stage_state(plan, effort) != "cached":
        seconds += steps * (_per_step(history, plan.cfg.method) or RULE_S_PER_STEP)
    own = history[history["method"] == plan.cfg.method] if "method" in history else history
    seconds += _median(own.get("wall_time_s", [])) or _median(history.get("wall_time_s", [])) or RULE_MEASURE_S
    return Estimate(seconds, source)


def duration(seconds: float) -> str:
    """``about 40 s`` / ``about 4 min`` / ``about 1.5 h``: the precision an estimate deserves."""
    if not math.isfinite(seconds) or seconds <= 0:
        return "nothing to run"
    if seconds < 90:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


__all__ = ["Estimate", "point_estimate", "timing_history", "duration", "reference_rows_path", "RULE_S_PER_STEP",
           "RULE_MEASURE_S"]
