"""Where LookWhere's batch-1 time goes, stage by stage, beside ``full`` on the same backbone (CPU or GPU).

    python benchmarks/lookwhere_profile.py                          # quick traffic signs, 2 threads, float32
    python benchmarks/lookwhere_profile.py --autocast bfloat16 --k 28 --threads 2

Builds the quick profile's models for the task (random weights: time and MACs do not depend on the weights; the
top-k sees a random where-map, the same number of cells as a trained one), then times each stage of
``LookWhereEncoder.forward`` on its real inputs with ``torch.utils.benchmark`` (median of blocked runs, one
stage at a time, never two things at once): the selector's resize, its ViT, the where-map, the top-k, the
extractor's patch embedding, its blocks + norm, the task head; then the whole forward, and ``full``'s. The
stage times add up to about the whole (the rest is Python between them). Prints one table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils import benchmark


def build(task: str, k: int | None, img_size):
    from lwbench.backbones import create_backbone
    from lwbench.config import resolve_config
    from lwbench.heads import TaskModel
    from lwbench.runner import Plan
    from lwbench.vit import FullEncoder

    cfg = resolve_config("lookwhere", task, f"k={k}" if k else None, profile="quick", sets=[], img_size=img_size)
    plan = Plan(cfg)
    torch.manual_seed(0)
    vit = create_backbone(plan.backbone_name, plan.task.img_size)
    head = plan.task.make_head(vit.embed_dim, cfg.head.pool)
    lw = TaskModel(plan.method.build(vit), head).eval()
    full = TaskModel(FullEncoder(vit), head).eval()
    return plan, lw, full


def median_ms(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def main(argv=None) -> int:
    from lwbench.precision import autocast
    from lwbench.vit import embed_patches, grid_of, num_prefix, run_tokens

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="traffic_signs")
    ap.add_argument("--k", type=int, help="budget (default: the method's default k)")
    ap.add_argument("--img-size", help="HxW (default: the quick profile's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", default="none", choices=["none", "bfloat16"])
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timed stage")
    ap.add_argument("--compile", action="store_true",
                    help="also time both whole forwards under torch.compile (inductor; compiling takes about a "
                         "minute on 2 cores)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = tuple(int(v) for v in args.img_size.lower().split("x")) if args.img_size else None
    plan, lw, full = build(args.task, args.k, hw)
    enc, sel, ext = lw.encoder, lw.encoder.selector, lw.encoder.extractor
    x = torch.rand(1, 3, *plan.task.img_size)
    k = enc.k
    high = grid_of(ext.vit, x)
    down = x.shape[-2] > sel.low_size[0] or x.shape[-1] > sel.low_size[1]

    # The stages of LookWhereEncoder.forward (methods/lookwhere/model.py), each on its real input.
    def resize():
        return F.interpolate(x, size=sel.low_size, mode="bilinear", align_corners=False,
                             antialias=sel.antialias and down)

    with torch.inference_mode(), autocast("cpu", args.autocast):
        low = resize()
        feats = sel.vit.forward_features(low)
        p = num_prefix(sel.vit)
        prefix, patches = feats[:, :p], feats[:, p:]
        wmap = sel.where_map(patches, high)
        idx = enc.select(wmap, k)
        tok = embed_patches(ext.vit, x, idx)
        out = run_tokens(ext.vit, tok, idx, high, prefix=prefix)
        stages = [
            ("selector: resize to low-res", resize),
            ("selector: ViT blocks + norm", lambda: sel.vit.forward_features(low)),
            ("selector: where-map head", lambda: sel.where_map(patches, high)),
            ("top-k + sort", lambda: enc.select(wmap, k)),
            ("extractor: embed selected patches", lambda: embed_patches(ext.vit, x, idx)),
            ("extractor: blocks + norm", lambda: run_tokens(ext.vit, tok, idx, high, prefix=prefix)),
            ("task head", lambda: lw.head(out, size=x.shape[-2:])),
        ]
        rows = [(name, median_ms(fn, args.min_run_time)) for name, fn in stages]
        parts = sum(t for _, t in rows)
        whole = median_ms(lambda: lw(x), args.min_run_time)
        full_ms = median_ms(lambda: full(x), args.min_run_time)
        compiled = {}
        if args.compile:  # one compiled call first: the compile itself is not timed
            for name, model in (("lookwhere", lw), ("full", full)):
                c = torch.compile(model)
                c(x)
                compiled[name] = median_ms(lambda c=c: c(x), args.min_run_time)
    table = [[n, f"{t:.3f}", f"{100 * t / whole:.0f}%"] for n, t in rows]
    table += [["(sum of stages)", f"{parts:.3f}", f"{100 * parts / whole:.0f}%"],
              ["lookwhere forward", f"{whole:.3f}", "100%"], ["full forward", f"{full_ms:.3f}", ""],
              ["full / lookwhere", f"{full_ms / whole:.2f}x", ""]]
    if compiled:
        table += [["lookwhere forward, torch.compile", f"{compiled['lookwhere']:.3f}", ""],
                  ["full forward, torch.compile", f"{compiled['full']:.3f}", ""],
                  ["full / lookwhere, torch.compile", f"{compiled['full'] / compiled['lookwhere']:.2f}x", ""]]
    print(f"# lookwhere k={k} on {args.task} {plan.task.img_size[0]}x{plan.task.img_size[1]}, selector "
          f"{sel.low_size[0]}x{sel.low_size[1]} depth {sel.depth}, batch 1, {args.threads} threads, autocast "
          f"{args.autocast}, torch {torch.__version__}")
    print(tabulate(table, headers=["stage", "ms (median)", "share"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": k, "threads": args.threads, "autocast": args.autocast, "stages": dict(rows),
                       "lookwhere_ms": whole, "full_ms": full_ms,
                       "compiled_ms": compiled}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
