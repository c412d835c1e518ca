"""Does a speed-up reproduce? The old protocol (each model timed alone, one fresh process after the other) against
paired timing (the model and its `full` reference interleaved in one process, lwbench/measure/paired.py), on a
quiet machine and beside a CPU hog on every core.

    python benchmarks/latency_stability.py                      # quick traffic-signs models, quiet then hog
    python benchmarks/latency_stability.py --out benchmarks/results/latency_stability.md
    python benchmarks/latency_stability.py --device cuda --quick    # benchmarks/gpu_check.sh: one paired pass

The models are the quick traffic-signs profile's, built as `lwbench run` builds them: the shipped task-trained
teacher (`full`), ToMe and EViT on it (off the shelf), and LookWhere with its selector as the profile sets it but
an untrained where-head (k is fixed, so it does the same work as a trained one; timing does not depend on the
weights). They are timed on the synthetic test images, in isolated worker processes, as rows are. The hog is
`--hog N` single-threaded busy loops (default: one per core), started before and stopped after each condition.

Old protocol: for each method, `full` then the method, each alone in a fresh worker (as rows were timed until
2026-12-06), `--repeats` times; its speed-up is the ratio of the two medians. Paired: the method against `full` in
one worker, `--repeats` times, each with its 95% interval. The targets (issue 28): a paired ratio measured quiet and
beside the hog agrees within the intervals and within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = (("lookwhere", "k=28"), ("tome", "r=38"), ("evit", "keep_rate=0.7"))
HOG = "while True: pass"


def build(methods, device: str, threads: int | None = None):
    """``{name: model}`` and the test images, from the quick profile's plan of each method."""
    import dataclasses

    from lwbench.config import resolve_config
    from lwbench.heads import TaskModel
    from lwbench.runner import Plan, build_teacher, measure_images

    sets = [f"threads={threads}"] if threads else []
    plan = Plan(resolve_config("full", "traffic_signs", None, profile="quick", quiet=True, device=device, sets=sets))
    teacher, _, _ = build_teacher(plan)
    models = {"full": teacher.eval()}
    for method, budget in methods:
        p = Plan(dataclasses.replace(plan.cfg, method=method, budget=budget, method_opts=None, regime="auto"))
        encoder = p.method.build(teacher.encoder.vit)
        models[f"{method} {budget}"] = TaskModel(encoder, teacher.head).eval()
    images = measure_images(plan, plan.cfg.measure.throughput_batch)
    return models, images, plan


def measure(models, images, plan, repeats: int, old: bool):
    from lwbench.measure.worker import measure_in_subprocess

    where = dict(device=plan.device, threads=plan.threads)
    rows = []
    for name, model in models.items():
        if name == "full":
            continue
        for rep in range(repeats):
            if old:
                t0 = time.perf_counter()
                ref = measure_in_subprocess(models["full"], images, plan.cfg.measure, **where)
                got = measure_in_subprocess(model, images, plan.cfg.measure, **where)
                rows.append({"method": name, "protocol": "old (one model per process)", "repeat": rep,
                             "speedup": ref["latency_ms"] / got["latency_ms"], "ms": got["latency_ms"],
                             "reference_ms": ref["latency_ms"],
                             "throughput_speedup": got["throughput"] / ref["throughput"],
                             "seconds": time.perf_counter() - t0})
            else:
                t0 = time.perf_counter()
                got = measure_in_subprocess(model, images, plan.cfg.measure, **where, reference=models["full"])
                rows.append({"method": name, "protocol": "paired", "repeat": rep, "speedup": got["speedup"],
                             "ci_low": got["speedup_ci_low"], "ci_high": got["speedup_ci_high"],
                             "reliable": got["speedup_reliable"], "rounds": got["timing_rounds"],
                             "quiet_rounds": got["timing_quiet_rounds"], "contended": got["timing_contended"],
                             "ms": got["latency_ms"], "reference_ms": got["reference_latency_ms"],
                             "throughput_speedup": got["throughput_speedup"],
                             "throughput_ci": [got["throughput_speedup_ci_low"], got["throughput_speedup_ci_high"]],
                             "kernel": got["attention_kernel"], "reference_kernel": got["reference_attention_kernel"],
                             "seconds": time.perf_counter() - t0})
            print("   ", _line(rows[-1]), flush=True)
    return rows


def _cell(r: dict) -> str:
    if "ci_low" not in r:
        return f"{r['speedup']:.2f}"
    flag = "" if r["reliable"] else (" (contended)" if r["contended"] else " (wide)")
    return f"{r['speedup']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]{flag}"


def _line(r: dict) -> str:
    ci = _cell(r)[len(f"{r['speedup']:.2f}"):]
    return (f"{r['method']:20s} {r['protocol']:28s} {r['speedup']:.2f}x{ci} (ms {r['ms']:.2f} vs "
            f"{r['reference_ms']:.2f}; throughput {r['throughput_speedup']:.2f}x; {r['seconds']:.0f} s)")


