"""Where a method's forward spends its time, stage by stage, beside ``full``'s, at the speed reference's geometry.

    python benchmarks/stage_profile.py --method lookwhere --backbone vit_base_patch14_reg4_dinov2 --img-size 518
    python benchmarks/stage_profile.py --method tome --budget r=57 --threads 2 --json out.json

Builds the model ``lwbench speed`` times (:func:`lwbench.models.build_model`, random weights, seeded) and ``full``
on the same backbone and size, then runs **whole forwards** with timers around the named parts of the code they go
through, so the stages add up to the forward they were measured in (unlike timing each stage alone, which puts a
stage's weights in cache and leaves out what running in sequence costs: ``lookwhere_profile.md`` measured 0.56 ms
of that on a 3.7 ms forward). The parts, found without a per-method list:

* every :class:`lwbench.method.Overhead` submodule's ``forward`` (selectors, scorers, matchers: what
  ``lwbench flops`` books as overhead), labelled by its class, and a matcher's ``match`` when it has one;
* ``lwbench.vit``'s seam (``embed_patches``, ``assemble``, ``run_tokens``, ``run_blocks``) and the shared steps of
  ``methods/_reduction.py`` (``attention_step``, ``mlp_residual``, ``biased_block``, ...), wherever a method's
  module calls them;
* the backbone's blocks as timm runs them: each block's ``attn`` and ``mlp`` and the block's own rest (norms,
  LayerScale, residual adds), and the patch embedding, final norm and the task head.

Each part's time is **exclusive** (a part called inside another counts once, in the inner one), so the rows sum to
the forward; what no part covers is the method's own code between them (``other``). Times are per forward, the
median over ``--repeats`` forwards after a warm-up; the instrumentation costs a few microseconds per call (it is
there in both models). MACs per part come from one forward under ``torch.utils.flop_counter`` (the counter of
``lwbench flops --counter torch``), read at each part's entry and exit, so each part's GMAC/s shows which runs
short of ``full``'s rate. The batch-1 speed-up divided by the GMAC ratio is exactly the method's MAC rate over
``full``'s: the rows say where it is lost.

CPU: perf_counter around each call (calls are synchronous). CUDA: the same with a synchronize before each read, so
the stages are right and the whole forward is slower than unprofiled (launch overlap is lost): read shares there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate

SEAM = ("embed_patches", "assemble", "run_tokens", "run_blocks")
REDUCTION_STEPS = ("attention_step", "attention_residual", "mlp_residual", "biased_block", "cls_attention",
                   "start_tokens", "gather_tokens", "cells_per_token", "size_bias", "rope_of")


class StageClock:
    """Exclusive wall time and MACs per labelled part of a forward. Parts nest: a stack of open parts, each
    charged its own time minus its children's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.macs: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [label, start, child seconds, start MACs, child MACs]
        self.counter = None
        self.tokens: list[int] = []  # tokens of each timm block call, in order
        self.restore: list[Callable[[], None]] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _flops(self) -> int:
        return int(self.counter.get_total_flops()) // 2 if self.counter is not None else 0

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time ``owner.name`` (a function of a module, or a bound method set on an instance) as ``label``."""
        fn = getattr(owner, name)
        if getattr(fn, "_stage_label", None):
            return  # already wrapped (a function two modules import)
        clock = self

        def timed(*args, **kwargs):
            clock.stack.append([label, clock._now(), 0.0, clock._flops(), 0])
            try:
                return fn(*args, **kwargs)
            finally:
                lab, t0, child_s, m0, child_m = clock.stack.pop()
                dt, dm = clock._now() - t0, clock._flops() - m0
                clock.seconds[lab] += dt - child_s
                clock.macs[lab] += dm - child_m
                clock.calls[lab] += 1
                if clock.stack:
                    clock.stack[-1][2] += dt
                    clock.stack[-1][4] += dm

        timed._stage_label = label
        had = name in vars(owner) if not isinstance(owner, type) else name in owner.__dict__
        setattr(owner, name, timed)
        self.restore.append((lambda: setattr(owner, name, fn)) if had else (lambda: delattr(owner, name)))

    def record_tokens(self, blk: torch.nn.Module) -> None:
        """Note the token count of every call of ``blk`` (a forward pre-hook), for the matrix-product ceiling."""
        handle = blk.register_forward_pre_hook(lambda mod, args: self.tokens.append(int(args[0].shape[1])))
        self.restore.append(handle.remove)

    def reset(self) -> None:
        self.tokens = []
        self.seconds.clear()
        self.macs.clear()
        self.calls.clear()

    def unwrap(self) -> None:
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()


def instrument(clock: StageClock, model: torch.nn.Module, modules: list[Any]) -> None:
    """Wrap the parts of ``model`` (a ``TaskModel``) listed in the module docstring. ``modules``: the Python modules
    whose global names the forward calls (the method's own module, ``lwbench.vit``, ``methods._reduction``)."""
    from lwbench.method import Overhead

    clock.wrap(model, "forward", "other: the method's own code")
    clock.wrap(model.encoder, "forward", "other: the method's own code")
    clock.wrap(model.head, "forward", "task head")
    for mod in modules:
        for name in SEAM + REDUCTION_STEPS:
            if callable(getattr(mod, name, None)):
                clock.wrap(mod, name, f"{name}" if name not in SEAM else f"seam: {name}")
    for sub in model.encoder.modules():
        if isinstance(sub, Overhead):
            label = f"overhead: {type(sub).__name__}"
            clock.wrap(sub, "forward", label)
            if callable(getattr(sub, "match", None)):
                clock.wrap(sub, "match", f"{label}.match")
            if callable(getattr(sub, "where_map", None)):
                clock.wrap(sub, "where_map", f"{label}.where_map")
    for sub in model.encoder.modules():
        if hasattr(sub, "blocks") and hasattr(sub, "patch_embed"):  # a backbone (the extractor's, a selector's)
            role = "selector ViT" if any(isinstance(o, Overhead) and sub in set(o.modules())
                                         for o in model.encoder.modules()) else "blocks"
            clock.wrap(sub.patch_embed, "forward", f"{role}: patch embedding")
            if callable(getattr(sub, "norm", None)):
                clock.wrap(sub.norm, "forward", f"{role}: final norm")
            for blk in sub.blocks:
                clock.record_tokens(blk)
                clock.wrap(blk, "forward", f"{role}: block rest (norms, LayerScale, residuals)")
                clock.wrap(blk.attn, "forward", f"{role}: attention")
                clock.wrap(blk.mlp, "forward", f"{role}: MLP")


def profile(model: torch.nn.Module, x: torch.Tensor, modules: list[Any], repeats: int, warmup: int,
            device: torch.device) -> dict[str, Any]:
    """Per-part exclusive ms (median over ``repeats`` forwards), MACs, and the whole forward's ms."""
    from torch.utils.flop_counter import FlopCounterMode

    from lwbench.measure.flops import _sdpa_formulas

    clock = StageClock(device)
    instrument(clock, model, modules)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            per: dict[str, list[float]] = defaultdict(list)
            whole = []
            for _ in range(repeats):
                clock.reset()
                t0 = clock._now()
                model(x)
                whole.append(clock._now() - t0)
                for k, v in clock.seconds.items():
                    per[k].append(v)
            calls = dict(clock.calls)
            tokens = list(clock.tokens) or tokens_of_reduction(model, x)
            clock.reset()
            clock.counter = FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())
            with clock.counter:
                model(x)
            macs = dict(clock.macs)
    finally:
        clock.unwrap()
    stages = [{"stage": k, "ms": 1e3 * statistics.median(v), "mmacs": macs.get(k, 0) / 1e6,
               "calls": calls.get(k, 0)} for k, v in per.items()]
    for s in stages:
        s["gmacs_per_s"] = s["mmacs"] / s["ms"] if s["ms"] > 0 else 0.0
    stages.sort(key=lambda s: -s["ms"])
    total_macs = sum(macs.values())
    return {"stages": stages, "ms": 1e3 * statistics.median(whole), "mmacs": total_macs / 1e6, "tokens": tokens}


