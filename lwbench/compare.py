"""``lwbench compare``: the smallest equal-effort set of runs that gives a fair frontier, planned, run, plotted.

A newcomer names methods; a fair picture needs more than their rows: `full` in the same regime (the reference every
row is paired with), every method on the same teacher and recipe, and the training-free methods fine-tuned like the
trained ones when any method needs training. :func:`comparison_spec` writes that as a sweep (so it runs in two
passes, resumes, and skips rows already stored), :func:`planned_points` estimates each point
(:mod:`lwbench.estimates`), and :func:`compare` runs it and ends with the table, the paired differences and the plot.

The regime rule: when every named method is training-free the comparison is off the shelf (no training at all);
otherwise it is fine-tuned, every method and `full` with the profile's one recipe. ``--regimes`` overrides it.
Budgets are given by their key (``--budgets k=28,r=8``) and apply to every method with that key, so two selectors
always meet at the same k; a method with no budget given runs at its default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwbench.errors import ConfigError
from lwbench.estimates import Estimate, duration, point_estimate, timing_history
from lwbench.options import split_list

REFERENCE = "full"


def default_regimes(methods: Sequence[str]) -> list[str]:
    """Off the shelf when every method is training-free (nothing to train), else fine-tuned for all."""
    from lwbench.registry import get_method

    return ["off_the_shelf"] if all(get_method(m).training_free for m in methods) else ["finetuned"]


def shared_default(method: str, task: str, flags: Mapping[str, Any] | None, sets: Sequence[str]) -> str | None:
    """``key=value`` of ``method``'s default budget on ``task`` as a run with ``flags`` and ``sets`` would build it."""
    from lwbench.config import resolve_config
    from lwbench.runner import Plan

    f = {k: v for k, v in dict(flags or {}).items() if v is not None and k != "regime"}
    profile = f.pop("profile", None) or "quick"
    return Plan(resolve_config(method, task, None, profile=profile, sets=list(sets), **{**f, "quiet": True})
                ).method.budget_str() or None


def comparison_spec(task: str, methods: Sequence[str], budgets: Sequence[str] = (),
                    regimes: Sequence[str] | None = None, profile: str | None = None,
                    flags: Mapping[str, Any] | None = None, sets: Sequence[str] = ()) -> dict[str, Any]:
    """The sweep (as a sweep file's mapping) that compares ``methods`` on ``task`` fairly: ``full`` added, budgets
    matched to methods by key, the regime from :func:`default_regimes` unless given. Methods that share a budget key
    with no budget given meet at the first one's default (LookWhere's k=28 for `saliency` beside it, not its own
    k=38), resolved with the run's ``flags`` and ``sets``."""
    from lwbench.registry import get_method

    names = split_list(methods)
    if not names:
        raise ConfigError("--methods is empty; name the methods to compare, e.g. --methods lookwhere,tome,evit")
    classes = {m: get_method(m) for m in names}  # unknown names: one line with close matches
    by_key: dict[str, list[str]] = {}
    for b in split_list(budgets):
        key, sep, value = b.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--budgets item '{b}' must look like key=value, e.g. --budgets k=28,r=8")
        by_key.setdefault(key.strip(), []).append(f"{key.strip()}={value.strip()}")
    unused = sorted(set(by_key) - {c.budget_key for c in classes.values()})
    if unused:
        keys = ", ".join(f"{m}: {c.budget_key}" for m, c in classes.items() if c.budget_key) or "none"
        raise ConfigError(f"--budgets {', '.join(k + '=...' for k in unused)} matches none of the methods' budget "
                          f"keys ({keys})")
    for key in {c.budget_key for c in classes.values() if c.budget_key} - set(by_key):
        sharing = [m for m, c in classes.items() if c.budget_key == key]
        if len(sharing) > 1:
            run_flags = {**dict(flags or {}), **({"profile": profile} if profile else {})}
            leader = shared_default(sharing[0], task, run_flags, sets)
            if leader:
                by_key[key] = [leader]
    spec_methods: dict[str, Any] = {REFERENCE: None}
    for m, c in classes.items():
        spec_methods[m] = by_key.get(c.budget_key) if c.budget_key else None
    spec = {"tasks": [task], "methods": spec_methods,
            "regimes": list(regimes) if regimes else default_regimes(list(classes))}
    if profile:
        spec["profile"] = profile
    return spec


@dataclass(frozen=True)
class PlannedPoint:
    cfg: Any
    plan: Any
    done: bool
    estimate: Estimate


