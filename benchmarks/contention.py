"""How much a quick-teacher training step slows down when other processes share the CPU, against how much CPU it
lost: a step that slows by far more than its share of the cores shrank is losing time to its own threads (OpenMP
workers spinning at barriers while their partner thread waits for a core), not to the other processes.

    python benchmarks/contention.py                      # quiet, then beside a hog; default and passive waiting
    python benchmarks/contention.py --hog spin:2 --hog torch:2 --steps 20 --out benchmarks/results/contention.md

Each condition is a fresh process that builds the quick traffic-signs teacher exactly as ``lwbench run`` does
(``lw_vit_nano_p16`` at 240x320, the profile's dense and attention losses, batch 32, AdamW) and times
``--steps`` training steps through :func:`lwbench.training.loop.train_loop` after ``--warmup`` untimed ones, at
lwbench's default thread count (every core). A hog is ``kind:n``: ``spin`` = n single-threaded Python busy loops,
``torch`` = n processes multiplying matrices on their own default thread pools (as other PyTorch jobs do). The
"fair" slow-down is what the step would suffer if it got exactly its share of the cores and lost nothing else:
``cores it used quiet / cores its threads would get among the runnable threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOGS = {
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(384, 384)\nwhile True: a = (a @ a).tanh_()",
}


def worker(steps: int, warmup: int) -> dict:
    """Time ``steps`` teacher training steps in this process; the JSON line the parent reads."""
    import torch

    from lwbench.backbones import create_backbone
    from lwbench.config import TrainConfig, resolve_config
    from lwbench.heads import TaskModel
    from lwbench.runner import Plan
    from lwbench.seeding import seed_everything
    from lwbench.training.loop import EpochStream, train_loop
    from lwbench.training.teacher import DenseTrainer, ObjectCells, object_classes
    from lwbench.vit import FullEncoder

    cfg = resolve_config("full", "traffic_signs", None, profile="quick", quiet=True,
                         sets=["task.n_train=256", "task.n_val=8", "task.n_test=8"])
    plan = Plan(cfg)
    torch.set_num_threads(plan.threads)  # what lwbench run does: every core unless --set threads=N
    seed_everything(0)
    task, s = plan.task, cfg.teacher
    vit = create_backbone(plan.backbone_name, task.img_size)
    model = TaskModel(FullEncoder(vit), task.make_head(vit.embed_dim, cfg.head.pool))
    trainer = DenseTrainer(model, object_classes(task) + 1, s.attn_weight, s.attn_queries, s.attn_blocks)
    data = EpochStream(ObjectCells(task, "train", int(vit.patch_embed.patch_size[0])), s.batch_size, seed=0)
    _ = [data.dataset[i] for i in range(len(data.dataset))]  # scenes drawn and cached before any timing
    stamps: list[tuple[float, float]] = []  # (wall, CPU time of every thread of this process) at each step's start

    def loss(m, x, t):
        stamps.append((time.perf_counter(), time.process_time()))
        return m.loss(x, t, s.dense_weight)

    train_loop(trainer, loss, data, TrainConfig(steps=warmup + steps + 1, lr=s.lr, grad_clip=None), quiet=True)
    timed = stamps[warmup:]
    per_step = [b[0] - a[0] for a, b in zip(timed[:-1], timed[1:], strict=True)]
    wall, cpu = timed[-1][0] - timed[0][0], timed[-1][1] - timed[0][1]
    return {"threads": plan.threads, "steps": len(per_step), "s_per_step": statistics.median(per_step),
            "p25": statistics.quantiles(per_step, n=4)[0], "p75": statistics.quantiles(per_step, n=4)[2],
            "wall_s": wall, "cores_used": cpu / max(wall, 1e-9),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}


def start_hogs(spec: str) -> list[subprocess.Popen]:
    kind, _, n = spec.partition(":")
    if kind not in HOGS:
        raise SystemExit(f"contention: unknown hog '{kind}' (use {', '.join(HOGS)})")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the hogs keep their own defaults
    return [subprocess.Popen([sys.executable, "-c", HOGS[kind]], env=env) for _ in range(int(n or 1))]


def hog_threads(spec: str) -> int:
    kind, _, n = spec.partition(":")
    return int(n or 1) * (1 if kind == "spin" else (os.cpu_count() or 1))


def measure(policy: str | None, hog: str | None, args) -> dict:
    env = dict(os.environ, LWBENCH_CACHE=args.cache)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    hogs = start_hogs(hog) if hog else []
    try:
        time.sleep(1.0 if hogs else 0.0)  # the hogs are running before the first timed step
        out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup",
                              str(args.warmup)], env=env, capture_output=True, text=True, check=False)
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise SystemExit(f"contention: worker failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(hog=hog or "none", policy=policy or "default")
    return result


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    quiet = {r["policy"]: r for r in rows if r["hog"] == "none"}
    cores = os.cpu_count() or 1
    out = []
    for r in rows:
        base = quiet[r["policy"]]
        slow = r["s_per_step"] / base["s_per_step"]
        fair = "-"
        if r["hog"] != "none":
            share = cores * r["threads"] / (r["threads"] + hog_threads(r["hog"]))  # cores its threads would get
            fair = f"{base['cores_used'] / min(share, base['cores_used']):.2f}x"
        out.append([r["policy"], r["hog"], f"{r['s_per_step']:.3f} [{r['p25']:.3f}, {r['p75']:.3f}]",
                    f"{slow:.2f}x", fair, f"{r['cores_used']:.2f}", r["threads"]])
    return tabulate(out, headers=["OMP_WAIT_POLICY", "other processes", "s/step median [IQR]",
                                  "slow-down vs quiet", "fair slow-down", "cores used", "threads"],
                    tablefmt="github")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hog", action="append", help="kind:n, repeatable (default spin:2 and torch:2)")
    p.add_argument("--policy", action="append", help="OMP_WAIT_POLICY values to compare (default: unset, PASSIVE)")
    p.add_argument("--cache", default=None, help="LWBENCH_CACHE for the scenes (default: a temporary folder)")
    p.add_argument("--out", help="write the table (markdown) and the raw rows (JSON beside it) here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.warmup)))
        return
    args.cache = args.cache or tempfile.mkdtemp(prefix="lwbench-contention-")
    hogs = args.hog or ["spin:2", "torch:2"]
    policies = args.policy or [None, "PASSIVE"]
    rows = []
    for policy in policies:
        for hog in [None, *hogs]:
            r = measure(policy, hog, args)
            print(f"  {r['policy']:8s} beside {r['hog']:8s}: {r['s_per_step']:.3f} s/step, "
                  f"{r['cores_used']:.2f} cores", flush=True)
            rows.append(r)
    text = table(rows)
    print(text)
    if args.out:
        head = (f"`python benchmarks/contention.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d')}, "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                f"{__import__('torch').__version__}; quick traffic-signs teacher steps (batch 32, 240x320)\n\n")
        Path(args.out).write_text(head + text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