def tokens_of_reduction(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens entering each block of a method that runs its blocks through ``methods/_reduction.py`` (no timm block
    call to count): the output's ``tokens_per_layer`` is what each block *leaves*, so block ``i`` sees layer
    ``i - 1``'s count (the first sees every patch), plus the prefix."""
    from lwbench.vit import grid_of, num_prefix

    out = model.encoder(x)
    per = out.aux.get("tokens_per_layer") if hasattr(out, "aux") else None
    vit = model.encoder.vit
    if per is None:
        return []
    gh, gw = grid_of(vit, x)
    counts = [gh * gw, *[int(round(float(v))) for v in per.float().mean(0).tolist()[:-1]]]
    return [c + num_prefix(vit) for c in counts]


def linear_ceiling(blk: torch.nn.Module, tokens: list[int], full_tokens: list[int], min_run_time: float) -> dict:
    """What the matrix products alone allow: one block's four linear layers (qkv, proj, fc1, fc2), called back to
    back at each block's token count, for the method and for ``full``. Their time ratio over their MAC ratio is
    the conversion an implementation with no other cost would reach with these kernels on this machine."""
    from torch.utils import benchmark

    d = blk.attn.qkv.in_features
    hidden = blk.mlp.fc1.out_features
    macs_per_token = d * (3 * d) + d * d + d * hidden + hidden * d
    times: dict[int, float] = {}

    def ms_at(t: int) -> float:
        if t not in times:
            x, h = torch.randn(1, t, d), torch.randn(1, t, hidden)
            layers = [(blk.attn.qkv, x), (blk.attn.proj, x), (blk.mlp.fc1, x), (blk.mlp.fc2, h)]

            def run():
                for lin, inp in layers:
                    lin(inp)

            timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
            with torch.inference_mode():
                times[t] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        return times[t]

    m_ms, f_ms = sum(ms_at(t) for t in tokens), sum(ms_at(t) for t in full_tokens)
    m_macs, f_macs = macs_per_token * sum(tokens), macs_per_token * sum(full_tokens)
    return {"method_ms": m_ms, "full_ms": f_ms, "method_gmacs_per_s": m_macs / m_ms / 1e6,
            "full_gmacs_per_s": f_macs / f_ms / 1e6, "ceiling_conversion": (f_ms / m_ms) / (f_macs / m_macs)}


def table(name: str, prof: dict[str, Any]) -> str:
    rows = [[s["stage"], s["calls"], f"{s['ms']:.2f}", f"{s['mmacs']:.1f}", f"{s['gmacs_per_s']:.1f}",
             f"{100 * s['ms'] / prof['ms']:.1f}%"] for s in prof["stages"]]
    parts = sum(s["ms"] for s in prof["stages"])
    rows.append(["(sum of the parts)", "", f"{parts:.2f}", "", "", f"{100 * parts / prof['ms']:.1f}%"])
    rows.append([f"**{name}: whole forward**", "", f"{prof['ms']:.2f}", f"{prof['mmacs']:.1f}",
                 f"{prof['mmacs'] / prof['ms']:.1f}", "100%"])
    return tabulate(rows, headers=["part (exclusive)", "calls", "ms", "MMACs", "GMAC/s", "share"], tablefmt="github")


def summarise(tokens: list[int]) -> str:
    """``[126, 126, 126, 133, ...]`` -> ``126 x3, 133 x12`` (runs of equal counts)."""
    runs: list[list[int]] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return ", ".join(f"{t} x{n}" if n > 1 else str(t) for t, n in runs)


def main(argv=None) -> int:
    import importlib

    import lwbench.vit
    from lwbench.models import build_model
    from lwbench.registry import get_method
    from lwbench.sizes import as_hw

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--budget", help="e.g. k=128, r=57 (default: the method's default at this geometry)")
    ap.add_argument("--backbone", default="vit_base_patch14_reg4_dinov2")
    ap.add_argument("--img-size", default="518")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write both profiles here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hw = as_hw(args.img_size)
    built = build_model(args.method, args.backbone, hw, args.budget, seed=0)
    full = build_model("full", args.backbone, hw, None, seed=0)
    cls = get_method(args.method)
    importlib.import_module(cls.__module__)
    # the modules whose global names a method's forward calls: its package's (a method may span files) and the seam
    package = cls.__module__.rsplit(".", 1)[0] if cls.__module__.count(".") > 2 else cls.__module__
    mods = [lwbench.vit, *(mod for name, mod in sorted(sys.modules.items())
                           if mod is not None and (name == package or name.startswith(package + ".")
                                                   or name == "lwbench.methods._reduction"))]
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)).to(device)
    m, f = built.model.to(device), full.model.to(device)
    # interleaved, so both see the same machine: method, full, method, full
    runs = {"method": [], "full": []}
    for _ in range(2):
        runs["method"].append(profile(m, x, mods, args.repeats, args.warmup, device))
        runs["full"].append(profile(f, x, [lwbench.vit], args.repeats, args.warmup, device))
    pm = min(runs["method"], key=lambda p: p["ms"])
    pf = min(runs["full"], key=lambda p: p["ms"])
    budget = built.method.budget
    head = (f"# {args.method} {cls.budget_key}={budget} vs full on {args.backbone} at {hw[0]}x{hw[1]}, batch 1, "
            f"{args.threads} threads, {device.type}, float32, torch {torch.__version__}")
    ratio_g, ratio_t = pf["mmacs"] / pm["mmacs"], pf["ms"] / pm["ms"]
    print(head)
    print()
    print(table(args.method, pm))
    print()
    print(table("full", pf))
    print()
    print(f"GMAC ratio {ratio_g:.2f}x, profiled time ratio {ratio_t:.2f}x, conversion {ratio_t / ratio_g:.2f} "
          f"(the faster of two interleaved profiles of each; the paired timing of lwbench speed is the number to "
          f"quote, this one says where the time goes)")
    ceiling = {}
    if pm["tokens"] and pf["tokens"]:
        blk = f.encoder.vit.blocks[0]
        ceiling = linear_ceiling(blk, pm["tokens"], pf["tokens"], min_run_time=0.5)
        print(f"matrix products alone (a block's 4 linear layers at each block's token count; method blocks "
              f"{summarise(pm['tokens'])}, full {summarise(pf['tokens'])}): {ceiling['method_gmacs_per_s']:.1f} vs "
              f"{ceiling['full_gmacs_per_s']:.1f} GMAC/s, ceiling conversion {ceiling['ceiling_conversion']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": head, "method": pm, "full": pf, "gmac_ratio": ratio_g, "time_ratio": ratio_t,
                       "linear_ceiling": ceiling, "argv": sys.argv[1:]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
