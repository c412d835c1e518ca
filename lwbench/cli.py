"""``lwbench`` command line. Heavy imports (torch, timm) happen inside each command, so
``lwbench --help`` is instant. Errors a user can fix print one line and exit with code 2;
``--debug`` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lwbench.errors import ConfigError, LwbenchError

EXAMPLES = {
    "run": """examples:
  lwbench run --method full --task traffic_signs
  lwbench run --method lookwhere --task traffic_signs --budget k=24
  lwbench run --method tome --task billiards --budget r=8 --source synthetic --force
  lwbench run --method full --task imagenet --data-root ~/data/imagenet --profile paper""",
    "flops": """examples:
  lwbench flops --method full --backbone vit_base_patch14_reg4_dinov2 --img-size 224 --json
  lwbench flops --method random --backbone vit_small_patch16_224 --img-size 224 --budget k=49""",
    "speed": """examples:
  lwbench speed --out speed --dry-run
  lwbench speed --methods tome,evit,lookwhere --backbones vit_small_patch14_dinov2 --img-sizes 224,504x672 --out speed
  lwbench speed --budgets matched:0.5 --batches 1 --threads 2 --device cpu --out benchmarks/reference/speed
  lwbench speed --backbones vit_small_patch14_dinov2 --weights dinov2_s.safetensors --photos photos/ --out speed""",
    "plot": """examples:
  lwbench plot pareto --task traffic_signs
  lwbench plot pareto --task billiards --x latency_ms --out billiards.png
  lwbench plot pareto --task traffic_signs --x speedup
  lwbench plot conversion --task traffic_signs --out conversion.png
  lwbench plot pareto --task traffic_signs --where n_eval=1000 --where seed=0""",
    "results": """examples:
  lwbench results --task traffic_signs
  lwbench results --task traffic_signs --wide
  lwbench results --where regime=finetuned --where train.steps=100
  lwbench results --sweep configs/sweeps/quick.yaml --format md""",
    "report": """examples:
  lwbench report --task traffic_signs --out benchmarks/reference/traffic_signs
  lwbench report --task traffic_signs --out paper --format latex --where seed=0
  lwbench report --task traffic_signs --out hub --format hf --sweep configs/sweeps/quick.yaml""",
}


def _filter_args(p: argparse.ArgumentParser) -> None:
    """``--where``, ``--run-ids``, ``--sweep``: which stored rows ``results``, ``plot`` and ``report`` read."""
    g = p.add_argument_group("which rows (lwbench.row_filter)")
    g.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only rows whose column or config key KEY equals VALUE (seed=0, n_eval=1000, train.steps=100; "
                        "KEY!=VALUE excludes; repeatable: one key given twice means either value)")
    g.add_argument("--run-ids", metavar="ID,ID", help="only these rows (a unique prefix of a run id will do)")
    g.add_argument("--sweep", metavar="FILE", help="only the rows of the points this sweep file expands to")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MOD|FILE.py",
                   help="import a plugin module or file that registers methods/tasks (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _load_plugins(args) -> None:
    """Import ``--plugin`` modules; one that does not import is one line naming it and the error."""
    from lwbench.registry import METHODS

    for spec in getattr(args, "plugin", []) or []:
        try:
            METHODS.load_module(spec)
        except LwbenchError:
            raise
        except SyntaxError as exc:
            raise ConfigError(f"--plugin {spec}: syntax error at line {exc.lineno}: {exc.msg}") from None
        except Exception as exc:
            raise ConfigError(f"--plugin {spec} failed to import: {type(exc).__name__}: {exc}") from None


def _parse_hw(text: str | None):
    from lwbench.sizes import as_hw

    return None if text is None else as_hw(text, "--img-size")


# ---------------------------------------------------------------------------------------------- commands
def _grid_spec(args):
    """The backbone shape the budgets are listed for: the one ``lwbench run --task TASK`` (quick profile,
    traffic signs by default) would build, and its description."""
    from lwbench.backbones import spec_of
    from lwbench.registry import get_task
    from lwbench.task import as_hw

    task = args.task or "traffic_signs"
    cfg = _config(_with(args, budget=None, weights=None, data_root=None, source="auto", seed=None,
                        results=None, force=False, quiet=True, device=None), "full", task, None)
    # the task's shape without its data (a real-only task needs none to list budgets)
    spec = spec_of(cfg.backbone, as_hw(cfg.img_size or get_task(task).default_img_size))
    h, w = spec.img_size
    return spec, (f"profile {args.profile}, task {task}: {spec.name} at {h}x{w} "
                  f"({h // spec.patch}x{w // spec.patch} = {(h // spec.patch) * (w // spec.patch)} patches)")


def cmd_list(args) -> int:
    from tabulate import tabulate

    from lwbench.registry import METHODS, TASKS

    if args.what == "methods" and args.opts:
        from lwbench.options import describe

        cls = METHODS.get(args.opts)
        rows = describe(cls.Options)
        print(f"{args.opts}: {cls.description}")
        if not rows:
            print("(no options)")
            return 0
        print(tabulate(rows, headers=["option (--set method.KEY=VALUE)", "type", "default", "meaning"]))
        if cls.stage_names():
            print("\nstages (" + ", ".join(cls.stage_names()) + "): unset values inherit the run's train.* "
                  "(lwbench config keys)")
        return 0
    if args.what == "methods":
        _list_methods(args)
    else:
        rows = []
        for name in TASKS.names():
            try:
                c = TASKS.get(name)
            except Exception as exc:
                rows.append([name, f"(failed to load: {exc})", "", "", "", ""])
                continue
            rows.append([name, c.kind, c.num_classes or "from data", c.metric, ",".join(c.sources),
                         "x".join(map(str, c.default_img_size)), c.description])
        print(tabulate(rows, headers=["task", "kind", "classes", "metric", "sources", "default size", "description"]))
    return 0


LIST_WIDTH = 120  # ``lwbench list methods`` fits a terminal this wide (as the results table, lwbench.tables)


def _list_methods(args) -> None:
    """The methods table (its budgets for the profile and task, what it needs: training, attention map, token count,
    dense output; :mod:`lwbench.labels`), then each method's description, all within :data:`LIST_WIDTH` columns."""
    import textwrap

    from tabulate import tabulate

    from lwbench.registry import METHODS

    spec, where = _grid_spec(args)
    rows, described = [], []
    for name in METHODS.names():
        try:
            c = METHODS.get(name)
            grid = ", ".join(f"{b:g}" for b in c.budget_grid(spec)) if c.budget_key else "-"
            default = c.default_budget(spec) if c.budget_key else None
            default = f"{c.budget_key}={default:g}" if default is not None else "-"
            labels = c.labels.words()
        except Exception as exc:  # broken plugin: one line, keep listing
            rows.append([name] + ["?"] * 7)
            described.append((name, f"(failed to load: {exc})"))
            continue
        rows.append([name, c.kind, labels["training"], default, grid, labels["attn map"], labels["tokens"],
                     labels["dense"]])
        described.append((name, c.description))
    print(tabulate(rows, headers=["method", "kind", "training", "budget", "sweep grid", "attn map", "tokens", "dense"],
                   disable_numparse=True))
    indent = max(len(n) for n, _ in described) + 2 if described else 2
    print()
    for name, text in described:
        print(textwrap.fill(text, LIST_WIDTH, initial_indent=name.ljust(indent), subsequent_indent=" " * indent,
                            break_long_words=False, break_on_hyphens=False))
    notes = [
        "budget: the one `lwbench run` uses without --budget (key=value; -: no budget knob); sweep grid: a sweep's "
        "`method: default`",
        "attn map: the attention probabilities the method reads at inference (no: every block can run on a fused "
        "flash kernel; CLS row, full map: computed beside it); tokens: fixed by the budget, or per image by the "
        "content; dense: serves segmentation (densify); lwbench list methods --opts NAME: its options",
        f"budgets for {where};",
        "other settings: --profile, --task, --backbone, --img-size (e.g. --profile paper --task traffic_signs)",
    ]
    print()
    for note in notes:
        print(textwrap.fill(note, LIST_WIDTH, subsequent_indent="  ", break_long_words=False,
                            break_on_hyphens=False))


