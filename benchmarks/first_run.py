"""What a newcomer waits for: the README's main command on an empty cache, then a second budget with the
stages cached, and optionally a whole sweep, each timed as the user sees it (wall clock of the CLI process).

    python benchmarks/first_run.py --out first_run.json                 # first run + second budget
    python benchmarks/first_run.py --sweep configs/sweeps/quick.yaml    # ... then the sweep on the same cache
    python benchmarks/first_run.py --sweep configs/sweeps/quick.yaml --sweep configs/sweeps/billiards_quick.yaml
    python benchmarks/first_run.py --cache DIR                          # reuse a cache (not a first run then)

Every step is an ordinary ``lwbench`` process with a fresh ``LWBENCH_CACHE`` and results folder (temporary unless
given), so nothing of an earlier run is reused. Each step reports its wall time, the CPU threads the run used,
the cores other processes kept busy meanwhile (a busy machine makes every number here slower, not wrong) and the
stage times the row recorded (teacher, method training, evaluation). Only the CLI is used, so the same script
times any commit: check one out, install it, and run this file from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

STAGES = ("teacher_train_time_s", "method_train_time_s", "eval_time_s", "wall_time_s")


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "system", "nice", "irq", "softirq", "steal"))


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def timed(name: str, cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall time and the cores others kept busy (system busy CPU minus the child's)."""
    sys0, own0, t0 = _busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    other = max(0.0, ((_busy_cpu_s() - sys0) - (_children_cpu_s() - own0)) / wall)
    if proc.returncode != 0:
        raise SystemExit(f"first_run: step '{name}' failed (exit {proc.returncode}); see {log}")
    print(f"  {name}: {wall:.0f} s wall, other load {other:.2f} cores", flush=True)
    return {"step": name, "wall_s": round(wall, 1), "other_load_cores": round(other, 2), "command": " ".join(cmd)}


def newest_row(results: Path, task: str, method: str) -> dict:
    rows = [json.loads(p.read_text()) for p in (results / task / method).glob("*.json")
            if not p.name.endswith(".per_image.json")]
    return max(rows, key=lambda r: r["created_at"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lookwhere")
    ap.add_argument("--task", default="traffic_signs")
    ap.add_argument("--second-budget", default="k=75", help="the budget of the second, cached-stages run")
    ap.add_argument("--sweep", action="append", default=[],
                    help="also time this sweep file on the same cache (repeatable: one after the other)")
    ap.add_argument("--cache", help="cache folder (default: a fresh temporary one)")
    ap.add_argument("--results", help="results folder (default: a fresh temporary one)")
    ap.add_argument("--threads", type=int, help="LWBENCH threads (--set threads=N); default all cores")
    ap.add_argument("--set", action="append", default=[], help="passed to every run")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lwbench-first-run-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    results = Path(args.results) if args.results else work / "results"
    log = work / "log.txt"
    env = dict(os.environ, LWBENCH_CACHE=str(cache), LWBENCH_RESULTS=str(results))
    sets = [a for s in args.set + ([f"threads={args.threads}"] if args.threads else []) for a in ("--set", s)]
    base = [sys.executable, "-m", "lwbench"]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    print(f"first_run: commit {git}, cache {cache}, log {log}", flush=True)

    steps = []
    for name, extra in (("first run", []), ("second budget", ["--budget", args.second_budget])):
        cmd = [*base, "run", "--method", args.method, "--task", args.task, *extra, *sets]
        step = timed(name, cmd, env, log)
        row = newest_row(results, args.task, args.method)
        step.update({k: round(float(row.get(k) or 0), 1) for k in STAGES})
        step.update(threads=row.get("threads"), budget=row.get("budget"), metric=row.get("metric_value"),
                    gmacs=row.get("gmacs"), dtype=row.get("dtype"), teacher_source=row.get("teacher_source", "trained"))
        steps.append(step)
    for sweep in args.sweep:
        steps.append(timed("sweep " + Path(sweep).name, [*base, "sweep", sweep, *sets], env, log))
    if len(args.sweep) > 1:
        sweeps = [s for s in steps if s["step"].startswith("sweep ")]
        steps.append({"step": "all sweeps", "wall_s": round(sum(s["wall_s"] for s in sweeps), 1),
                      "other_load_cores": round(sum(s["wall_s"] * s["other_load_cores"] for s in sweeps)
                                                / max(1e-9, sum(s["wall_s"] for s in sweeps)), 2)})

    report = {"commit": git, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "steps": steps, "log": str(log)}
    cols = ["step", "wall_s", "other_load_cores", "threads", "teacher_train_time_s", "method_train_time_s",
            "eval_time_s", "budget", "metric", "gmacs", "dtype", "teacher_source"]
    print(tabulate([[s.get(c, "") for c in cols] for s in steps], headers=cols, tablefmt="github"))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
