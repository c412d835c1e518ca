"""A sweep's point: its name in messages, its results folder, its run id, and planning them all before any work."""

from __future__ import annotations

from pathlib import Path

from lwbench.errors import ConfigError, LwbenchError
from lwbench.paths import results_dir

MAX_PROBLEMS = 10  # problems listed in one error; the rest are counted


def problem_list(header: str, problems: list[str]) -> ConfigError:
    """One error for several problems: ``header``, then the first :data:`MAX_PROBLEMS` as ``  - p`` lines and how
    many more there are (the sweep file's problems, and the points that cannot run)."""
    shown = problems[:MAX_PROBLEMS]
    more = [f"  ... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
    return ConfigError("\n".join([header, *(f"  - {p}" for p in shown), *more]))


def point_name(cfg) -> str:
    """``random k=8 finetuned on traffic_signs (seed 0)``: how progress lines and errors name a point."""
    return f"{cfg.method} {cfg.budget or '-'} {cfg.regime} on {cfg.task} (seed {cfg.seed})"


def results_of(cfg) -> Path:
    """The results folder the point's row goes to."""
    return Path(cfg.results) if cfg.results else results_dir()


def plan_of(cfg):
    """The point's :class:`~lwbench.runner.Plan` (quietly: planning a sweep prints nothing per point)."""
    from lwbench.runner import Plan

    return Plan(cfg.replace(quiet=True))


def run_id(cfg) -> str:
    return plan_of(cfg).run_id


def preflight(points: list, plan=None) -> dict:
    """Every point planned before any work (budget ranges, backbone and task shapes, refusals): a point that
    cannot be planned would fail the same way after hours of other points' training, so every such problem is
    reported now, together, and nothing runs. Returns ``plan(point)`` (its run id by default) by point name."""
    plans, problems = {}, []
    for cfg in points:
        try:
            plans[point_name(cfg)] = (plan or run_id)(cfg)
        except LwbenchError as exc:
            problems.append(f"{point_name(cfg)}: {str(exc).splitlines()[0]}")
    if problems:
        raise problem_list(f"{len(problems)} of the sweep's {len(points)} points cannot run (nothing was run):",
                           problems)
    return plans


__all__ = ["point_name", "results_of", "plan_of", "run_id", "preflight", "problem_list", "MAX_PROBLEMS"]