def _flags(args) -> dict:
    """The run flags the user gave (None: not given), for :func:`~lwbench.config.resolve_config` and a sweep's
    :func:`~lwbench.sweeps.expand`, which decide precedence."""
    return {"profile": args.profile, "seed": args.seed, "regime": getattr(args, "regime", None),
            "autocast": getattr(args, "autocast", None),
            "retrain_teacher": getattr(args, "retrain_teacher", False) or None, "source": args.source,
            "data_root": args.data_root, "device": args.device, "backbone": args.backbone, "weights": args.weights,
            "img_size": _parse_hw(args.img_size), "results": args.results, "force": args.force or None,
            "quiet": args.quiet or None}


def _config(args, method: str, task: str, budget: str | None):
    """The :class:`~lwbench.config.RunConfig` of one point: profile < flags < ``--set``."""
    from lwbench.config import resolve_config

    flags = _flags(args)
    return resolve_config(method, task, budget, profile=flags.pop("profile") or "quick", sets=args.set, **flags)


def cmd_run(args) -> int:
    from lwbench.runner import run
    from lwbench.tables import format_results

    seeds = _parse_seeds(args.seeds) if args.seeds else [args.seed]
    cfgs = [_config(args, args.method, args.task, args.budget) if s is None else
            _config(_with(args, seed=s), args.method, args.task, args.budget) for s in seeds]
    if args.dry_run:
        for cfg in cfgs:
            _show_config(cfg)
        return 0
    rows = [r for r in (run(cfg) for cfg in cfgs) if r]  # under torchrun only rank 0 has rows
    import pandas as pd

    if rows:
        print(format_results(pd.DataFrame(rows), "table"))
        from lwbench.next_step import print_next_step
        from lwbench.results import ResultStore
        from lwbench.sweeps.points import results_of

        print_next_step(ResultStore(results_of(cfgs[0])).frame(task=cfgs[0].task), cfgs[0].task, args.results)
    return 0


