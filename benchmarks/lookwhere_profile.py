"""Where LookWhere's batch-1 time goes, stage by stage, beside ``full``'s stages on the same backbone (CPU or GPU).

    python benchmarks/lookwhere_profile.py                          # quick traffic signs, 2 threads, float32
    python benchmarks/lookwhere_profile.py --autocast bfloat16 --k 28 --threads 2 --json out.json

Builds the quick profile's models for the task (random weights: time and MACs do not depend on the weights; the
top-k sees a random where-map, the same number of cells as a trained one), then times each stage of
``LookWhereEncoder.forward`` on its real input with ``torch.utils.benchmark`` (median of blocked runs, one stage at
a time, never two things at once), and counts its MACs with ``torch.utils.flop_counter`` (the counter of
``lwbench flops --counter torch``). ``full``'s forward is split the same way (patch embedding, blocks, norm,
head). The stages are also timed written out in one function, one after the other: if that takes as long as the
forward, the difference between the forward and the sum of the stages is not Python in the forward but what
running them in sequence costs.

Why MAC throughput: the batch-1 latency ratio divided by the GMAC ratio is exactly LookWhere's MACs per second
divided by ``full``'s, so the issue's "latency speed-up at least 70% of the GMAC ratio" asks that LookWhere's
forward run at 70% of ``full``'s MAC rate. Each stage's GMAC/s shows which one falls short. The last table times
the extractor's linear layers alone at the extractor's token count and at ``full``'s: the rate the matrix
multiplications themselves reach at each size, with no Python or other operator between them, i.e. the most a
faster implementation of the rest could recover.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils import benchmark


def build(task: str, k: int | None, img_size, sets=()):
    from lwbench.backbones import create_backbone
    from lwbench.config import resolve_config
    from lwbench.heads import TaskModel
    from lwbench.runner import Plan
    from lwbench.vit import FullEncoder

    cfg = resolve_config("lookwhere", task, f"k={k}" if k else None, profile="quick", sets=list(sets),
                         img_size=img_size)
    plan = Plan(cfg)
    torch.manual_seed(0)
    vit = create_backbone(plan.backbone_name, plan.task.img_size)
    head = plan.task.make_head(vit.embed_dim, cfg.head.pool)
    lw = TaskModel(plan.method.build(vit), head).eval()
    full = TaskModel(FullEncoder(vit), head).eval()
    return plan, lw, full


def median_ms(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median * 1e3


def macs_of(fn) -> int:
    """MACs of one call (FLOPs / 2), attention included (lwbench's SDPA formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lwbench.measure.flops import _sdpa_formulas

    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())
    with counter:
        fn()
    return int(counter.get_total_flops()) // 2


def stage_rows(stages, whole_ms: float, min_run_time: float) -> list[dict]:
    rows = []
    for name, fn in stages:
        ms, macs = median_ms(fn, min_run_time), macs_of(fn)
        rows.append({"stage": name, "ms": ms, "mmacs": macs / 1e6, "gmacs_per_s": macs / ms / 1e6 if ms else 0.0,
                     "share": ms / whole_ms})
    return rows


def fmt(rows: list[dict]) -> list[list[str]]:
    return [[r["stage"], f"{r['ms']:.3f}", f"{r['mmacs']:.2f}", f"{r['gmacs_per_s']:.1f}", f"{100 * r['share']:.0f}%"]
            for r in rows]


def linear_rates(vit, tokens: int, min_run_time: float) -> tuple[float, float]:
    """(ms, GMAC/s) of one block's four linear layers called back to back on ``tokens`` tokens, nothing else."""
    blk = vit.blocks[0]
    d = vit.embed_dim
    x, h = torch.randn(1, tokens, d), torch.randn(1, tokens, blk.mlp.fc1.out_features)
    layers = [(blk.attn.qkv, x), (blk.attn.proj, x), (blk.mlp.fc1, x), (blk.mlp.fc2, h)]

    def run():
        for lin, inp in layers:
            lin(inp)

    ms = median_ms(run, min_run_time)
    return ms, macs_of(run) / ms / 1e6


