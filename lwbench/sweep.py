"""``lwbench sweep FILE``: a grid of methods x budgets x tasks (x seeds), resumable and fault-tolerant.

Each point is an ordinary ``lwbench run``: done points are skipped through the results store, caches
make reruns cheap, and one failing point is reported without stopping the rest. ``--shard i/n``
splits the grid for an external launcher (several local processes, or SLURM jobs through submitit)
instead of a home-made scheduler.

Sweep file::

    profile: quick          # optional, CLI --profile wins when given explicitly
    source: synthetic       # optional
    tasks: [traffic_signs, billiards]
    seeds: [0]
    methods:
      full: null            # no budget knob
      lowres: default       # the method's default grid for this backbone/size
      random: [k=8, k=16, k=32]
    set: [teacher.steps=4]  # optional --set overrides for every point (the command line's own --set wins)
    regimes: [off_the_shelf, finetuned]   # optional (default [auto]); a trainable method runs finetuned only

A sweep trains every point first and then evaluates and times them one at a time (``--phase`` runs one
pass), so no latency is taken beside a training job of the same sweep.

The file is checked by :func:`validate_sweep` before any point runs: unknown keys, malformed values and
unregistered task or method names are all reported together in one error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lwbench.config import load_yaml
from lwbench.errors import ConfigError, LwbenchError, UnknownNameError
from lwbench.launch import LAUNCHERS, check_launch_section
from lwbench.paths import results_dir
from lwbench.sweep_status import attempt

SWEEP_KEYS = ("profile", "source", "tasks", "seeds", "methods", "set", "regimes", "launch")
SWEEP_REGIMES = ("auto", "off_the_shelf", "finetuned")
PHASES = ("all", "train", "measure")
SWEEP_SOURCES = ("auto", "real", "synthetic")
MAX_PROBLEMS = 10  # listed in one error; the rest are counted
_NO_BUDGET = (None, "none")  # budgets meaning "run once, without a budget knob"


def _show(value: Any) -> str:
    """A YAML value as the user wrote it, shortened: ``'zero'``, ``[full, tome]``, ``true``."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v).strip("'") for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def _check_keys(spec: dict, problems: list[str]) -> None:
    for key in spec:
        if key in SWEEP_KEYS:
            continue
        close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        problems.append(f"unknown key '{key}'{hint} Valid keys: {', '.join(SWEEP_KEYS)}")


def _check_tasks(value: Any, problems: list[str]) -> list[str]:
    if value is None:
        problems.append("'tasks' is missing or empty; list the tasks to run, e.g. tasks: [traffic_signs]")
        return []
    if isinstance(value, str):  # `tasks: traffic_signs` clearly means a one-task list
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(f"'tasks' must be a non-empty list of task names like [traffic_signs, billiards], "
                        f"got {_kind(value) if value != [] else 'an empty list'}")
        return []
    tasks = []
    for t in value:
        if not isinstance(t, str) or not t.strip():
            problems.append(f"tasks: entry {_show(t)} is not a task name")
        elif t.strip() not in tasks:
            tasks.append(t.strip())
    return tasks


def _check_seeds(value: Any, problems: list[str]) -> list[int]:
    if value is None:
        return [0]
    if isinstance(value, int) and not isinstance(value, bool):  # `seeds: 3` means one seed
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(f"'seeds' must be a non-empty list of integers like [0, 1, 2], got "
                        f"{_show(value) if not isinstance(value, list) else 'an empty list'}")
        return []
    seeds = []
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int):
            problems.append(f"seeds: entry {_show(s)} is not an integer (seeds look like [0, 1, 2])")
        elif s < 0:
            problems.append(f"seeds: entry {s} is negative; seeds must be integers >= 0")
        elif s not in seeds:
            seeds.append(s)
    return seeds


def _budget_problem(method: str, budgets: Any) -> str | None:
    """Why ``budgets`` is not null / "default" / a list of key=value strings, or None if it is fine."""
    if budgets in _NO_BUDGET or budgets == "default":
        return None
    key = _budget_key(method) or "k"
    example = f"{method}: [{key}=8, {key}=16]"
    if not isinstance(budgets, list) or not budgets:
        return (f"methods: budgets of '{method}' must be null (no budget knob), default (its default grid) or a "
                f"list like [k=8, k=16], got {_show(budgets) if budgets != [] else 'an empty list'}")
    for b in budgets:
        key, sep, val = b.partition("=") if isinstance(b, str) else ("", "", "")
        try:
            float(val)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            return f"methods: budget {_show(b)} of '{method}' must look like key=value, e.g. {example}"
    return None


