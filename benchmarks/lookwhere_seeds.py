"""The flagship result on several seeds: the whole quick pipeline (teacher included) per seed and task,
``full`` beside ``lookwhere`` at its default k, with the selection diagnostics that explain the gap.

    python benchmarks/lookwhere_seeds.py --tasks traffic_signs billiards --seeds 0 1 2 --out lookwhere_seeds.md

Each point is an ordinary ``lwbench run`` in its own process (so it trains, caches and stores rows exactly as a
user's run does; a finished point is skipped, so an interrupted benchmark resumes). ``--set`` is passed to every
run. Prints (and writes to ``--out``) the per-seed table and, per task, the mean and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate


def run_point(method: str, task: str, seed: int, sets: list[str], results: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "lwbench", "run", "--method", method, "--task", task, "--seed", str(seed),
           "--results", str(results), *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"lookwhere_seeds: {method} seed {seed} on {task} failed (exit {proc.returncode}); see {log}")
    rows = [json.loads(p.read_text()) for p in (results / task / method).glob("*.json")]
    rows = [r for r in rows if r["seed"] == seed]
    row = max(rows, key=lambda r: r["created_at"])
    print(f"  {task} seed {seed} {method}: top-1 {row['top1']:.1f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def fmt(v, spec=".2f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["traffic_signs", "billiards"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--results", type=Path, default=Path(os.environ.get("LWBENCH_RESULTS", "results")))
    ap.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    log = args.results / "lookwhere_seeds.log"

    per_seed, summary = [], []
    for task in args.tasks:
        gaps, lw_acc, full_acc, recalls = [], [], [], []
        for seed in args.seeds:
            full = run_point("full", task, seed, args.set, args.results, log)
            lw = run_point("lookwhere", task, seed, args.set, args.results, log)
            gap = lw["top1"] - full["top1"]
            gaps.append(gap)
            lw_acc.append(lw["top1"])
            full_acc.append(full["top1"])
            recalls.append(lw["object_recall"])
            per_seed.append([task, seed, fmt(full["top1"], ".1f"), lw["budget"], fmt(lw["top1"], ".1f"),
                             f"{gap:+.1f}", fmt(lw["object_recall"]), fmt(lw["object_recall_chance"]),
                             fmt(lw["where_target_recall"]), "yes" if lw["selection_warning"] else "no",
                             fmt(lw["gmacs"], ".4f"), fmt(full["gmacs"], ".3f"),
                             f"{full['gmacs'] / lw['gmacs']:.1f}x", f"{full['teacher_train_time_s']:.0f}",
                             f"{lw['method_train_time_s']:.0f}"])

        def span(xs, spec=".1f"):
            return f"{sum(xs) / len(xs):{spec}} [{min(xs):{spec}}, {max(xs):{spec}}]"

        summary.append([task, len(args.seeds), span(full_acc), span(lw_acc), span(gaps), span(recalls, ".2f")])

    head = ["task", "seed", "full top-1 %", "lookwhere", "top-1 %", "gap", "object recall", "chance",
            "where-target recall", "guard", "GMACs", "full GMACs", "ratio", "teacher s", "lookwhere train s"]
    text = (f"Overrides: {' '.join(args.set) or '(none)'}\n\n" + tabulate(per_seed, headers=head, tablefmt="github")
            + "\n\nMean [min, max] over seeds:\n\n"
            + tabulate(summary, headers=["task", "seeds", "full top-1 %", "lookwhere top-1 %", "gap (points)",
                                         "object recall"], tablefmt="github") + "\n")
    print("\n" + text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