def main(argv=None) -> int:
    from lwbench.precision import autocast
    from lwbench.vit import assemble, embed_patches, grid_of, num_prefix, run_blocks, run_tokens

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="traffic_signs")
    ap.add_argument("--k", type=int, help="budget (default: the method's default k)")
    ap.add_argument("--img-size", help="HxW (default: the quick profile's)")
    ap.add_argument("--set", action="append", default=[], help="a run option, as for lwbench run (repeatable)")
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
    plan, lw, full = build(args.task, args.k, hw, args.set)
    enc, sel, ext = lw.encoder, lw.encoder.selector, lw.encoder.extractor
    fvit = full.encoder.vit
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
        lw_stages = [
            ("selector: resize to low-res", resize),
            ("selector: ViT blocks + norm", lambda: sel.vit.forward_features(low)),
            ("selector: where-map head", lambda: sel.where_map(patches, high)),
            ("top-k + sort", lambda: enc.select(wmap, k)),
            ("extractor: embed selected patches", lambda: embed_patches(ext.vit, x, idx)),
            ("extractor: blocks + norm", lambda: run_tokens(ext.vit, tok, idx, high, prefix=prefix)),
            ("task head", lambda: lw.head(out, size=x.shape[-2:])),
        ]
        # full's forward_features, split at lwbench.vit's seam (the one place that mirrors timm's forward order)
        fx = assemble(fvit, embed_patches(fvit, x))
        fb = run_blocks(fvit, fx)
        fout = full.encoder(x)
        full_stages = [
            ("full: patch embedding + position", lambda: assemble(fvit, embed_patches(fvit, x))),
            ("full: blocks", lambda: run_blocks(fvit, fx)),
            ("full: norm", lambda: fvit.norm(fb)),
            ("full: task head", lambda: full.head(fout, size=x.shape[-2:])),
        ]

        def in_sequence():
            """The stages above written out one after the other: the forward without its own Python."""
            f = sel.vit.forward_features(resize())
            i = enc.select(sel.where_map(f[:, p:], high), k)
            o = run_tokens(ext.vit, embed_patches(ext.vit, x, i), i, high, prefix=f[:, :p])
            return lw.head(o, size=x.shape[-2:])

        whole = median_ms(lambda: lw(x), args.min_run_time)
        sequence_ms = median_ms(in_sequence, args.min_run_time)
        full_ms = median_ms(lambda: full(x), args.min_run_time)
        lw_macs, full_macs = macs_of(lambda: lw(x)), macs_of(lambda: full(x))
        lw_rows = stage_rows(lw_stages, whole, args.min_run_time)
        full_rows = stage_rows(full_stages, full_ms, args.min_run_time)
        n_ext, n_full = k + num_prefix(ext.vit), high[0] * high[1] + num_prefix(fvit)
        lin_ext, lin_full = linear_rates(ext.vit, n_ext, args.min_run_time), linear_rates(fvit, n_full,
                                                                                         args.min_run_time)
        compiled = {}
        if args.compile:  # one compiled call first: the compile itself is not timed
            for name, model in (("lookwhere", lw), ("full", full)):
                c = torch.compile(model)
                c(x)
                compiled[name] = median_ms(lambda c=c: c(x), args.min_run_time)

    def total_row(name, rows, ms, macs, seq_ms=None):
        parts = sum(r["ms"] for r in rows)
        seq = [] if seq_ms is None else [["(the same stages in sequence, one function)", f"{seq_ms:.3f}", "", "",
                                          f"{100 * seq_ms / ms:.0f}%"]]
        return [[f"(sum of {name}'s stages, each timed alone)", f"{parts:.3f}", "", "", f"{100 * parts / ms:.0f}%"],
                *seq,
                [f"{name} forward", f"{ms:.3f}", f"{macs / 1e6:.2f}", f"{macs / ms / 1e6:.1f}", "100%"]]

    gmac_ratio, lat_ratio = full_macs / lw_macs, full_ms / whole
    print(f"# lookwhere k={k} on {args.task} {plan.task.img_size[0]}x{plan.task.img_size[1]}, selector "
          f"{sel.low_size[0]}x{sel.low_size[1]} depth {sel.depth}, batch 1, {args.threads} threads, autocast "
          f"{args.autocast}, torch {torch.__version__}")
    head = ["stage", "ms (median)", "MMACs", "GMAC/s", "share"]
    print(tabulate(fmt(lw_rows) + total_row("lookwhere", lw_rows, whole, lw_macs, sequence_ms), headers=head,
                   tablefmt="github"))
    print()
    print(tabulate(fmt(full_rows) + total_row("full", full_rows, full_ms, full_macs), headers=head,
                   tablefmt="github"))
    print()
    lin = "one block's 4 linear layers alone"
    summary = [["GMAC ratio (full / lookwhere)", f"{gmac_ratio:.2f}x"],
               ["batch-1 latency ratio (full / lookwhere)", f"{lat_ratio:.2f}x"],
               ["latency ratio / GMAC ratio (= lookwhere's MAC rate / full's)", f"{100 * lat_ratio / gmac_ratio:.0f}%"],
               [f"{lin}, {n_ext} tokens", f"{lin_ext[0]:.3f} ms, {lin_ext[1]:.1f} GMAC/s"],
               [f"{lin}, {n_full} tokens", f"{lin_full[0]:.3f} ms, {lin_full[1]:.1f} GMAC/s"],
               ["their rate ratio (ceiling of the ratio above from the matmuls alone)",
                f"{100 * lin_ext[1] / lin_full[1]:.0f}%"]]
    if compiled:
        summary += [["lookwhere forward, torch.compile", f"{compiled['lookwhere']:.3f} ms"],
                    ["full forward, torch.compile", f"{compiled['full']:.3f} ms"],
                    ["latency ratio, torch.compile", f"{compiled['full'] / compiled['lookwhere']:.2f}x"]]
    print(tabulate(summary, tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"k": k, "threads": args.threads, "autocast": args.autocast, "lookwhere_stages": lw_rows,
                       "full_stages": full_rows, "lookwhere_ms": whole, "stages_in_sequence_ms": sequence_ms,
                       "full_ms": full_ms,
                       "lookwhere_macs": lw_macs, "full_macs": full_macs, "gmac_ratio": gmac_ratio,
                       "latency_ratio": lat_ratio, "linear_alone": {"extractor": lin_ext, "full": lin_full},
                       "compiled_ms": compiled, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