def _check_methods(value: Any, problems: list[str]) -> dict[str, Any]:
    if value is None or value == {}:
        problems.append("'methods' is missing or empty; map each method to its budgets, e.g. "
                        "methods: {full: null, tome: default, random: [k=8, k=16]}")
        return {}
    if isinstance(value, (list, str)):
        names = [value] if isinstance(value, str) else [n for n in value if isinstance(n, str)]
        form = ", ".join(f"{n}: {_default_budget_word(n)}" for n in names[:4]) or "full: null, tome: default"
        problems.append(f"'methods' must be a mapping of method name to budgets, not {_kind(value)}; write e.g. "
                        f"methods: {{{form}}} (null: no budget knob, default: the method's default grid, or a "
                        f"list like [k=8, k=16])")
        return {n: "default" for n in names}  # still check the names
    if not isinstance(value, dict):
        problems.append(f"'methods' must be a mapping of method name to budgets, got {_kind(value)}")
        return {}
    methods: dict[str, Any] = {}
    for name, budgets in value.items():
        if not isinstance(name, str):
            problems.append(f"methods: {_show(name)} is not a method name")
            continue
        if isinstance(budgets, str) and budgets not in ("default", "none") and "=" in budgets:
            budgets = [budgets]  # `random: k=8` means one budget
        why = _budget_problem(name, budgets)
        if why:
            problems.append(why)
        methods[name] = list(budgets) if isinstance(budgets, list) else budgets
    return methods


def _budget_key(name: str) -> str | None:
    """The method's budget key (``"k"``, ``"r"``, ...), None without a knob or when it cannot be loaded."""
    from lwbench.registry import METHODS

    try:
        return getattr(METHODS.get(name), "budget_key", None)
    except Exception:  # unknown or broken: reported elsewhere
        return None


def _default_budget_word(name: str) -> str:
    """``null`` for a method without a budget knob, else ``default`` (for the suggested mapping form)."""
    from lwbench.registry import METHODS

    try:
        return "null" if METHODS.get(name).budget_key is None else "default"
    except Exception:
        return "default"


def _check_set(value: Any, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        problems.append(f"'set' must be a list of key=value overrides like [teacher.steps=4], got {_kind(value)}")
        return []
    sets = []
    for item in value:
        if not isinstance(item, str) or "=" not in item or not item.partition("=")[0].strip():
            problems.append(f"set: entry {_show(item)} must look like key=value, e.g. teacher.steps=4")
        else:
            sets.append(item)
    return sets


def _check_names(tasks: list[str], methods: dict[str, Any], problems: list[str]) -> None:
    """Every task and method must be registered; budgets must use the method's own key."""
    from lwbench.registry import METHODS, TASKS

    for t in tasks:
        try:
            TASKS.get(t)
        except UnknownNameError as exc:
            problems.append(f"tasks: {exc}")
        except Exception:  # a broken plugin: its points fail one by one, with the reason
            pass
    for name, budgets in methods.items():
        try:
            cls = METHODS.get(name)
        except UnknownNameError as exc:
            problems.append(f"methods: {exc}")
            continue
        except Exception:
            continue
        key = getattr(cls, "budget_key", None)
        if key is None and isinstance(budgets, list):
            problems.append(f"methods: '{name}' has no budget knob; write {name}: null")
        elif key is None and budgets == "default":
            methods[name] = None  # no knob, no grid: one point, as with null
        elif key is not None and isinstance(budgets, list):
            bad = sorted({b.partition("=")[0].strip() for b in budgets if isinstance(b, str)} - {key})
            if bad:
                problems.append(f"methods: '{name}' takes budgets {key}=..., not {', '.join(f'{b}=...' for b in bad)}")


def validate_sweep(spec: dict, path: str) -> dict:
    """Check a sweep file before any work; return it normalised, or raise one ConfigError listing every problem.

    The returned mapping has exactly the keys of :data:`SWEEP_KEYS`: ``tasks`` a list of registered task
    names (a single string becomes a one-element list), ``seeds`` a list of ints (default ``[0]``),
    ``methods`` a dict name -> ``None`` | ``"default"`` | list of ``key=value`` strings, ``source`` one of
    :data:`SWEEP_SOURCES` or ``None``, ``profile`` a string or ``None``, ``set`` a list of ``key=value``
    overrides (default ``[]``). Running it through again is a no-op.
    """
    problems: list[str] = []
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path}: must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    _check_keys(spec, problems)
    profile = spec.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile.strip()):
        problems.append(f"'profile' must be a profile name like quick or a path to a profile YAML, "
                        f"got {_show(profile)}")
        profile = None
    source = spec.get("source")
    if source is not None and source not in SWEEP_SOURCES:
        close = difflib.get_close_matches(str(source), SWEEP_SOURCES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"'source' must be one of {', '.join(SWEEP_SOURCES)}, got {_show(source)}{hint}")
        source = None
    tasks = _check_tasks(spec.get("tasks"), problems)
    seeds = _check_seeds(spec.get("seeds"), problems)
    methods = _check_methods(spec.get("methods"), problems)
    sets = _check_set(spec.get("set"), problems)
    regimes = _check_regimes(spec.get("regimes"), problems)
    launch = check_launch_section(spec.get("launch"), problems)
    _check_names(tasks, methods, problems)
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"sweep file {path}: {problems[0]}")
        shown = problems[:MAX_PROBLEMS]
        more = len(problems) - len(shown)
        lines = [f"sweep file {path} has {len(problems)} problems (nothing was run):", *(f"  - {p}" for p in shown)]
        if more:
            lines.append(f"  ... and {more} more")
        raise ConfigError("\n".join(lines))
    return {"profile": profile, "source": source, "tasks": tasks, "seeds": seeds, "methods": methods, "set": sets,
            "regimes": regimes, "launch": launch}