def _with(args, **changes):
    import copy

    out = copy.copy(args)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def _parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-2`` -> ``[0, 1, 2]``; anything else is one ConfigError line."""
    from lwbench.errors import ConfigError

    try:
        if "-" in text.strip("-"):
            lo, hi = (int(v) for v in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be a list like 0,1,2 or a range like 0-2 of seeds >= 0, got '{text}'")
    return seeds


def _show_config(cfg) -> int:
    """The resolved config as YAML, the run id and the teacher id; nothing is built or trained."""
    import yaml

    from lwbench.runner import Plan
    from lwbench.schema import HASH_EXCLUDE, jsonable

    plan = Plan(cfg)
    print(yaml.safe_dump(jsonable(plan.config), sort_keys=False, default_flow_style=None, width=110).rstrip())
    print(f"# run id {plan.run_id} (hash of the above without {', '.join(sorted(HASH_EXCLUDE & set(plan.config)))})")
    print(f"# teacher id {plan.teacher_id}; replicate id {plan.replicate_id} (the run id without the seed)")
    return 0


def cmd_config(args) -> int:
    from tabulate import tabulate

    from lwbench.config import RunConfig, run_keys
    from lwbench.options import describe

    if args.what == "show":
        if not args.method or not args.task:
            raise ConfigError("lwbench config show needs --method and --task")
        return _show_config(_config(args, args.method, args.task, args.budget))
    keys = set(run_keys())
    rows = [r for r in describe(RunConfig) if r[0] in keys]
    print(tabulate(rows, headers=["key (--set KEY=VALUE)", "type", "default", "meaning"]))
    print("\nmethod options: --set method.KEY=VALUE (lwbench list methods --opts NAME); task options: "
          "--set task.KEY=VALUE")
    return 0


def cmd_sweep(args) -> int:
    from lwbench.sweeps import run_sweep
    from lwbench.sweeps.spec import parse_slurm_opts

    if args.status:
        from lwbench.sweeps import expand, load_spec
        from lwbench.sweeps.status import format_status, sweep_status

        statuses = sweep_status(expand(load_spec(args.file), _flags(args), args.set, shard=args.shard))
        print(format_status(statuses))
        return 0 if all(s.state == "done" for s in statuses) else 1
    launch = {"partition": args.slurm_partition, "gpus_per_job": args.gpus_per_job, "cpus_per_job": args.cpus_per_job,
              "timeout_min": args.timeout_min, "array_parallelism": args.slurm_array_parallelism,
              "slurm_opts": parse_slurm_opts(args.slurm_opt)}
    failures = run_sweep(args.file, _flags(args), args.set, shard=args.shard, phase=args.phase,
                         launcher=args.launcher, launch=launch, plugins=args.plugin, dry_run=args.dry_run,
                         debug=args.debug)
    return 1 if failures else 0


def cmd_compare(args) -> int:
    from lwbench.compare import compare
    from lwbench.options import split_list

    regimes = split_list(args.regimes) or ([args.regime] if args.regime not in (None, "auto") else None)
    flags = {k: v for k, v in _flags(args).items() if k != "regime"}
    failed = compare(args.task, args.methods, split_list(args.budgets), regimes, flags, args.set,
                     dry_run=args.dry_run, plot_out=args.out, debug=args.debug)
    return 1 if failed else 0


def cmd_recommend(args) -> int:
    from lwbench.paths import results_dir
    from lwbench.recommend import format_recommendation, recommend
    from lwbench.results import ResultStore

    given = [(c, v) for c, v in (("max_gmacs", args.max_gmacs), ("max_latency_ms", args.max_latency_ms),
                                 ("min_accuracy", args.min_accuracy)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --max-gmacs X, --max-latency-ms X, --min-accuracy X")
    from lwbench.results import rows_to_frame

    store = ResultStore(Path(args.results) if args.results else results_dir())
    df = rows_to_frame(_selected(store, args, args.task))
    if args.regime:
        df = df[df["regime"] == args.regime] if not df.empty else df
    print(format_recommendation(recommend(store, df, *given[0])))
    return 0


def cmd_flops(args) -> int:
    from lwbench.config import split_sets
    from lwbench.flops_report import flops_report, format_flops_report, random_weight_timing
    from lwbench.registry import get_method

    sets = [s if s.split("=")[0].startswith(("method.", "methods.")) else f"method.{s}" for s in args.set or []]
    _, mopts, _ = split_sets(sets, args.method, "")
    opts = get_method(args.method).resolve_options(mopts)
    rep = flops_report(args.method, args.backbone, _parse_hw(args.img_size), budget=args.budget, opts=opts)
    if args.latency:
        rep.update(random_weight_timing(args.method, args.backbone, _parse_hw(args.img_size), args.budget, opts,
                                        batch=args.batch, threads=args.threads, device=args.device))
    print(json.dumps(rep) if args.json else format_flops_report(rep))
    if args.latency and not args.json:
        wide = "" if rep["speedup_reliable"] else " (interval too wide: the machine was busy)"
        print(f"speed-up over full, batch 1: {rep['speedup']:.2f}x [{rep['speedup_ci_low']:.2f}, "
              f"{rep['speedup_ci_high']:.2f}]{wide}, at batch {rep['throughput_batch']}: "
              f"{rep['throughput_speedup']:.2f}x [{rep['throughput_speedup_ci_low']:.2f}, "
              f"{rep['throughput_speedup_ci_high']:.2f}]; {rep['gmac_ratio']:.2f}x fewer GMACs, conversion "
              f"{rep['conversion']:.2f}; attention kernel {rep['attention_kernel']}")
        print(f"latency, batch 1: {rep['latency_ms']:.2f} ms (IQR {rep['latency_iqr_ms']:.2f}; full "
              f"{rep['reference_latency_ms']:.2f} ms); throughput at batch {rep['throughput_batch']}: "
              f"{rep['throughput']:.1f} img/s; random weights and random images, timed paired with full, "
              f"{rep['threads']} thread(s), {rep['device']}")
    return 0


def _speed_weights(items: list[str], backbones: list[str] | None) -> dict[str, str]:
    """``--weights BACKBONE=FILE`` (repeatable), or ``--weights FILE`` when ``--backbones`` names one backbone."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if not backbones or len(backbones) != 1:
                raise ConfigError(f"lwbench speed: --weights {item}: say which backbone it is for "
                                  "(--weights BACKBONE=FILE), or time one backbone (--backbones NAME)")
            name, path = backbones[0], item
        out[name] = path
    return out


