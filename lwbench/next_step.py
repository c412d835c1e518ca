"""One line after ``run``, ``plot`` and ``report``: what the stored rows still lack for a fair picture, and the
command (with its time estimate) that adds it.

A single LookWhere row plotted alone teaches nothing: the first thing it needs is `full` in the same regime to be
paired with; then a second method; then, for a selector, the no-learning floor (`saliency`) at the same k. When the
picture is complete the line points at ``lwbench recommend``. Rows are judged within one teacher and test set (the
group the newest row belongs to), as every comparison in lwbench is.
"""

from __future__ import annotations

import pandas as pd

from lwbench.compare import REFERENCE


def _quote_results(results: str | None) -> str:
    return f" --results {results}" if results else ""


def _estimate(method: str, task: str, budget: str | None, regime: str, profile: str | None,
              results: str | None) -> tuple[str, bool]:
    """``("about 3 min", same_teacher_as_default)`` for one ``lwbench run`` (quietly planned, nothing built)."""
    from lwbench.config import resolve_config
    from lwbench.estimates import duration, point_estimate, timing_history
    from lwbench.results import ResultStore
    from lwbench.runner import Plan
    from lwbench.sweeps.points import results_of

    cfg = resolve_config(method, task, budget, profile=profile or "quick", regime=regime, results=results, quiet=True)
    plan = Plan(cfg)
    store = ResultStore(results_of(cfg))
    histories = timing_history(task, store.frame(task=task))
    return duration(point_estimate(plan, histories, store.has(plan.run_id)).seconds), plan.teacher_id


def _group_of_newest(df: pd.DataFrame) -> pd.DataFrame:
    keys = [k for k in ("teacher_id", "n_eval") if k in df]
    if not keys or df.empty:
        return df
    newest = df.sort_values("created_at").iloc[-1] if "created_at" in df else df.iloc[-1]
    mask = pd.Series(True, index=df.index)
    for k in keys:
        mask &= df[k].astype(str) == str(newest[k])
    return df[mask]


def _selection_methods() -> set[str]:
    from lwbench.registry import METHODS

    out = set()
    for name in METHODS.names():
        try:
            cls = METHODS.get(name)
        except Exception:  # a broken plugin is reported where it is used
            continue
        if getattr(cls, "kind", "") == "selection" and getattr(cls, "budget_key", None) == "k":
            out.add(name)
    return out


def next_step(df: pd.DataFrame, task: str, results: str | None = None) -> str | None:
    """The line, or None when there is nothing obvious to add. ``df``: stored rows of ``task``."""
    if df is None or df.empty or "method" not in df:
        return None
    rows = _group_of_newest(df[df["task"] == task] if "task" in df else df)
    if rows.empty:
        return None
    profile = str(rows["profile"].iloc[-1]) if "profile" in rows else None
    profile_flag = f" --profile {profile}" if profile and profile != "quick" else ""
    teacher = str(rows["teacher_id"].iloc[-1]) if "teacher_id" in rows else None
    others = rows[rows["method"] != REFERENCE]

    def suggest(why: str, method: str, budget: str | None, regime: str, command: str) -> str:
        try:
            eta, default_teacher = _estimate(method, task, budget, regime, profile, results)
        except Exception:  # an estimate must never stop the command that asked for it
            eta, default_teacher = "time unknown", teacher
        same = "" if default_teacher == teacher else " (with the same --set options as your rows: they use " \
                                                     f"teacher {teacher})"
        return f"next: {why}: `{command}`{same}, {eta}"

    for regime in sorted(others["regime"].dropna().unique()) if "regime" in others else []:
        if not ((rows["method"] == REFERENCE) & (rows["regime"] == regime)).any():
            label = {"finetuned": "fine-tuned"}.get(str(regime), str(regime).replace("_", " "))
            return suggest(f"no `{REFERENCE}` {label} row to pair the others with", REFERENCE, None, regime,
                           f"lwbench run --method {REFERENCE} --task {task} --regime {regime}{profile_flag}"
                           f"{_quote_results(results)}")
    if others["method"].nunique() < 2:
        have = others["method"].iloc[0] if len(others) else "lookwhere"
        methods = ",".join(dict.fromkeys([have, "saliency", "tome", "evit"]))
        return (f"next: one method is no comparison; `lwbench compare --task {task} --methods {methods}"
                f"{profile_flag}{_quote_results(results)} --dry-run` plans the smallest fair set and estimates it")
    selectors = _selection_methods() - {"saliency", "oracle", "random"}
    for r in others[others["method"].isin(selectors)].to_dict("records"):
        floor = (rows["method"] == "saliency") & (rows["budget"] == r["budget"]) & (rows["regime"] == r["regime"])
        if not floor.any():
            return suggest(f"{r['method']} {r['budget']} has no no-learning floor at the same k", "saliency",
                           r["budget"], r["regime"],
                           f"lwbench run --method saliency --task {task} --budget {r['budget']} --regime "
                           f"{r['regime']}{profile_flag}{_quote_results(results)}")
    best = pd.to_numeric(rows["metric_value"], errors="coerce").max()
    return (f"next: which of these wins at your accuracy: `lwbench recommend --task {task} --min-accuracy "
            f"{max(0.0, best - 2):.0f}{_quote_results(results)}`")


def print_next_step(df: pd.DataFrame, task: str, results: str | None = None) -> None:
    """Print :func:`next_step`'s line if there is one; never fails the command it follows."""
    try:
        line = next_step(df, task, results)
    except Exception as exc:  # the hint is a courtesy; the command's own output is what counts
        line = f"next: (no suggestion: {type(exc).__name__}: {exc})"
    if line:
        print(line)


__all__ = ["next_step", "print_next_step"]