def _check_regimes(value: Any, problems: list[str]) -> list[str]:
    if value is None:
        return ["auto"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(f"'regimes' must be a non-empty list out of {', '.join(SWEEP_REGIMES)}, got {_show(value)}")
        return ["auto"]
    bad = [v for v in value if v not in SWEEP_REGIMES]
    for v in bad:
        close = difflib.get_close_matches(str(v), SWEEP_REGIMES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"regimes: unknown regime {_show(v)} (use {', '.join(SWEEP_REGIMES)}){hint}")
    return [v for v in dict.fromkeys(value) if v in SWEEP_REGIMES] or ["auto"]


def sweep_points(spec: dict, base_request) -> list:
    """Expand the sweep into run requests (budgets resolved against each task's backbone).

    ``spec`` is a sweep mapping (validated here if it was not already); ``base_request(method, task, budget)``
    returns a request, and each point is ``dataclasses.replace(request, seed=..., budget=...)``.
    """
    from lwbench.runner import Plan

    spec = validate_sweep(spec, "<sweep>")
    tasks, methods = spec["tasks"], spec["methods"]
    from lwbench.registry import get_method

    points = []
    for seed in spec["seeds"]:
        for task in tasks:
            for method, budgets in methods.items():
                free = get_method(method).training == "none"
                # a trainable method has no off-the-shelf form: it runs once, fine-tuned, whatever the list says
                regimes = list(dict.fromkeys(r if free or r == "auto" else "finetuned" for r in spec["regimes"]))
                req = dataclasses.replace(base_request(method, task, None), seed=int(seed))
                if budgets == "default":
                    plan = Plan(dataclasses.replace(req, quiet=True))
                    key = plan.method_cls.budget_key
                    grid = plan.method_cls.budget_grid(plan.spec)
                    budgets = [f"{key}={b:g}" for b in grid]
                for regime in regimes:
                    for b in [None] if budgets in _NO_BUDGET else budgets:
                        points.append(dataclasses.replace(req, budget=None if b is None else str(b), regime=regime))
    return points


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if not shard:
        return None
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got '{shard}'")
    return i, n


def _results_of(req) -> Path:
    return Path(req.results) if req.results else results_dir()


def _run_id(req) -> str:
    from lwbench.runner import Plan

    return Plan(dataclasses.replace(req, quiet=True)).run_id


def _sweep_requests(path: str, args, make_request, shard: str | None = None):
    """The sweep file's points as run requests (the file's profile, source and ``set`` applied; the command
    line's own settings win), only this shard's when ``shard`` is given."""
    spec = validate_sweep(load_yaml(path), str(path))  # every problem at once, before any work
    span = _parse_shard(shard)
    args = copy.copy(args)  # the file's settings apply to this sweep only
    if spec["profile"] and args.profile == "quick" and "--profile" not in sys.argv:
        args.profile = spec["profile"]
    if spec["source"] and args.source in (None, "auto"):  # the CLI's --source wins when given
        args.source = spec["source"]
    if spec["set"]:  # before the CLI's own --set items, so that the command line wins on a clash
        args.set = [*spec["set"], *(getattr(args, "set", None) or [])]

    def base(method, task, budget):
        return make_request(args, method, task, budget)

    points = sweep_points(spec, base)
    if span:
        i, n = span
        points = points[i::n]
    return args, points, spec


def point_name(req) -> str:
    return f"{req.method} {req.budget or '-'} {req.regime} on {req.task} (seed {req.seed})"


def attempted(req, phase: str, step) -> None:
    """``step(req)`` under the point's attempt record, so ``--status`` sees it running, failed or dead
    (:mod:`lwbench.sweep_status`); the one way a local sweep and a submitit job both run a point."""
    with attempt(_results_of(req), _run_id(req), point_name(req), phase):
        step(req)


def sweep_status(path: str, args, make_request, shard: str | None = None):
    """Every point's :class:`~lwbench.sweep_status.PointStatus`, in the sweep's order; reads, never runs."""
    from lwbench.results import ResultStore
    from lwbench.sweep_status import PointStatus, point_status

    _, points, _ = _sweep_requests(path, args, make_request, shard)
    stores: dict = {}
    out = []
    for req in points:
        root = _results_of(req)
        store = stores.setdefault(root, ResultStore(root))
        try:
            run_id = _run_id(req)
        except LwbenchError as exc:  # the point cannot even be planned: a sweep run fails it the same way
            out.append(PointStatus(point_name(req), "-", "failed", str(exc).splitlines()[0]))
            continue
        out.append(point_status(store, point_name(req), run_id))
    return out


def _preflight(points: list, plan_of=None) -> dict:
    """Every point planned before any work (budget ranges, backbone and task shapes, refusals): a point that
    cannot be planned would fail the same way after hours of other points' training, so every such problem is
    reported now, together, and nothing runs. Returns each point's run id (or, with ``plan_of``, what it
    returns)."""
    plans, problems = {}, []
    for req in points:
        try:
            plans[point_name(req)] = (plan_of or _run_id)(req)
        except LwbenchError as exc:
            problems.append(f"{point_name(req)}: {str(exc).splitlines()[0]}")
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ConfigError(f"{len(problems)} of the sweep's {len(points)} points cannot run (nothing was run):\n" +
                          "\n".join(f"  - {p}" for p in shown) + more)
    return plans


def _teacher_state(plan, seen: set) -> str:
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


def _stage_state(plan, effort: dict) -> str:
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


def dry_run_table(points: list, plans: dict) -> str:
    """What ``lwbench sweep FILE`` would do, point by point: nothing is built or trained."""
    from tabulate import tabulate

    from lwbench.results import ResultStore

    rows, seen, stores = [], set(), {}
    for j, req in enumerate(points, 1):
        plan = plans[point_name(req)]
        root = _results_of(req)
        store = stores.setdefault(root, ResultStore(root))
        done = store.has(plan.run_id)
        e = plan.effort()
        rows.append([j, req.method, plan.method.budget_str() or "-", e["regime"], req.task, req.seed, plan.run_id,
                     "done (skipped)" if done else "to run", "-" if done else _teacher_state(plan, seen),
                     "-" if done else e["pretrain_steps"] or "-", "-" if done else e["finetune_steps"] or "-",
                     "-" if done else _stage_state(plan, e)])
    todo = sum(r[7] == "to run" for r in rows)
    table = tabulate(rows, headers=["#", "method", "budget", "regime", "task", "seed", "run id", "row", "teacher",
                                    "pretrain steps", "finetune steps", "stages"])
    return f"{table}\n\n{len(points)} points, {todo} to run, {len(points) - todo} done; nothing was run (--dry-run)"


def _sweep_table(points: list, run_ids: dict) -> str:
    """The rows this sweep produced, cheapest first, and where they are."""
    import pandas as pd

    from lwbench.results import ResultStore, format_results

    frames, roots = [], []
    for root in dict.fromkeys(_results_of(r) for r in points):
        ids = {run_ids[point_name(r)] for r in points if _results_of(r) == root}
        df = ResultStore(root).frame(keep_config=True)
        if not df.empty and "run_id" in df:
            frames.append(df[df["run_id"].isin(ids)])
        roots.append(root)
    df = pd.concat(frames) if frames else pd.DataFrame()
    where = "; ".join(f"rows in {r}" for r in roots)
    tasks = sorted({r.task for r in points})
    hint = "; ".join(f"lwbench plot pareto --task {t}; lwbench report --task {t} --out DIR" for t in tasks)
    if df.empty:
        return f"no rows written; {where}"
    return f"{format_results(df, 'table').rstrip()}\n\n{where}\nnext: {hint}"


def run_sweep(path: str, args, make_request, shard: str | None = None, phase: str = "all",
              launcher: str = "local") -> list[tuple[str, str]]:
    """Run every point; return the failures as (point, one-line reason).

    ``phase`` ``train`` trains every point's stages (cached), ``measure`` evaluates, times and writes each row
    (training what is still missing), ``all`` (default) does the first pass over every point, then the second.
    ``launcher`` ``submitit`` runs each missing point as one job instead (:mod:`lwbench.launch`)."""
    from lwbench.runner import run, train_only

    if phase not in PHASES:
        raise ConfigError(f"--phase must be one of {', '.join(PHASES)}, not '{phase}'")
    if launcher not in LAUNCHERS:
        close = difflib.get_close_matches(str(launcher), LAUNCHERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not '{launcher}'{hint}")

    args, points, spec = _sweep_requests(path, args, make_request, shard)
    if getattr(args, "dry_run", False):
        from lwbench.runner import Plan

        print(dry_run_table(points, _preflight(points, lambda r: Plan(dataclasses.replace(r, quiet=True)))))
        return []
    run_ids = _preflight(points)
    if launcher == "submitit":
        from lwbench.launch import options_from, submit_sweep

        if phase != "all":
            raise ConfigError("--phase is for local sweeps; with --launcher submitit every job trains and measures "
                              "its own point")
        t0 = time.perf_counter()
        failures = submit_sweep(points, options_from(spec["launch"], args),
                                plugins=tuple(getattr(args, "plugin", None) or ()))
        _summary(len(points), failures, t0)
        return failures
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    passes = [("train", train_only), ("measure", run)] if phase == "all" else \
        [("train", train_only)] if phase == "train" else [("measure", run)]
    for label, step in passes:
        pass_t0 = time.perf_counter()
        for j, req in enumerate(points, 1):
            name = point_name(req)
            if name in failures:  # failed in the training pass: one reason is enough
                continue
            eta = ""
            if j > 1:  # points differ in cost (cached ones are instant): a rough guide
                left = (time.perf_counter() - pass_t0) / (j - 1) * (len(points) - j + 1)
                eta = f", eta ~{left / 60:.0f} min"
            print(f"lwbench: sweep {label} [{j}/{len(points)}{eta}] {name}", file=sys.stderr, flush=True)
            try:
                attempted(req, label, step)
            except LwbenchError as exc:
                failures[name] = str(exc)
                print(f"lwbench: sweep: FAILED {name}: {exc}", file=sys.stderr)
            except Exception as exc:  # one broken point must not stop the sweep
                failures[name] = f"{type(exc).__name__}: {exc}"
                print(f"lwbench: sweep: FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if getattr(args, "debug", False):
                    traceback.print_exc()
    failures = list(failures.items())
    if phase != "train":
        print(_sweep_table(points, run_ids))
    _summary(len(points), failures, t0)
    return failures


def _summary(n: int, failures: list[tuple[str, str]], t0: float) -> None:
    mins = (time.perf_counter() - t0) / 60
    print(f"lwbench: sweep done: {n - len(failures)}/{n} points ok in {mins:.1f} min", file=sys.stderr)
    for name, why in failures:
        print(f"  failed: {name}: {why}", file=sys.stderr)