def memory_repeats(models, images, plan, n: int) -> str:
    """Each model's peak memory measured ``n`` times, each time in a fresh worker as a row is: the spread says
    how far the figure can be trusted (on CPU it moves with the allocator's state)."""
    import dataclasses

    from tabulate import tabulate

    from lwbench.measure.worker import measure_in_subprocess

    quick = dataclasses.replace(plan.cfg.measure, min_run_time=0.05, warmup=1, min_runs=2, throughput_batch=2)
    out = []
    for name, model in models.items():
        got = [measure_in_subprocess(model, images, quick, device=plan.device, threads=plan.threads) for _ in range(n)]
        mb = [g["peak_memory_mb"] for g in got]
        out.append([name, got[0].get("param_mb", float("nan")), "; ".join(f"{v:.2f}" for v in mb),
                    f"{max(mb) - min(mb):.2f}", f"{(max(mb) - min(mb)) / min(mb):.1%}",
                    got[0].get("memory_method", "")])
    return tabulate(out, headers=["model", "weights MB", f"peak MB, {n} fresh workers", "max - min", "relative",
                                  "method"], tablefmt="github", floatfmt=".2f")


def with_hog(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
    time.sleep(1.0)
    return procs


def summary(rows: list[dict]) -> str:
    from tabulate import tabulate

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for protocol in dict.fromkeys(r["protocol"] for r in rows):
            for load in dict.fromkeys(r["load"] for r in rows):
                sel = [r for r in rows if (r["method"], r["protocol"], r["load"]) == (method, protocol, load)]
                if not sel:
                    continue
                cells = [_cell(r) for r in sel]
                spread = max(r["speedup"] for r in sel) / min(r["speedup"] for r in sel)
                out.append([method, protocol, load, "; ".join(cells), f"{spread:.2f}x",
                            "; ".join(f"{r['throughput_speedup']:.2f}" for r in sel)])
    table = tabulate(out, headers=["method", "protocol", "machine", "batch-1 speed-up over full (each repeat)",
                                   "max/min", "throughput speed-up"], tablefmt="github")
    verdicts = []
    loads = list(dict.fromkeys(r["load"] for r in rows))
    for method in dict.fromkeys(r["method"] for r in rows):
        paired = {load: [r for r in rows if r["method"] == method and r["protocol"] == "paired" and r["load"] == load]
                  for load in loads}
        if len(paired) < 2 or not all(paired.values()):
            continue
        (qa, qrows), (ha, hrows) = list(paired.items())[:2]
        q_med = statistics.median(r["speedup"] for r in qrows)
        h_med = statistics.median(r["speedup"] for r in hrows)
        covered = sum(r["ci_low"] <= q_med <= r["ci_high"] for r in hrows)
        flagged = sum(not r["reliable"] for r in hrows)
        thr_q = statistics.median(r["throughput_speedup"] for r in qrows)
        thr_h = statistics.median(r["throughput_speedup"] for r in hrows)
        verdicts.append(f"- {method}: batch 1, median of the repeats {q_med:.2f} ({qa}) and {h_med:.2f} ({ha}), "
                        f"{abs(h_med / q_med - 1):.1%} apart; {covered} of {len(hrows)} {ha} intervals hold the {qa} "
                        f"value; {flagged} of {len(hrows)} {ha} rows flagged not reliable. Throughput: {thr_q:.2f} "
                        f"and {thr_h:.2f}, {abs(thr_h / thr_q - 1):.1%} apart.")
    return table + ("\n\n" + "\n".join(verdicts) if verdicts else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hog", type=int, default=os.cpu_count() or 1, help="busy loops of the hog condition (0: none)")
    p.add_argument("--quick", action="store_true", help="one paired pass on a quiet machine (gpu_check.sh)")
    p.add_argument("--paired-only", action="store_true", help="skip the old protocol")
    p.add_argument("--threads", type=int, help="timing threads (default: the quick profile's, every core)")
    p.add_argument("--out", help="write the summary (markdown) here and the raw rows as JSON beside it")
    p.add_argument("--memory-repeats", type=int, default=0, metavar="N",
                   help="instead: measure each model's peak memory N times, each in a fresh worker (how reproducible "
                        "the CPU figure is), and exit")
    p.add_argument("--summarize", metavar="ROWS.json", help="print the summary of an earlier run's rows (its --out "
                   "JSON) and exit")
    args = p.parse_args()
    if args.summarize:
        print(summary(json.loads(Path(args.summarize).read_text())))
        return
    from lwbench.openmp import prefer_passive

    prefer_passive()  # as the lwbench command does, before torch loads
    models, images, plan = build(METHODS, args.device, args.threads)
    if args.memory_repeats:
        print(memory_repeats(models, images, plan, args.memory_repeats))
        return
    rows: list[dict] = []
    conditions = [("quiet", 0)] + ([] if args.quick or args.hog <= 0 else [(f"{args.hog} busy loops", args.hog)])
    for load, hogs in conditions:
        print(f"== {load}", flush=True)
        procs = with_hog(hogs) if hogs else []
        try:
            protocols = [False] if args.quick or args.paired_only else [True, False]
            for old in protocols:
                for r in measure(models, images, plan, 1 if args.quick else args.repeats, old):
                    rows.append({**r, "load": load})
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    text = summary(rows)
    from lwbench.measure.env import device_name

    head = (f"`python benchmarks/latency_stability.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{device_name(plan.device)}, {os.cpu_count()} cores, {plan.threads} threads, OMP_WAIT_POLICY "
            f"{os.environ.get('OMP_WAIT_POLICY', 'default')}, torch "
            f"{__import__('torch').__version__}, quick traffic-signs models at 240x320, fp32; latency at batch 1, "
            f"throughput at batch {plan.cfg.measure.throughput_batch}\n\n")
    print(head + text)
    if args.out:
        Path(args.out).write_text(head + text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