def cmd_speed(args) -> int:
    from lwbench.config import split_sets
    from lwbench.speed import format_plan, method_names, run_speed, speed_config

    if args.report:  # times nothing: the grid, weights and --set are not read
        return _speed_report(args.out)
    values: dict = {"budgets": _csv_list(args.budgets), "device": args.device}
    for key, text in (("methods", args.methods), ("backbones", args.backbones)):
        if text is not None:
            values[key] = _csv_list(text)
    if args.img_sizes is not None:
        values["img_sizes"] = [_parse_hw(s) for s in _csv_list(args.img_sizes)]
    if args.batches is not None:
        values["batches"] = _csv_list(args.batches)
    if args.threads is not None:
        values["threads"] = args.threads
    if args.weights:
        values["weights"] = _speed_weights(args.weights, values.get("backbones"))
    if args.photos:
        values["photos"] = args.photos
    measure: dict = {}
    opts: dict = {}
    for method in method_names(speed_config({k: v for k, v in values.items() if k == "methods"})):
        run, mopts, _ = split_sets(args.set, method, "")
        if set(run) - {"measure"}:
            raise ConfigError(f"lwbench speed: --set takes measure.KEY=VALUE and method options, not "
                              f"{', '.join(sorted(set(run) - {'measure'}))}.*")
        measure = run.get("measure", {})
        if mopts:
            opts[method] = mopts
    if args.limit_s is not None:
        measure["max_run_time"] = args.limit_s
    values.update(measure=measure, method_opts=opts)
    cfg = speed_config(values)
    result = run_speed(cfg, args.out, force=args.force, dry_run=args.dry_run,
                       command="lwbench " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["speed"] else "")
    if args.dry_run:
        print(format_plan(result, cfg))
        return 0
    table = result.files[1] if len(result.files) > 1 else None
    if table is not None:
        print(table.read_text().rstrip())
    print(f"\n{result.timed} point(s) timed, {len(result.done)} already done; wrote "
          f"{', '.join(str(f) for f in result.files)}")
    return 0


def _speed_report(out: str) -> int:
    """``lwbench speed --report``: table.md and conversion.png drawn again from every row of OUT/speed.csv."""
    from pathlib import Path

    from lwbench.speed import CSV_NAME, read_rows, write_reports

    rows = read_rows(Path(out) / CSV_NAME)
    if not rows:
        raise ConfigError(f"lwbench speed --report: no rows in {Path(out) / CSV_NAME}; time some first")
    files = write_reports(rows, Path(out))  # the rows' own command is not stored: none rather than this one
    print(f"redrew from {len(rows)} row(s): {', '.join(str(f) for f in files[1:])}")
    return 0


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _row_filter(args):
    """The ``--where`` / ``--run-ids`` / ``--sweep`` of ``results``, ``plot`` and ``report`` as one
    :class:`lwbench.row_filter.RowFilter`."""
    from lwbench.row_filter import RowFilter

    return RowFilter.parse(args.where, args.run_ids, args.sweep)


def _selected(store, args, task: str | None, method: str | None = None) -> list:
    """The store's rows of ``task`` (and ``method``) that pass the command's row filter; none left is one error
    line saying which condition emptied the selection."""
    rows = store.rows(task=task, method=method)
    flt = _row_filter(args)
    if not rows or not flt:
        return rows
    kept = flt.apply(rows)
    if not kept:
        where = f" of task '{task}'" if task else ""
        raise ConfigError(f"{flt.no_match(rows)}: none of the {len(rows)} rows{where} in {store.root} is left")
    return kept


