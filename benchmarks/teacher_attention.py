"""Does the quick teacher's attention point at the objects? Train (or load from cache) the task teacher per
seed and report its accuracy, the object recall of its where-target (top-k cells of the last-layer
attention, CLS row and mean of the patch rows), and the CLS-attention recall of every block (what EViT, top-k
and ATS rank tokens by, at blocks 1-3 of the quick 4-block ViT), against a random choice of k cells.

    python benchmarks/teacher_attention.py --task traffic_signs --seeds 0 1 2 --set teacher.attn_weight=1

Teachers are cached exactly as ``lwbench run`` caches them, so a later run of the same config reuses them.
"""

from __future__ import annotations

import argparse
import time

from tabulate import tabulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="traffic_signs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, as in run")
    ap.add_argument("--eval-limit", type=int, default=None, help="test images for the accuracy (default: all)")
    ap.add_argument("--k", type=int, default=None, help="cells for the recall (default: LookWhere's default k)")
    args = ap.parse_args()

    from lwbench.config import resolve_config
    from lwbench.diagnostics import attention_recall, where_target_recall
    from lwbench.runner import Plan, build_teacher

    rows = []
    for seed in args.seeds:
        plan = Plan(resolve_config("lookwhere", args.task, sets=args.set, seed=seed))
        import torch

        torch.set_num_threads(plan.threads)
        t0 = time.perf_counter()
        teacher, train_s, tdir = build_teacher(plan)
        k = args.k or int(plan.method.budget)
        acc = plan.task.evaluate(teacher, plan.task.loader("test", 64, limit=args.eval_limit))["top1"]
        vit = teacher.encoder.vit
        cls = where_target_recall(vit, plan.task, k, "cls", n=128)
        pat = where_target_recall(vit, plan.task, k, "patch", n=128)
        per_block = attention_recall(vit, plan.task, k, "cls", n=128)
        rows.append([seed, plan.teacher_id, f"{acc:.1f}", k, f"{cls['where_target_recall']:.2f}",
                     f"{pat['where_target_recall']:.2f}", " ".join(f"{r:.2f}" for r in per_block.values()),
                     f"{cls['where_target_chance']:.2f}", f"{train_s:.0f}", f"{time.perf_counter() - t0:.0f}"])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print(f"\n{args.task}, overrides: {' '.join(args.set) or '(none)'}")
    print(tabulate(rows, headers=["seed", "teacher", "top-1 %", "k", "recall cls", "recall patch",
                                  "CLS recall per block", "chance",
                                  "train s", "wall s"], tablefmt="github"))


if __name__ == "__main__":
    main()
