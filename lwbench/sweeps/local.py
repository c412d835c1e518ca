"""A sweep in this process: every point trained first, then evaluated and timed one at a time.

Each point is an ordinary ``lwbench run``: done points are skipped through the results store, caches make reruns
cheap, and one failing point is reported without stopping the rest. Two passes (``--phase`` runs one) so that no
latency is taken beside a training job of the same sweep. ``--shard i/n`` splits the grid for an external launcher
(several local processes) instead of a home-made scheduler; ``--dry-run`` prints what would happen.
"""

from __future__ import annotations

import sys
import time
import traceback

from lwbench.errors import ConfigError, LwbenchError
from lwbench.sweeps.points import plan_of, point_name, preflight, results_of
from lwbench.sweeps.status import attempted

PHASES = ("all", "train", "measure")


def teacher_state(plan, seen: set) -> str:
    """``cached``, ``shipped`` (installed on first use), ``train N steps`` (the first point that needs it) or
    ``(trained above)`` for the next points of the same teacher."""
    from lwbench.paths import cache_dir
    from lwbench.shipping import shipped_folder
    from lwbench.training.teacher import is_done

    cfg = plan.cfg
    steps = int(cfg.teacher.steps) + int(cfg.teacher.probe_steps)
    if steps <= 0:
        return "none (untrained head)"
    if not cfg.retrain_teacher and is_done(cache_dir() / "teachers" / plan.teacher_id):
        return "cached"
    if not cfg.retrain_teacher and shipped_folder(plan.teacher_id) is not None:
        return "shipped"
    if plan.teacher_id in seen:
        return "(trained above)"
    seen.add(plan.teacher_id)
    return f"train {steps} steps"


def stage_state(plan, effort: dict) -> str:
    """The point's own training stages in the cache: ``-`` (none to train), ``cached`` (every stage folder
    finished), ``partial`` (one resumes), ``to train``."""
    from lwbench.paths import cache_dir

    if not effort["pretrain_steps"] and not effort["finetune_steps"]:
        return "-"
    folder = cache_dir() / "runs" / plan.run_id
    stages = [d for d in folder.rglob("*") if d.is_dir() and ((d / "done.json").is_file() or
                                                            (d / "state.json").is_file())] if folder.is_dir() else []
    if not stages:
        return "to train"
    return "cached" if all((d / "done.json").is_file() for d in stages) else "partial (resumes)"


def dry_run_table(points: list) -> str:
    """What the sweep would do, point by point: nothing is built or trained."""
    from tabulate import tabulate

    from lwbench.results import ResultStore

    plans = preflight(points, plan_of)
    rows, seen, stores = [], set(), {}
    for j, cfg in enumerate(points, 1):
        plan = plans[point_name(cfg)]
        store = stores.setdefault(results_of(cfg), ResultStore(results_of(cfg)))
        done = store.has(plan.run_id)
        e = plan.effort()
        rows.append([j, cfg.method, plan.method.budget_str() or "-", e["regime"], cfg.task, cfg.seed, plan.run_id,
                     "done (skipped)" if done else "to run", "-" if done else teacher_state(plan, seen),
                     "-" if done else e["pretrain_steps"] or "-", "-" if done else e["finetune_steps"] or "-",
                     "-" if done else stage_state(plan, e)])
    todo = sum(r[7] == "to run" for r in rows)
    table = tabulate(rows, headers=["#", "method", "budget", "regime", "task", "seed", "run id", "row", "teacher",
                                    "pretrain steps", "finetune steps", "stages"])
    return f"{table}\n\n{len(points)} points, {todo} to run, {len(points) - todo} done; nothing was run (--dry-run)"


def _sweep_table(points: list, run_ids: dict) -> str:
    """The rows this sweep produced, cheapest first, and where they are."""
    import pandas as pd

    from lwbench.results import ResultStore
    from lwbench.tables import format_results

    frames, roots = [], []
    for root in dict.fromkeys(results_of(p) for p in points):
        ids = {run_ids[point_name(p)] for p in points if results_of(p) == root}
        df = ResultStore(root).frame(keep_config=True)
        if not df.empty and "run_id" in df:
            frames.append(df[df["run_id"].isin(ids)])
        roots.append(root)
    df = pd.concat(frames) if frames else pd.DataFrame()
    where = "; ".join(f"rows in {r}" for r in roots)
    tasks = sorted({p.task for p in points})
    hint = "; ".join(f"lwbench plot pareto --task {t}; lwbench report --task {t} --out DIR" for t in tasks)
    if df.empty:
        return f"no rows written; {where}"
    return f"{format_results(df, 'table').rstrip()}\n\n{where}\nnext: {hint}"


def summary(n: int, failures: list[tuple[str, str]], t0: float) -> None:
    """The sweep's last lines: how many points are done, and each failure with its reason."""
    mins = (time.perf_counter() - t0) / 60
    print(f"lwbench: sweep done: {n - len(failures)}/{n} points ok in {mins:.1f} min", file=sys.stderr)
    for name, why in failures:
        print(f"  failed: {name}: {why}", file=sys.stderr)


def run_local(points: list, phase: str = "all", debug: bool = False, table: bool = True) -> list[tuple[str, str]]:
    """Run every point here; return the failures as (point, one-line reason).

    ``phase`` ``train`` trains every point's stages (cached), ``measure`` evaluates, times and writes each row
    (training what is still missing), ``all`` (default) does the first pass over every point, then the second.
    ``table=False``: no table of the rows at the end (``lwbench compare`` prints its own)."""
    from lwbench.runner import run, train_only

    if phase not in PHASES:
        raise ConfigError(f"--phase must be one of {', '.join(PHASES)}, not '{phase}'")
    run_ids = preflight(points)
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    passes = {"all": [("train", train_only), ("measure", run)], "train": [("train", train_only)],
              "measure": [("measure", run)]}[phase]
    for label, step in passes:
        pass_t0 = time.perf_counter()
        for j, cfg in enumerate(points, 1):
            name = point_name(cfg)
            if name in failures:  # failed in the training pass: one reason is enough
                continue
            eta = ""
            if j > 1:  # points differ in cost (cached ones are instant): a rough guide
                left = (time.perf_counter() - pass_t0) / (j - 1) * (len(points) - j + 1)
                eta = f", eta ~{left / 60:.0f} min"
            print(f"lwbench: sweep {label} [{j}/{len(points)}{eta}] {name}", file=sys.stderr, flush=True)
            try:
                attempted(cfg, label, step)
            except LwbenchError as exc:
                failures[name] = str(exc)
                print(f"lwbench: sweep: FAILED {name}: {exc}", file=sys.stderr)
            except Exception as exc:  # one broken point must not stop the sweep
                failures[name] = f"{type(exc).__name__}: {exc}"
                print(f"lwbench: sweep: FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if debug:
                    traceback.print_exc()
    out = list(failures.items())
    if phase != "train" and table:
        print(_sweep_table(points, run_ids))
    summary(len(points), out, t0)
    return out


__all__ = ["run_local", "dry_run_table", "summary", "teacher_state", "stage_state", "PHASES"]