def _say_notices(fn):
    """Run ``fn()``; lwbench's notices from plotting (``UserWarning``s for Python users) become one
    ``lwbench: ...`` line each on stderr, other warnings are shown as usual."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    seen = set()
    for w in caught:
        text = str(w.message)
        if text.startswith("lwbench: "):
            if text not in seen:
                seen.add(text)
                print(text, file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return out


def cmd_results(args) -> int:
    from lwbench.paths import results_dir
    from lwbench.results import ResultStore, rows_to_frame
    from lwbench.tables import format_results

    store = ResultStore(Path(args.results) if args.results else results_dir())
    rows = _selected(store, args, args.task, args.method)
    if not rows:
        print("no results yet" + (f" for task {args.task}" if args.task else "") +
              "; run e.g. `lwbench run --method full --task traffic_signs`", file=sys.stderr)
        return 0
    # tables name the settings that tell otherwise identical rows apart, so they need the whole config
    df = rows_to_frame(rows, keep_config=args.format in ("table", "md"))
    from lwbench.report import with_hard_subset

    df = with_hard_subset(store, df)
    print(format_results(df, args.format, wide=args.wide))
    return 0


def cmd_plot(args) -> int:
    from lwbench.paths import results_dir
    from lwbench.plots import conversion_plot, pareto_plot
    from lwbench.results import ResultStore, rows_to_frame

    store = ResultStore(Path(args.results) if args.results else results_dir())
    rows = _selected(store, args, args.task)
    if not rows:
        raise ConfigError(f"no results for task '{args.task}' in {store.root}; "
                          f"run `lwbench run --task {args.task} ...` first")
    df = rows_to_frame(rows)
    if args.kind == "conversion":
        out = Path(args.out) if args.out else Path(store.root) / f"conversion_{args.task}.png"
        path = _say_notices(lambda: conversion_plot(df, args.task, out=out, source=args.source))
    else:
        out = Path(args.out) if args.out else Path(store.root) / f"pareto_{args.task}_{args.x}.png"
        path = _say_notices(lambda: pareto_plot(df, args.task, x=args.x, out=out, source=args.source))
    print(path)
    from lwbench.next_step import print_next_step

    print_next_step(df, args.task, args.results)
    return 0


def cmd_report(args) -> int:
    from lwbench.paths import results_dir
    from lwbench.report import write_report
    from lwbench.results import ResultStore

    store = ResultStore(Path(args.results) if args.results else results_dir())
    command = args.command_line or ""
    _selected(store, args, args.task)  # an empty selection is one error line before anything is written
    written = _say_notices(lambda: write_report(store, args.task, args.out, command=command,
                                                overwrite=args.overwrite, select=_row_filter(args),
                                                fmt=args.format, hf_dataset=args.hf_dataset))
    for path in written:
        print(path)
    from lwbench.next_step import print_next_step
    from lwbench.results import rows_to_frame

    print_next_step(rows_to_frame(_selected(store, args, args.task)), args.task, args.results)
    return 0


def cmd_show(args) -> int:
    from lwbench.show import show

    if args.compare:
        return _show_compare(args)
    if not args.method:
        raise ConfigError("lwbench show needs --method NAME (one method) or --compare A,B,C (side by side)")

    out = Path(args.out) if args.out else Path.cwd() / show_file_name(args.method, args.task, args.budget)
    path = show(_config(args, args.method, args.task, args.budget), out=out, n=args.n)
    print(path)
    return 0


def _show_compare(args) -> int:
    """``--compare``: the methods' budgets and regime as ``lwbench compare`` would run them (so the figure shows the
    rows of its table)."""
    from lwbench.compare import comparison_spec
    from lwbench.options import split_list
    from lwbench.show_compare import show_compare

    methods = split_list(args.compare)
    regimes = [args.regime] if args.regime not in (None, "auto") else None
    spec = comparison_spec(args.task, methods, split_list(args.budgets), regimes, flags=_flags(args), sets=args.set)
    regime = spec["regimes"][0]
    reqs = []
    for m in methods:
        budgets = spec["methods"].get(m) or [None]
        reqs += [_config(_with(args, regime=regime), m, args.task, b) for b in budgets]
    out = Path(args.out) if args.out else Path.cwd() / f"show_compare_{args.task}.png"
    print(show_compare(reqs, out, n=args.n, disagree=args.disagree))
    return 0


def show_file_name(method: str, task: str, budget: str | None) -> str:
    """``lwbench show``'s figure when no ``--out`` is given: ``show_<method>[_<budget>]_<task>.png`` (``k=28``:
    ``k28``)."""
    parts = [method, budget.replace("=", "") if budget else "", task]
    return "show_" + "_".join(p for p in parts if p).replace("/", "-") + ".png"


def cmd_pretrain(args) -> int:
    """The method's own parser reads the rest of the line: the core never imports a method to build its CLI."""
    from lwbench.methods.lookwhere.pretrain import add_pretrain_args, run_pretrain

    p = argparse.ArgumentParser(prog=f"lwbench pretrain {args.what}")
    add_pretrain_args(p)
    run_pretrain(p.parse_args(args.rest))
    return 0


