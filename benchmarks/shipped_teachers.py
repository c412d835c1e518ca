"""Write and check the teachers lwbench ships (``lwbench/shipped_teachers/``, see ``lwbench/shipping.py``).

    python benchmarks/shipped_teachers.py --check traffic_signs        # retrain in a fresh cache, compare bits
    python benchmarks/shipped_teachers.py --write traffic_signs --from-cache ~/.cache/lwbench
    python benchmarks/shipped_teachers.py --write traffic_signs        # train afresh, then ship

The teacher of a task is the one every quick-profile run on it starts from (``lwbench run --method full --task T
--retrain-teacher`` trains the same one: the teacher id does not depend on the method). ``--check`` trains it
afresh in a temporary cache and compares the weights with the shipped file: bit-for-bit (sha256), or else the
largest absolute difference of any weight, so the shipped file's claim in ``shipped.json`` can be verified on
any machine. Training takes about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def plan_for(task: str, threads: int | None, sets: list[str] | None = None):
    from lwbench.config import resolve_config
    from lwbench.runner import Plan

    sets = [*(sets or []), *([f"threads={threads}"] if threads else [])]
    cfg = resolve_config("full", task, None, profile="quick", sets=sets)
    return Plan(cfg.replace(retrain_teacher=True))


def train(task: str, cache: Path, threads: int | None, sets: list[str] | None = None) -> tuple[Path, float]:
    os.environ["LWBENCH_CACHE"] = str(cache)
    from lwbench.runner import build_teacher

    plan = plan_for(task, threads, sets)
    torch.set_num_threads(plan.threads)
    t0 = time.perf_counter()
    _, _, tdir = build_teacher(plan)
    return tdir, time.perf_counter() - t0


def compare(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    from lwbench.shipping import sha256

    if sha256(a) == sha256(b):
        return "bit-for-bit identical (sha256 equal)"
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f"different tensors: {sorted(set(ta) ^ set(tb))[:5]}"
    worst = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    return f"not bit-identical: largest absolute weight difference {worst:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="TASK")
    ap.add_argument("--write", metavar="TASK")
    ap.add_argument("--from-cache", help="ship the finished teacher from this cache instead of training it")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores; the shipped ones used 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override the teacher depends on, e.g. task.scenes=hard (repeatable)")
    args = ap.parse_args(argv)
    from lwbench.shipping import ship, shipped_folder

    task = args.check or args.write
    if not task:
        ap.error("give --check TASK or --write TASK")
    plan = plan_for(task, args.threads, args.set)
    sets = "".join(f" --set {s}" for s in args.set)
    if args.check:
        shipped = shipped_folder(plan.teacher_id)
        if shipped is None:
            print(f"no shipped teacher for {task} (teacher id {plan.teacher_id})")
            return 1
        with tempfile.TemporaryDirectory(prefix="lwbench-teacher-check-") as tmp:
            tdir, secs = train(task, Path(tmp), args.threads, args.set)
            verdict = compare(shipped / "model.safetensors", tdir / "model.safetensors")
        print(f"{task}: teacher {plan.teacher_id} retrained in {secs:.0f} s with {plan.threads} threads on "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}: {verdict}")
        return 0 if verdict.startswith("bit-for-bit") else 1
    cache = Path(args.from_cache) if args.from_cache else Path(tempfile.mkdtemp(prefix="lwbench-teacher-"))
    tdir = cache / "teachers" / plan.teacher_id
    if not (tdir / "done.json").is_file():
        tdir, _ = train(task, cache, args.threads, args.set)
    cmd = f"lwbench run --method full --task {task}{sets} --retrain-teacher"
    where = (f"{platform.processor() or platform.machine()}, {plan.threads} threads, python "
             f"{sys.version.split()[0]}, torch {torch.__version__}")
    dest = ship(tdir, cmd, where, f"not yet checked: run benchmarks/shipped_teachers.py --check {task}{sets}")
    print(f"shipped {tdir} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
