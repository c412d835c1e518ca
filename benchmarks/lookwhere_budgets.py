"""What LookWhere's GMAC ratio costs in accuracy on the quick profile: k and selector size against fine-tuned ``full``.

    python benchmarks/lookwhere_budgets.py                                  # the default grid, traffic signs
    python benchmarks/lookwhere_budgets.py --results DIR --out table.md     # reuse (or keep) the rows

Runs ``lwbench run`` for fine-tuned ``full`` and for each LookWhere point of the grid (rows that exist in
``--results`` are reused, as any lwbench run does), then prints one table: GMACs, the ratio to ``full``, top-1
with its 95% interval, the **paired** difference to ``full`` on the same test images with its 95% interval (the
protocol of ``lwbench report``) and the share of sign cells the selection covered. Every point gets the profile's
one fine-tuning recipe; a smaller selector is a different distillation (its own stage, trained once).

Why: the paper's 17x (10% of the patches) is a ratio of a 1024-px image to a tiny low-res selector. On the quick
240x320 grid (300 patches + 5 prefix tokens) a 17x ratio needs k of about 12 with a 48x64 selector; this script
measures what that does to accuracy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

# (label, budget, --set overrides): the quick default, smaller k, then a smaller selector (distilled for small k).
SMALL_SELECTOR = ["method.selector_size=0.2", "method.distill_min_k=8"]
GRID = [
    ("default (selector 0.3 = 64x96)", "k=28", []),
    ("default selector", "k=15", []),
    ("default selector", "k=12", []),
    ("selector 0.2 = 48x64", "k=28", SMALL_SELECTOR),
    ("selector 0.2 = 48x64", "k=15", SMALL_SELECTOR),
    ("selector 0.2 = 48x64", "k=12", SMALL_SELECTOR),
]


def run(task: str, method: str, budget: str | None, sets: list[str], results: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "lwbench", "run", "--method", method, "--task", task, "--results", str(results),
           "--quiet"]
    if method == "full":
        cmd += ["--regime", "finetuned"]
    if budget:
        cmd += ["--budget", budget]
    for s in sets + extra:
        cmd += ["--set", s]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def newest(store, task: str, method: str, **equals):
    rows = store.rows(task=task, method=method, **equals)
    return max(rows, key=lambda r: r["created_at"]) if rows else None


def main(argv=None) -> int:
    from lwbench.results import ResultStore
    from lwbench.stats import paired_bootstrap

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="traffic_signs")
    ap.add_argument("--results", help="results folder (default: a fresh temporary one)")
    ap.add_argument("--set", action="append", default=[], help="passed to every run (e.g. threads=2)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    results = Path(args.results) if args.results else Path(tempfile.mkdtemp(prefix="lwbench-budgets-"))
    os.environ.setdefault("LWBENCH_RESULTS", str(results))

    run(args.task, "full", None, [], results, args.set)
    for _, budget, sets in GRID:
        run(args.task, "lookwhere", budget, sets, results, args.set)

    store = ResultStore(results)
    full = newest(store, args.task, "full", regime="finetuned")
    ref = store.per_image(full)[full["metric"]]
    table = [["full", "-", f"{full['gmacs']:.4f}", "1.0x", _ci(full), "-", "1.00"]]
    for label, budget, sets in GRID:
        want = dict(kv.split("=", 1) for kv in (s.replace("method.", "", 1) for s in sets))
        rows = [r for r in store.rows(task=args.task, method="lookwhere", budget=budget)
                if all(str(r["config"]["method_opts"].get(k)) == v or _same_size(r, k, v) for k, v in want.items())
                and (want or r["config"]["method_opts"].get("distill_min_k") == 16)]
        row = max(rows, key=lambda r: r["created_at"])
        d = paired_bootstrap(store.per_image(row)[row["metric"]], ref, row["metric"], seed=0)
        table.append([f"lookwhere, {label}", budget, f"{row['gmacs']:.4f}", f"{full['gmacs'] / row['gmacs']:.1f}x",
                      _ci(row), f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]",
                      f"{row.get('object_recall', float('nan')):.2f}"])
    headers = ["method", "budget", "GMACs", "fewer GMACs than full", f"{full['metric']} [95% CI]",
               "minus full [95% CI, paired]", "object recall"]
    text = tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _ci(row) -> str:
    return f"{row['metric_value']:.1f} [{row['metric_ci_low']:.1f}, {row['metric_ci_high']:.1f}]"


def _same_size(row, key: str, value: str) -> bool:
    """``selector_size=0.2`` is stored resolved (``48x64``): compare what it resolves to on this image."""
    if key != "selector_size":
        return False
    h, w = row["config"]["img_size"]
    got = str(row["config"]["method_opts"].get(key))
    return got == f"{round(h * float(value))}x{round(w * float(value))}"


if __name__ == "__main__":
    sys.exit(main())
