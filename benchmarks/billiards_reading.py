"""Can the quick billiards teacher read the balls? Where a billiards teacher fails: reading the numbers, or the
relation between balls (``max-left-right``: the larger number of the leftmost and the rightmost ball).

    python benchmarks/billiards_reading.py                                   # the quick profile's teacher
    python benchmarks/billiards_reading.py --set task.ball_frac=0.18,0.22    # another scene setting
    python benchmarks/billiards_reading.py --set task.numbers=small --set teacher.steps=1000   # task version 1

For the task's teacher (trained, or loaded from the cache exactly as ``lwbench run`` would) it reports, on test
scenes:

* ``top-1``: the teacher's task accuracy;
* ``ball read``: the share of balls whose number the teacher's per-patch object head (trained beside it by the
  dense loss, ``lwbench/training/teacher.py``) gets right, from the mean of its logits over the ball's cells
  (the cells the dense loss labels: the whole ball with ``numbers=small``, its number disc with ``large``;
  chance 1/9);
* ``label from reads``: the label computed from those reads with the true positions (what reading alone allows);
* ``max of all (true)``: the label's agreement with the largest number on the table, i.e. what a model that reads
  perfectly but ignores where the balls are would score.

A teacher whose ``ball read`` is near chance has not learned to read, and no method on it can do better.
"""

from __future__ import annotations

import argparse
import time

from tabulate import tabulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, as in run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=300, help="test scenes (default 300)")
    args = ap.parse_args()

    import torch
    from safetensors import safe_open

    from lwbench.config import resolve_config
    from lwbench.runner import Plan, build_teacher
    from lwbench.training.teacher import cell_targets

    plan = Plan(resolve_config("full", "billiards", sets=args.set, seed=args.seed))
    torch.set_num_threads(plan.threads)
    t0 = time.perf_counter()
    teacher, train_s, tdir = build_teacher(plan)
    with safe_open(str(tdir / "model.safetensors"), framework="pt") as f:
        if "cells.weight" not in f.keys():
            raise SystemExit(f"{tdir} has no per-patch object head (teacher.dense_weight was 0)")
        w, b = f.get_tensor("cells.weight"), f.get_tensor("cells.bias")
    task = plan.task
    patch = int(teacher.encoder.vit.patch_embed.patch_size[0])
    grid = (task.img_size[0] // patch, task.img_size[1] // patch)
    ds = task.dataset("test")
    n = min(args.n, len(ds))
    hits = {"top1": 0, "read": 0, "balls": 0, "from_reads": 0, "max_all": 0}
    teacher.eval()
    with torch.no_grad():
        for i in range(n):
            x, y = ds[i]
            out = teacher.encoder(x[None])
            hits["top1"] += int(teacher.head(out, size=x.shape[-2:]).argmax(-1).item() == y)
            logits = out.patches[0] @ w.T + b  # (cells, 1 + numbers): 0 = background
            objs = task.objects("test", i)
            reads = []
            for o in objs:
                cells = cell_targets([o], grid, patch) > 0
                read = int(logits[cells][:, 1:].mean(0).argmax()) if cells.any() else -1
                reads.append(read)
                hits["read"] += int(read == o["label"])
                hits["balls"] += 1
            xs = [(o["box"][0] + o["box"][2]) / 2 for o in objs]
            left, right = xs.index(min(xs)), xs.index(max(xs))
            hits["from_reads"] += int(max(reads[left], reads[right]) == y)
            hits["max_all"] += int(max(o["label"] for o in objs) == y)
    row = [plan.teacher_id, " ".join(args.set) or "(profile)", f"{100 * hits['top1'] / n:.1f}",
           f"{100 * hits['read'] / hits['balls']:.1f}", f"{100 * hits['from_reads'] / n:.1f}",
           f"{100 * hits['max_all'] / n:.1f}", f"{train_s:.0f}", f"{time.perf_counter() - t0:.0f}"]
    print(tabulate([row], headers=["teacher", "overrides", "top-1 %", "ball read %", "label from reads %",
                                   "max of all (true) %", "teacher train s", "wall s"], tablefmt="github"))
    print(f"\n{n} test scenes, {hits['balls']} balls; chance: top-1 {100 / task.num_classes:.1f}%, ball read 11.1%")


if __name__ == "__main__":
    main()