def cmd_cache(args) -> int:
    from lwbench import cache
    from lwbench.paths import cache_dir

    root = cache_dir()
    if args.what in ("drop", "rm", "show") and not args.entry:
        raise ConfigError(f"lwbench cache {args.what} needs an entry: a teacher or run id, or a folder inside it")
    if args.what in ("drop", "rm"):
        for entry in args.entry:
            print(f"removed {cache.drop(entry, root)}")
        return 0
    if args.what == "show":
        for entry in args.entry:
            print(cache.describe(cache.resolve(entry, root)))
        return 0
    from tabulate import tabulate

    entries = cache.list_entries(root)
    if not entries:
        print(f"cache {root} is empty")
        return 0
    rows = [[e.id, e.kind, e.status, cache.format_size(e.size_bytes), ", ".join(e.stages), e.summary]
            for e in entries]
    print(tabulate(rows, headers=["id", "kind", "status", "size", "stages", "config"]))
    print(f"\n{root}; inspect one with: lwbench cache show ID; remove one (or one stage) with: lwbench cache rm ID")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _run_args(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    if with_method:
        p.add_argument("--method", required=True, help="method name (lwbench list methods)")
        p.add_argument("--task", required=True, help="task name (lwbench list tasks)")
        p.add_argument("--budget", help="budget as key=value, e.g. k=64, r=8, keep_rate=0.7, size=96")
    g = p.add_argument_group("data and model")
    g.add_argument("--profile", help="quick (CPU-sized, default; a sweep file's own profile: line otherwise) | paper | "
                   "path to a profile YAML")
    g.add_argument("--source", choices=["auto", "real", "synthetic"],
                   help="real dataset, in-tree synthetic source, or auto (real when found)")
    g.add_argument("--data-root", help="folder holding the real dataset")
    g.add_argument("--backbone", help="override the profile's backbone (a timm vit_* name)")
    g.add_argument("--weights", help="local backbone weights file (.safetensors/.pth)")
    g.add_argument("--img-size", help="override the profile's image size: S or HxW")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the profile's (auto)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--regime", choices=["auto", "off_the_shelf", "finetuned"],
                   help="off_the_shelf (training-free methods on the task-trained backbone) or finetuned (every "
                        "method fine-tuned with train.* at its budget); default auto: off_the_shelf when the method "
                        "is training-free")
    g.add_argument("--autocast", choices=["none", "bfloat16"],
                   help="mixed precision of training, evaluation and timing (default none: float32); recorded in "
                        "the row's autocast column and in its run id")
    g.add_argument("--retrain-teacher", action="store_true",
                   help="train the task backbone afresh instead of using the copy lwbench ships for this exact "
                        "config (see lwbench/shipped_teachers/README.md)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override: method.<opt>=v, task.<opt>=v, teacher.steps=v, train.lr=v, measure.warmup=v "
                        "(lwbench config keys)")
    o = p.add_argument_group("output")
    o.add_argument("--results", help="results folder (default ./results or $LWBENCH_RESULTS)")
    o.add_argument("--force", action="store_true", help="rerun even if this config already has a row")
    o.add_argument("--quiet", action="store_true", help="no progress output or notices (warnings still show)")
    o.add_argument("--dry-run", action="store_true", help="print the resolved config and run id; run nothing")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="lwbench", description="Benchmark efficient ViTs: LookWhere and "
                                     "token-reduction/selection baselines. Accuracy vs GMACs, latency, memory.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list methods or tasks with their capability flags")
    p.add_argument("what", choices=["methods", "tasks"])
    p.add_argument("--opts", metavar="METHOD", help="print one method's options (type, default, meaning)")
    p.add_argument("--profile", default="quick", help="list budgets for this profile (default quick)")
    p.add_argument("--task", help="... and task (default traffic_signs)")
    p.add_argument("--backbone", help="... and backbone (default: the profile's)")
    p.add_argument("--img-size", help="... and image size S or HxW (default: the task's)")
    p.add_argument("--source", choices=["auto", "real", "synthetic"], default="auto", help=argparse.SUPPRESS)
    p.set_defaults(set=[], regime=None, autocast=None, retrain_teacher=False, data_root=None, device=None,
                   weights=None, seed=None, results=None, force=False, quiet=True)
    _common(p)
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("run", help="train what a method needs, evaluate, measure, store one result row",
                       epilog=EXAMPLES["run"], formatter_class=fmt)
    _run_args(p)
    p.add_argument("--seeds", metavar="LIST", help="several training seeds, e.g. 0,1,2 or 0-2 (one row each; "
                   "lwbench results aggregates them)")
    _common(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("sweep", help="run a grid of methods x budgets x tasks from a YAML file",
                       epilog="example:\n  lwbench sweep configs/sweeps/quick.yaml", formatter_class=fmt)
    p.add_argument("file", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--shard", help="i/n: run only every n-th point starting at i (for parallel launchers)")
    p.add_argument("--phase", choices=["all", "train", "measure"], default="all",
                   help="all (default): train every point, then evaluate and time them one at a time; train: the "
                        "first pass only (e.g. in parallel shards); measure: the second (run it alone, serially)")
    g = p.add_argument_group("launching (--launcher submitit: one job per missing point; the sweep file's "
                             "launch: section sets the same keys)")
    g.add_argument("--launcher", default="local", help="local (default: this process, point after point) | "
                   "submitit (SLURM where sbatch exists, else submitit's local executor)")
    g.add_argument("--slurm-partition", help="SLURM partition of the jobs")
    g.add_argument("--gpus-per-job", type=int, help="GPUs per job (default 0)")
    g.add_argument("--cpus-per-job", type=int, help="CPU cores per job")
    g.add_argument("--timeout-min", type=int, help="time limit of each job in minutes (default 240)")
    g.add_argument("--slurm-array-parallelism", type=int,
                   help="jobs running at once (default 8; SLURM's array limit, a window on the local executor)")
    g.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. constraint=a100 or account=myproj (repeatable)")
    p.add_argument("--status", action="store_true",
                   help="run nothing: list every point as done / running / failed (its error line) / pending; "
                        "exit 0 only when all are done")
    _run_args(p, with_method=False)
    _common(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("flops", help="count GMACs (multiply-accumulates) of one forward, random weights",
                       epilog=EXAMPLES["flops"], formatter_class=fmt)
    p.add_argument("--method", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--img-size", required=True, help="S or HxW")
    p.add_argument("--budget", help="key=value")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--latency", action="store_true", help="also time it (random weights and images, fresh process)")
    p.add_argument("--batch", type=int, default=8, help="throughput batch for --latency")
    p.add_argument("--threads", type=int, help="CPU threads for --latency (default: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _common(p)
    p.set_defaults(fn=cmd_flops)

    p = sub.add_parser("speed", help="a speed reference: GMACs and the speed-up over full, timed paired, of every "
                       "method on random weights, over backbones x image sizes x batches (speed.csv, table.md, "
                       "conversion.png)", epilog=EXAMPLES["speed"], formatter_class=fmt)
    g = p.add_argument_group("the grid")
    g.add_argument("--methods", metavar="A,B", help="methods (default: every registered method; full, the "
                   "reference, is timed against itself: the noise floor)")
    g.add_argument("--backbones", metavar="A,B", help="timm ViT names (default vit_small_patch14_dinov2,"
                   "vit_base_patch14_reg4_dinov2)")
    g.add_argument("--img-sizes", metavar="S,HxW", help="image sizes (default 224,518,504x672: DINOv2's and the "
                   "paper profile's 4:3 traffic-sign frames)")
    g.add_argument("--batches", metavar="B,B", help="batch sizes timed paired (default 1,32; batch 1 always is)")
    g.add_argument("--budgets", default="default", metavar="REQ,REQ",
                   help="default (each method's default budget at that backbone and size) and/or matched[:RATIO] "
                        "(the budget whose GMACs come closest to RATIO x full's, default 0.5; the achieved "
                        "fraction is in the row)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="measure.KEY=VALUE (the timing protocol: measure.min_runs, measure.warmup, ...) or a method "
                        "option (methods.M.KEY=VALUE)")
    g.add_argument("--weights", action="append", default=[], metavar="BACKBONE=FILE",
                   help="a local checkpoint for one backbone (repeatable; FILE alone with one --backbones): "
                        "content-adaptive methods then keep what real features make them keep")
    g.add_argument("--photos", metavar="DIR", help="time on the images of DIR (resized to each size) instead of "
                   "seeded noise")
    t = p.add_argument_group("where and how long")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--limit-s", type=float, help="seconds one paired timing may go on while its interval is wider "
                   "than 1.25x (measure.max_run_time, default 20)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="speed", help="folder for speed.csv, table.md, conversion.png (default ./speed)")
    o.add_argument("--force", action="store_true", help="time again the points speed.csv already has for this "
                   "machine, commit, threads, device and dtype")
    o.add_argument("--dry-run", action="store_true", help="list the points, the paired timings and an estimate of "
                   "the time; build, count and time nothing")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    o.add_argument("--report", action="store_true", help="time nothing: draw table.md and conversion.png again from "
                   "every row of OUT/speed.csv (after a change of the plot, or rows copied in from another machine)")
    _common(p)
    p.set_defaults(fn=cmd_speed)

    p = sub.add_parser("results", help="print stored results", epilog=EXAMPLES["results"], formatter_class=fmt)
    p.add_argument("--task")
    p.add_argument("--method")
    p.add_argument("--format", default="table", choices=["table", "csv", "md", "json"])
    p.add_argument("--wide", action="store_true",
                   help="every column with long headers (the table fits 120 characters by default)")
    p.add_argument("--results", help="results folder")
    _filter_args(p)
    _common(p)
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("plot", help="draw plots from stored results", epilog=EXAMPLES["plot"], formatter_class=fmt)
    p.add_argument("kind", choices=["pareto", "conversion"],
                   help="pareto: accuracy vs cost; conversion: speed-up over full vs its GMAC ratio, per batch")
    p.add_argument("--task", required=True)
    p.add_argument("--x", default="gmacs", choices=["gmacs", "latency_ms", "throughput", "speedup"],
                   help="pareto's cost axis (speedup: over full, timed paired; higher is better)")
    p.add_argument("--source", choices=["real", "synthetic"], help="which source to plot if both exist")
    p.add_argument("--out", help="PNG path (default results/pareto_<task>_<x>.png, results/conversion_<task>.png)")
    p.add_argument("--results", help="results folder")
    _filter_args(p)
    _common(p)
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("report", help="the reference comparison of a task from the store: rows.csv, table.md "
                       "(95%% intervals, paired differences to full), Pareto PNGs; or a LaTeX table, or Hugging "
                       "Face .eval_results files", epilog=EXAMPLES["report"], formatter_class=fmt)
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, help="folder for the report's files")
    p.add_argument("--format", default="md", choices=["md", "latex", "hf"],
                   help="md (default): rows.csv, table.md and the plots; latex: table.tex (booktabs: top-1 with its "
                        "95%% CI, GMACs, speed-up, paired difference to full); hf: <model>/.eval_results/<task>.yaml "
                        "per method, budget and regime (the Hugging Face Hub's evaluation results)")
    p.add_argument("--hf-dataset", metavar="OWNER/NAME",
                   help="--format hf: the Hub dataset id the results are for (the Hub lists results under a "
                        "Benchmark dataset); default the task's name, a placeholder to replace before uploading")
    p.add_argument("--results", help="results folder")
    p.add_argument("--command-line", help="the command that produced the rows, written into table.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that an earlier report did not write (refused by default)")
    _filter_args(p)
    _common(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("show", help="figure of a method's selection on a few test images (LookWhere: Fig. 3)")
    p.add_argument("--method", help="the method to draw (or --compare)")
    p.add_argument("--task", required=True)
    p.add_argument("--budget")
    p.add_argument("--compare", metavar="A,B,C", help="several methods side by side on the same test images, at "
                   "lwbench compare's budgets and regime")
    p.add_argument("--budgets", help="with --compare: budgets by key, e.g. k=28,r=8 (default: each method's default)")
    p.add_argument("--disagree", action="store_true", help="with --compare: only test images where the stored "
                   "per-image outcomes of the methods differ")
    p.add_argument("--out", help="figure file (default: show_<method>[_<budget>]_<task>.png, or "
                                 "show_compare_<task>.png, in the current folder)")
    p.add_argument("--n", type=int, default=4, help="number of images")
    _run_args(p, with_method=False)
    _common(p)
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("compare", help="plan, run and plot the smallest fair comparison of some methods on a task",
                       epilog="examples:\n"
                              "  lwbench compare --task traffic_signs --methods lookwhere,tome,evit --dry-run\n"
                              "  lwbench compare --task traffic_signs --methods lookwhere,saliency --budgets k=28,k=75",
                       formatter_class=fmt)
    p.add_argument("--task", required=True, help="task name (lwbench list tasks)")
    p.add_argument("--methods", required=True, help="methods to compare, e.g. lookwhere,tome,evit (full is added)")
    p.add_argument("--budgets", help="budgets by key, applied to every method with that key, e.g. k=28,k=75,r=8 "
                   "(default: each method's default budget)")
    p.add_argument("--regimes", help="off_the_shelf and/or finetuned (default: off the shelf when every method is "
                   "training-free, else everything fine-tuned)")
    p.add_argument("--out", help="the Pareto plot's path (default <results>/compare_<task>_gmacs.png)")
    _run_args(p, with_method=False)
    _common(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("recommend", help="which stored method and budget wins under a cost or accuracy constraint",
                       epilog="examples:\n  lwbench recommend --task traffic_signs --max-gmacs 0.1\n"
                              "  lwbench recommend --task traffic_signs --min-accuracy 94", formatter_class=fmt)
    p.add_argument("--task", required=True)
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--max-gmacs", type=float, help="the most accurate row with at most this many GMACs")
    c.add_argument("--max-latency-ms", type=float, help="the most accurate row at most this slow at batch 1 (as "
                   "timed on the machine that stored it)")
    c.add_argument("--min-accuracy", type=float, help="the fastest row (paired speed-up, else GMACs) at least this "
                   "accurate")
    p.add_argument("--regime", choices=["off_the_shelf", "finetuned"], help="only rows of this regime")
    p.add_argument("--results", help="results folder (default ./results or $LWBENCH_RESULTS)")
    _filter_args(p)
    _common(p)
    p.set_defaults(fn=cmd_recommend)

    p = sub.add_parser("config", help="the resolved config and run id of a point (show), or every key (keys)",
                       epilog="examples:\n  lwbench config show --method lookwhere --task traffic_signs --set "
                              "eval.limit=16\n  lwbench config keys", formatter_class=fmt)
    p.add_argument("what", choices=["show", "keys"])
    p.add_argument("--method")
    p.add_argument("--task")
    p.add_argument("--budget")
    _run_args(p, with_method=False)
    _common(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("cache", help="list cached teachers and runs, show one, or remove one or one of its stages",
                       epilog="examples:\n  lwbench cache list\n  lwbench cache show 39204dc44bea\n"
                              "  lwbench cache rm runs/7202daef17ba/finetune   # the next run retrains that stage only",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["list", "ls", "show", "rm", "drop"], help="list (ls), show, rm (drop)")
    p.add_argument("entry", nargs="*", help="teacher or run id (a unique prefix will do), or a folder inside the "
                                            "cache such as runs/<id>/<stage>")
    _common(p)
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("pretrain", help="distillation stage of a method (lwbench pretrain lookwhere --help)",
                       epilog="example:\n  lwbench pretrain lookwhere --help   # the method's own options",
                       formatter_class=fmt)
    p.add_argument("what", choices=["lookwhere"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the method's own options (after the method's name, "
                   "--help is the method's)")
    p.set_defaults(fn=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lwbench.logs import setup
    from lwbench.openmp import prefer_passive

    prefer_passive()  # before torch loads: training threads that lose their core sleep instead of spinning

    parser = build_parser()
    args = parser.parse_args(argv)
    setup(quiet=bool(getattr(args, "quiet", False)))
    try:
        _load_plugins(args)
        return int(args.fn(args) or 0)
    except LwbenchError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"lwbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lwbench: interrupted; finished stages are cached, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