def planned_points(spec: Mapping[str, Any], flags: Mapping[str, Any] | None = None,
                   sets: Sequence[str] = ()) -> list[PlannedPoint]:
    """Every point of ``spec`` planned (nothing built), whether its row is stored, and how long it will take."""
    from lwbench.results import ResultStore
    from lwbench.sweeps import expand, parse_spec
    from lwbench.sweeps.points import plan_of, preflight, results_of

    points = expand(parse_spec(dict(spec)), flags, sets)
    plans = preflight(points, plan_of)
    out, counted, stores, history = [], set(), {}, {}
    for cfg in points:
        from lwbench.sweeps.points import point_name

        plan = plans[point_name(cfg)]
        root = results_of(cfg)
        store = stores.setdefault(root, ResultStore(root))
        if (root, cfg.task) not in history:
            history[(root, cfg.task)] = timing_history(cfg.task, store.frame(task=cfg.task))
        done = store.has(plan.run_id)
        out.append(PlannedPoint(cfg, plan, done, point_estimate(plan, history[(root, cfg.task)], done, counted)))
    return out


def plan_table(points: Sequence[PlannedPoint]) -> str:
    """The points, what each still needs and its estimate, then the total and where the estimates come from."""
    from tabulate import tabulate

    from lwbench.sweeps.local import stage_state

    rows = []
    for j, p in enumerate(points, 1):
        e = p.plan.effort()
        steps = int(e["pretrain_steps"]) + int(e["finetune_steps"])
        needs = "-" if p.done else (f"{steps} steps ({stage_state(p.plan, e)})" if steps else "evaluate + time")
        rows.append([j, p.cfg.method, p.plan.method.budget_str() or "-", e["regime"],
                     "stored (skipped)" if p.done else "to run", needs,
                     "-" if p.done else duration(p.estimate.seconds)])
    total = sum(p.estimate.seconds for p in points)
    todo = sum(not p.done for p in points)
    sources = sorted({p.estimate.source for p in points if not p.done})
    table = tabulate(rows, headers=["#", "method", "budget", "regime", "row", "training", "estimate"])
    tail = (f"{len(points)} points, {todo} to run: {duration(total)} in all"
            + (f" (estimated from {' and '.join(sources)})" if sources else ""))
    return f"{table}\n\n{tail}"


def compare(task: str, methods: Sequence[str], budgets: Sequence[str] = (), regimes: Sequence[str] | None = None,
            flags: Mapping[str, Any] | None = None, sets: Sequence[str] = (), dry_run: bool = False,
            plot_out: str | Path | None = None, debug: bool = False) -> int:
    """Plan, show, run (unless ``dry_run``), then print the table and paired differences and draw the plot.
    Returns the number of points that failed."""
    spec = comparison_spec(task, methods, budgets, regimes, flags=flags, sets=sets)
    points = planned_points(spec, flags, sets)
    print(plan_table(points))
    if dry_run:
        print("nothing was run (--dry-run); drop --dry-run to run it")
        return 0
    from lwbench.sweeps import run_sweep

    failures = run_sweep(spec, flags, sets, debug=debug, table=False)
    show_comparison(points, plot_out)
    return len(failures)


def show_comparison(points: Sequence[PlannedPoint], plot_out: str | Path | None = None) -> Path | None:
    """The compared rows only (never other rows of the results folder): table, paired differences, Pareto plot."""
    import pandas as pd

    from lwbench.plots import pareto_plot
    from lwbench.report import paired_rows
    from lwbench.results import ResultStore, rows_to_frame
    from lwbench.sweeps.points import results_of
    from lwbench.tables import format_results

    if not points:
        return None
    root = results_of(points[0].cfg)
    store = ResultStore(root)
    rows = [r for r in (store.get(p.plan.run_id) for p in points) if r]
    if not rows:
        print("no row of the comparison was stored (see the failures above)")
        return None
    df: pd.DataFrame = rows_to_frame(rows, keep_config=True)
    print(format_results(df, "table"))
    for d in paired_rows(store, rows):
        print(f"{d['method']} {d['budget']} ({d['regime']}): {d['diff']:+.1f} [{d['ci_low']:+.1f}, "
              f"{d['ci_high']:+.1f}] points vs {REFERENCE}, paired over {d['n']} images, "
              f"{d['gmacs_ratio']:.1f}x fewer GMACs")
    task = points[0].cfg.task
    out = Path(plot_out) if plot_out else Path(root) / f"compare_{task}_gmacs.png"
    path = pareto_plot(df, task, x="gmacs", out=out)
    print(f"plot: {path}")
    return path


__all__ = ["comparison_spec", "planned_points", "plan_table", "compare", "show_comparison", "default_regimes",
           "split_list", "PlannedPoint"]
