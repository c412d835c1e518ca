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
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback

from lwbench.config import load_yaml
from lwbench.errors import ConfigError, LwbenchError


def sweep_points(spec: dict, base_request) -> list:
    """Expand the sweep into RunRequests (budgets resolved against each task's backbone)."""
    from lwbench.runner import Plan

    tasks = spec.get("tasks") or []
    methods = spec.get("methods") or {}
    if not tasks or not methods:
        raise ConfigError("a sweep file needs non-empty 'tasks' and 'methods'")
    points = []
    for seed in spec.get("seeds", [0]):
        for task in tasks:
            for method, budgets in methods.items():
                req = dataclasses.replace(base_request(method, task, None), seed=int(seed))
                if budgets is None or budgets == "none":
                    points.append(req)
                    continue
                if budgets == "default":
                    plan = Plan(dataclasses.replace(req, quiet=True))
                    key = plan.method_cls.budget_key
                    grid = plan.method_cls.budget_grid(plan.spec)
                    budgets = [f"{key}={b:g}" for b in grid]
                if not isinstance(budgets, list):
                    raise ConfigError(f"sweep: budgets of '{method}' must be null, 'default' or a list like "
                                      "[k=8, k=16]")
                for b in budgets:
                    points.append(dataclasses.replace(req, budget=str(b)))
    return points


def run_sweep(path: str, args, make_request, shard: str | None = None) -> list[tuple[str, str]]:
    """Run every point; return the failures as (point, one-line reason)."""
    from lwbench.runner import run

    spec = load_yaml(path)
    if spec.get("profile") and args.profile == "quick" and "--profile" not in sys.argv:
        args.profile = spec["profile"]
    if spec.get("source") and args.source == "auto":
        args.source = spec["source"]

    def base(method, task, budget):
        return make_request(args, method, task, budget)

    points = sweep_points(spec, base)
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise ConfigError(f"--shard must be i/n with 0 <= i < n, got '{shard}'") from None
        points = points[i::n]
    failures = []
    t0 = time.perf_counter()
    for j, req in enumerate(points, 1):
        name = f"{req.method} {req.budget or '-'} on {req.task} (seed {req.seed})"
        print(f"lwbench: sweep [{j}/{len(points)}] {name}", file=sys.stderr, flush=True)
        try:
            run(req)
        except LwbenchError as exc:
            failures.append((name, str(exc)))
            print(f"lwbench: sweep: FAILED {name}: {exc}", file=sys.stderr)
        except Exception as exc:  # one broken point must not stop the sweep
            failures.append((name, f"{type(exc).__name__}: {exc}"))
            print(f"lwbench: sweep: FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if getattr(args, "debug", False):
                traceback.print_exc()
    mins = (time.perf_counter() - t0) / 60
    ok = len(points) - len(failures)
    print(f"lwbench: sweep done: {ok}/{len(points)} points ok in {mins:.1f} min", file=sys.stderr)
    for name, why in failures:
        print(f"  failed: {name}: {why}", file=sys.stderr)
    return failures
