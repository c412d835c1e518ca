"""``lwbench speed``: a speed reference at realistic geometry, timed with the paired protocol of ``lwbench run``.

A grid of backbones x image sizes x methods x budget requests. Each point is one method at one budget around a
backbone on random weights (:func:`lwbench.models.build_model`, the model ``lwbench flops`` counts), and each is
measured by the one measurement contract (:func:`lwbench.measure.contract.measure`): GMACs by the counter and the
refusal rule of ``lwbench flops`` and ``lwbench run``, then, in one fresh worker process, the method timed against
``full`` on the same random backbone (:func:`lwbench.measure.paired.measure_paired`: alternating blocks in random
order, the median of the rounds' ratios with a 95% bootstrap interval, quiet-round accounting) at batch 1 and at
every other batch of the grid, and the attention kernel that actually ran. ``conversion`` = speed-up / GMAC ratio.

Nothing here times anything itself. Weights are random and images seeded noise: methods that train (LookWhere,
DynamicViT, DPS, IPS, ...) are timed untrained, since their speed does not depend on the values of their weights;
content-adaptive methods (``variable_length``: ATS, ALGM) keep as many tokens as random weights make them keep.

Budget requests: ``default`` (each method's default budget for the backbone and size, ``Method.default_budget``)
and ``matched[:RATIO]`` (the budget whose GMACs come closest to RATIO x ``full``'s: the method's budget grid,
default and no-op budget, then a search between the two of them that bracket the target; the achieved fraction is
in the row, ``gmac_fraction``). A method that cannot run at a geometry (its family, a budget out of range, a count
the counters disagree on) is a ``refused`` row with its one-line reason; the grid goes on.

Writes ``OUT/speed.csv`` (one row per point and batch, :data:`COLUMNS`), ``OUT/table.md`` and
``OUT/conversion.png``. Points already in ``speed.csv`` for this machine, commit, threads, device and dtype are
skipped unless ``force``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import functools
import io
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lwbench.config import MeasureConfig
from lwbench.errors import BudgetError, ConfigError, LwbenchError, UnknownNameError
from lwbench.logs import log
from lwbench.options import build, option

REFERENCE = "full"
DEFAULT_BACKBONES = ("vit_small_patch14_dinov2", "vit_base_patch14_reg4_dinov2")
# 224 and 518 (DINOv2's sizes), and the paper profile's 4:3 traffic-sign frames (configs/profiles/paper.yaml).
DEFAULT_IMG_SIZES = ((224, 224), (518, 518), (504, 672))
DEFAULT_BATCHES = (1, 32)
DEFAULT_MATCH_RATIO = 0.5
CSV_NAME, TABLE_NAME, PLOT_NAME = "speed.csv", "table.md", "conversion.png"

#: The columns of ``speed.csv``, in order. ``gmac_ratio`` is full's GMACs over the method's (x fewer MACs, as in
#: result rows); ``gmac_fraction`` its inverse (what ``matched:RATIO`` aims at). ``ms`` and ``reference_ms`` are
#: milliseconds per call of the whole batch. ``machine``, ``commit``, ``threads``, ``device`` and ``dtype`` say
#: where a row was timed: a rerun skips the points that have rows there.
COLUMNS = (
    "backbone", "img_size", "method", "budget_request", "budget", "weights", "inputs", "status", "reason", "training",
    "gmacs", "reference_gmacs", "gmac_ratio", "gmac_fraction", "tokens",
    "batch", "speedup", "ci_low", "ci_high", "reliable", "contended", "rounds", "quiet_rounds", "conversion",
    "ms", "reference_ms", "kernel", "reference_kernel",
    "threads", "device", "device_name", "dtype", "compile", "torch_version", "machine", "commit", "git_dirty",
    "other_load", "isolated", "point_seconds", "timed_at",
)
IDENTITY = ("machine", "commit", "threads", "device", "dtype", "compile", "inputs")
POINT_KEY = ("backbone", "img_size", "method", "budget_request", "weights")

# The duration rule of the estimate when no row of this machine says better: GMAC/s of a ViT forward per CPU thread
# (benchmarks/results/lookwhere_profile.md: 38-76 GMAC/s on 2 threads for the linear layers alone), and of one GPU
# in float32; seconds a call costs whatever its size; seconds a point costs besides its forwards (the worker's start
# and imports, pickling the two models, building them).
RULE_GMACS_PER_S = {"cpu": 25.0, "cuda": 15000.0}
RULE_CALL_S = {"cpu": 0.002, "cuda": 0.006}
RULE_POINT_S = 10.0


def _speed_measure() -> MeasureConfig:
    return MeasureConfig(flops_images=1)  # one random image, as `lwbench flops` counts


@dataclass(frozen=True)
class SpeedConfig:
    """The grid of ``lwbench speed`` and how it is timed. Build it with :func:`speed_config`."""

    methods: tuple[str, ...] = option((), "methods (empty: every registered method; full is the reference)")
    backbones: tuple[str, ...] = option(DEFAULT_BACKBONES, "timm ViT names, random weights")
    img_sizes: tuple[tuple[int, int], ...] = option(DEFAULT_IMG_SIZES, "(H, W) sizes")
    batches: tuple[int, ...] = option(DEFAULT_BATCHES, "batch sizes timed paired (batch 1 always is)", min=1)
    budgets: tuple[str, ...] = option(("default",), "budget requests: default | matched[:RATIO]")
    threads: int | None = option(None, "torch intra-op threads (null: all cores)", min=1)
    device: str = option("auto", "cpu | cuda | auto", choices=("auto", "cpu", "cuda"))
    measure: MeasureConfig = option(default_factory=_speed_measure)
    method_opts: dict[str, dict] = option(default_factory=dict, help="options per method: {method: {key: value}}")
    images: int = option(4, "seeded random images batch 1 cycles through (bigger batches repeat them)", min=1)
    seed: int = option(0, "seed of the random weights and images", min=0)
    weights: dict[str, str] = option(default_factory=dict, help="local weights per backbone, {backbone: file} "
                                     "(safetensors or a torch state dict); the others random")
    photos: str = option("", "a folder of images that batch 1 cycles through, resized to each size and normalised "
                             "(empty: seeded random images)")


def speed_config(values: dict[str, Any] | None = None) -> SpeedConfig:
    """A checked :class:`SpeedConfig` from ``values`` on top of the defaults (the timing section included, whose
    ``flops_images`` defaults to 1 here); budget requests and methods are checked too."""
    cfg = build(SpeedConfig, values or {}, where="speed", base=SpeedConfig())
    for text in cfg.budgets:
        parse_request(text)
    if not cfg.backbones or not cfg.img_sizes:
        raise ConfigError("lwbench speed: give at least one backbone and one image size")
    for backbone, path in cfg.weights.items():
        if backbone not in cfg.backbones:
            raise ConfigError(f"lwbench speed: weights for {backbone}, which is not among the backbones "
                              f"({', '.join(cfg.backbones)})")
        if not Path(path).is_file():
            raise ConfigError(f"lwbench speed: weights file not found: {path}")
    if cfg.photos:
        photo_files(cfg.photos)
    return cfg


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def photo_files(folder: str) -> list[Path]:
    """The images of ``folder`` (sorted by name), or one ConfigError line."""
    root = Path(folder)
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES) if root.is_dir() else []
    if not files:
        raise ConfigError(f"lwbench speed: no images ({', '.join(PHOTO_SUFFIXES)}) in {folder}")
    return files


def weights_label(cfg: SpeedConfig, backbone: str) -> str:
    """What a row's ``weights`` column says: the file's name, or ``random``."""
    path = cfg.weights.get(backbone)
    return Path(path).name if path else "random"


def inputs_label(cfg: SpeedConfig) -> str:
    """What a row's ``inputs`` column says: ``photos:<folder name>:<count>`` or ``random:<count>``."""
    if cfg.photos:
        return f"photos:{Path(cfg.photos).name}:{len(photo_files(cfg.photos))}"
    return f"random:{cfg.images}"


def load_inputs(cfg: SpeedConfig, sizes: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    """The images timed at each size: the photos, resized (bilinear) and normalised with the ImageNet mean and std
    as lwbench's tasks do, or seeded noise (one generator for all sizes, drawn in order)."""
    import torch

    if not cfg.photos:
        gen = torch.Generator().manual_seed(cfg.seed)
        return {hw: torch.randn(cfg.images, 3, *hw, generator=gen) for hw in sizes}
    from lwbench.task import IMAGENET_MEAN, IMAGENET_STD
    from lwbench.tasks._imageio import read_image, to_tensor

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return {hw: torch.stack([(to_tensor(read_image(f, hw)) - mean) / std for f in photo_files(cfg.photos)])
            for hw in sizes}


def parse_request(text: str) -> tuple[str, float | None]:
    """``"default"`` -> ``("default", None)``; ``"matched"`` / ``"matched:0.25"`` -> ``("matched", 0.25)``."""
    mode, _, ratio = str(text).strip().partition(":")
    if mode == "default" and not ratio:
        return "default", None
    if mode == "matched":
        try:
            r = float(ratio) if ratio else DEFAULT_MATCH_RATIO
        except ValueError:
            r = math.nan
        if not (0 < r <= 1):
            raise ConfigError(f"--budgets {text}: RATIO must be a number in (0, 1], the fraction of full's GMACs "
                              f"to match (e.g. matched:0.5)")
        return "matched", r
    raise ConfigError(f"--budgets {text}: use default or matched[:RATIO] (e.g. matched:0.5)")


def method_names(cfg: SpeedConfig) -> list[str]:
    """The grid's methods: the configured ones (checked, in their order) or every registered method."""
    from lwbench.registry import METHODS

    if not cfg.methods:
        return METHODS.names()
    for name in cfg.methods:
        METHODS.get(name)  # a typo fails here, with suggestions
    return list(dict.fromkeys(cfg.methods))


# -- the grid ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One method at one budget request on one backbone and size. ``budget`` is the method's budget as it writes it
    (``k=64``; ``-`` without a knob), or the request until a matched budget is resolved; ``refusal`` is the one-line
    reason the method cannot run here ("" when it can)."""

    backbone: str
    hw: tuple[int, int]
    method: str
    request: str
    budget: str
    refusal: str = ""
    weights: str = "random"  # the backbone's weights file name, or random

    @property
    def size(self) -> str:
        return f"{self.hw[0]}x{self.hw[1]}"

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.backbone, self.size, self.method, self.request, self.weights)

    def label(self) -> str:
        return f"{self.backbone} {self.size} {self.method} {self.budget}"


@functools.lru_cache(maxsize=64)
def _spec(backbone: str, hw: tuple[int, int]) -> Any:
    """:func:`lwbench.backbones.spec_of`, once per backbone and size (a meta-device model each time otherwise)."""
    from lwbench.backbones import spec_of

    return spec_of(backbone, hw)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LwbenchError) else f"{type(exc).__name__}: {text}"


def _instance(cls: type, spec: Any, value: Any, opts: dict[str, Any]) -> Any:
    """The method at ``value`` on ``spec``: its constructor checks the family and the budget, and only checks."""
    return cls(spec, value, **opts)


def plan(cfg: SpeedConfig) -> list[Point]:
    """Every point of the grid, backbone by backbone, size by size, method by method, request by request; a method
    without a budget knob once per geometry. Backbones are built on the meta device only (no weights), so planning,
    refusals included, costs no ViT. An unknown backbone or method is an error; a size a backbone cannot take refuses
    every point of it."""
    from lwbench.registry import get_method

    methods = method_names(cfg)
    requests = [(text, *parse_request(text)) for text in cfg.budgets]
    points: list[Point] = []
    for backbone in cfg.backbones:
        weights = weights_label(cfg, backbone)
        for hw in cfg.img_sizes:
            hw = (int(hw[0]), int(hw[1]))
            try:
                spec, geometry = _spec(backbone, hw), ""
            except UnknownNameError:
                raise
            except LwbenchError as exc:
                spec, geometry = None, _one_line(exc)
            for name in methods:
                cls = get_method(name)
                for text, mode, _ in requests if cls.budget_key else requests[:1]:
                    if spec is None:
                        points.append(Point(backbone, hw, name, text, text if cls.budget_key else "-", geometry,
                                            weights))
                        continue
                    budget = text if cls.budget_key else "-"
                    try:
                        value = cls.default_budget(spec) if cls.budget_key else None
                        if mode == "default" and value is not None:
                            budget = f"{cls.budget_key}={value:g}"
                        inst = _instance(cls, spec, value, cfg.method_opts.get(name, {}))
                        budget = inst.budget_str() if mode == "default" or not cls.budget_key else text
                        points.append(Point(backbone, hw, name, text, budget, weights=weights))
                    except LwbenchError as exc:
                        points.append(Point(backbone, hw, name, text, budget, _one_line(exc), weights))
    return points


# -- matched budgets -----------------------------------------------------------------------------------------
def match_budget(cls: type, spec: Any, target: float, gmacs_at: Callable[[Any], float],
                 opts: dict[str, Any] | None = None, max_counts: int = 12) -> tuple[Any, float]:
    """``(budget, gmacs)``: the budget of ``cls`` on ``spec`` whose GMACs (``gmacs_at(budget)``) come closest to
    ``target``. Candidates: the method's budget grid, its default and its no-op budget (the plain backbone); past
    the most reducing of them while all cost more than the target (halving or doubling the budget, within the range
    the method accepts); then, between the two neighbouring candidates whose GMACs bracket the target, a search that
    interpolates (GMACs are nearly linear in k, r and keep rates) inside the middle three quarters of the bracket,
    until no budget lies between them (whole-number budgets), they are 0.001 apart, the GMACs are within 0.2%, or
    ``max_counts`` more counts were made. A method without a knob has its one setting. Raises
    :class:`BudgetError` when no candidate is valid here."""
    opts = opts or {}
    if cls.budget_key is None:
        return None, gmacs_at(None)

    def valid(v: Any) -> bool:
        try:
            _instance(cls, spec, v, opts)
        except BudgetError:
            return False
        return True

    seen: dict[Any, float] = {}
    candidates = {cls.default_budget(spec), cls.noop_budget(spec), *cls.budget_grid(spec)} - {None}
    for v in sorted(candidates):
        v = cls.budget_type(v)
        if v not in seen and valid(v):
            seen[v] = gmacs_at(v)
    if not seen:
        raise BudgetError(f"{cls.name}: none of its budgets {sorted(candidates)} is valid for {spec.name} at "
                          f"{spec.img_size[0]}x{spec.img_size[1]}")
    def extend() -> bool:
        """A budget past the most reducing candidate, when every candidate costs more than the target: half of it
        when reducing lowers the budget (k, keep_rate), twice when it raises it (r), nearer when that one is out of
        the method's range."""
        end = min(seen, key=lambda v: seen[v])
        lower = end == min(seen)
        far = end / 2 if lower else end * 2
        for _ in range(6):
            if cls.budget_type is int:
                v = math.floor(far) if lower else math.ceil(far)
            else:
                v = round(far, 3)
            if v != end and v not in seen and valid(v):
                seen[v] = gmacs_at(v)
                return True
            far = (end + far) / 2
        return False

    for _ in range(max_counts):
        if min(abs(g - target) for g in seen.values()) <= 0.002 * target:
            break
        vs = sorted(seen)
        bracket = next(((a, b) for a, b in itertools.pairwise(vs) if (seen[a] - target) * (seen[b] - target) < 0),
                       None)
        if bracket is None:
            if min(seen.values()) > target and extend():
                continue
            break
        a, b = bracket
        guess = a + (target - seen[a]) * (b - a) / (seen[b] - seen[a])
        quarter = (b - a) / 8
        v = min(max(guess, a + quarter), b - quarter)
        v = int(round(v)) if cls.budget_type is int else round(v, 3)
        if not (a < v < b) or not valid(v):
            break
        seen[v] = gmacs_at(v)
    best = min(seen, key=lambda v: (abs(seen[v] - target), v))
    return best, seen[best]


# -- where the rows were timed, and what is done ------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``speed.csv`` (strings; missing columns empty); none when there is no file."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{c: (r.get(c) or "") for c in COLUMNS} for r in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``speed.csv`` written whole, atomically (a reader sees the old or the new file)."""
    from lwbench.paths import write_text_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) for c in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buf.getvalue())


def _identity_of(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_fmt(row.get(c)) for c in IDENTITY)


def done_keys(rows: list[dict[str, str]], identity: tuple[str, ...], batches: tuple[int, ...]) -> set[tuple]:
    """Point keys with rows of this ``identity`` that need no timing: refused, or timed (or out of memory) at every
    one of ``batches``. A point that failed, or lacks a batch, is timed again."""
    got: dict[tuple, set[int]] = {}
    refused: set[tuple] = set()
    for r in rows:
        if _identity_of(r) != identity:
            continue
        key = tuple(r[c] for c in POINT_KEY)
        if r["status"] == "refused":
            refused.add(key)
        elif r["status"] in ("ok", "out of memory") and r["batch"]:
            got.setdefault(key, set()).add(int(float(r["batch"])))
    return refused | {k for k, bs in got.items() if set(batches) <= bs}


# -- the estimate ------------------------------------------------------------------------------------------
def _full_gmacs(spec: Any) -> float:
    """The plain backbone's closed-form GMACs from its spec (MLP ratio 4; for the estimate only)."""
    from lwbench.measure.flops import closed_form_vit_macs

    m = spec.num_patches
    return closed_form_vit_macs(spec.depth, spec.embed_dim, 4 * spec.embed_dim, m + spec.num_prefix, m,
                                spec.patch) / 1e9


def measured_rate(rows: list[dict[str, str]], device: str, threads: int) -> float | None:
    """GMAC/s of ``full`` as the rows of this device and thread count timed it (the median over rows), or None."""
    rates = []
    for r in rows:
        if r["status"] != "ok" or r["device"] != device or r["threads"] != str(threads):
            continue
        g, b, ms = _num(r["reference_gmacs"]), _num(r["batch"]), _num(r["reference_ms"])
        call = ms / 1e3 - RULE_CALL_S[device]
        if g > 0 and b > 0 and call > 0:
            rates.append(g * b / call)
    return statistics.median(rates) if rates else None


def pair_seconds(t_model: float, t_ref: float, m: MeasureConfig) -> float:
    """Seconds one paired timing takes by :func:`lwbench.measure.paired.time_paired`'s rule when its interval is
    narrow at once: the warm-up rounds, then ``min_runs`` rounds (or ``2 * min_run_time`` seconds) of blocks of
    ``min_run_time / min_runs`` seconds of the slower model."""
    both = t_model + t_ref
    k_calls = max(1, round(m.min_run_time / max(1, m.min_runs) / max(t_model, t_ref, 1e-9)))
    rounds = max(max(2, m.min_runs), math.ceil(2 * m.min_run_time / (k_calls * both)))
    rounds += rounds % 2  # whole ABBA pairs
    return max(2, m.warmup) * both + rounds * k_calls * both


@dataclass(frozen=True)
class Estimate:
    seconds: float
    rule: str


def estimate(points: list[Point], cfg: SpeedConfig, device: str, threads: int, rate: float | None = None) -> Estimate:
    """Rough seconds to time ``points`` (within 2x on a quiet machine): per call ``RULE_CALL_S`` + GMACs / rate (the
    rate measured by earlier rows of this machine when given, else :data:`RULE_GMACS_PER_S`), a method at half of
    full's GMACs (at RATIO of them when matched), each batch's pair by :func:`pair_seconds`, plus counting (about 6
    forwards of each model), the memory pass, the kernel probe and :data:`RULE_POINT_S`; matched budgets add about 8
    counts. A busy machine adds up to ``measure.max_run_time`` per pair."""
    measured = rate is not None
    rate = rate if measured else RULE_GMACS_PER_S[device] * (threads if device == "cpu" else 1)
    m = cfg.measure
    batches = _batches(cfg)
    total = 0.0
    for p in points:
        if p.refusal:
            continue
        full = _full_gmacs(_spec(p.backbone, p.hw))
        mode, ratio = parse_request(p.request)
        frac = 1.0 if p.method == REFERENCE else (ratio if mode == "matched" else 0.5)

        def call(gmacs: float, batch: int) -> float:
            return RULE_CALL_S[device] + gmacs * batch / rate

        t_ref1, t_m1 = call(full, 1), call(full * frac, 1)
        total += RULE_POINT_S + 6 * (t_ref1 + t_m1) + t_m1 * m.memory_batch + 2 * (t_ref1 + t_m1)
        if mode == "matched" and p.method != REFERENCE:
            total += 8 * (3 * t_m1 + 1.0)
        total += sum(pair_seconds(call(full * frac, b), call(full, b), m) for b in batches)
    source = "GMAC/s measured by earlier rows here" if measured else "rule"
    rule = (f"{source}: {rate:.0f} GMAC/s on {device}" + (f" with {threads} threads" if device == "cpu" else "")
            + ", methods at half of full's GMACs unless matched; a busy machine adds up to "
            f"{m.max_run_time:g} s per pair")
    return Estimate(total, rule)


def _batches(cfg: SpeedConfig) -> tuple[int, ...]:
    """The batches timed: 1 (the paired protocol's latency pass always runs) and the configured ones."""
    return tuple(sorted({1, *(int(b) for b in cfg.batches)}))


# -- one point -----------------------------------------------------------------------------------------------
@dataclass
class _Context:
    cfg: SpeedConfig
    device: str
    threads: int
    env: dict[str, Any]
    images: Any
    inputs: str = ""  # the rows' inputs column
    references: dict[tuple, tuple[Any, float]] = dataclasses.field(default_factory=dict)

    def reference(self, p: Point) -> tuple[Any, float]:
        """``full`` on this geometry's random backbone and its GMACs (the search's counter), built once."""
        from lwbench.models import build_model

        key = (p.backbone, p.hw)
        if key not in self.references:
            self.references.clear()  # one geometry at a time: a ViT-B at 518 px is not kept beside the next
            model = build_model(REFERENCE, p.backbone, p.hw, weights=self.cfg.weights.get(p.backbone),
                                seed=self.cfg.seed).model
            self.references[key] = (model, self.gmacs(model, p.hw))
        return self.references[key]

    def gmacs(self, model: Any, hw: tuple[int, int]) -> float:
        """GMACs of ``model`` by the reported counter over the images the measurement counts (no cross-check: the
        measurement itself checks the budget it settles on)."""
        from lwbench.measure.flops import mean_macs_over

        n = max(1, min(int(self.cfg.measure.flops_images), self.images[hw].shape[0]))
        return mean_macs_over(model, self.images[hw][:n], counter=self.cfg.measure.counter).gmacs


def _base_row(p: Point, ctx: _Context, cls: type) -> dict[str, Any]:
    env = ctx.env
    return {"backbone": p.backbone, "img_size": p.size, "method": p.method, "budget_request": p.request,
            "budget": p.budget, "weights": p.weights, "inputs": ctx.inputs,
            "training": cls.training if cls is not None else "", "threads": ctx.threads,
            "device": ctx.device, "device_name": env.get("device_name"), "dtype": ctx.cfg.measure.dtype,
            "compile": ctx.cfg.measure.compile,
            "torch_version": env.get("torch_version"), "machine": env.get("machine_id"),
            "commit": env.get("git_sha") or "", "git_dirty": env.get("git_dirty"),
            "timed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _resolve(p: Point, ctx: _Context, cls: type, say: Callable[[str], None]) -> tuple[str | None, Point]:
    """The budget string to build ``p`` at (None: no knob), and the point with its budget filled in."""
    mode, ratio = parse_request(p.request)
    if cls.budget_key is None:
        return None, dataclasses.replace(p, budget="-")
    if mode == "default":
        return p.budget, p
    from lwbench.models import build_model

    _, full = ctx.reference(p)
    opts = ctx.cfg.method_opts.get(p.method, {})
    say(f"matching its budget to {ratio:g} x full's {full:.4g} GMACs")

    def gmacs_at(v: Any) -> float:
        text = f"{cls.budget_key}={v:g}"
        return ctx.gmacs(build_model(p.method, p.backbone, p.hw, text, opts=opts, seed=ctx.cfg.seed,
                                     weights=ctx.cfg.weights.get(p.backbone)).model, p.hw)

    spec = _spec(p.backbone, p.hw)
    value, got = match_budget(cls, spec, ratio * full, gmacs_at, opts)
    budget = _instance(cls, spec, value, opts).budget_str()
    say(f"matched: {budget} at {got / full:.3g} x full's GMACs (asked {ratio:g})")
    return budget, dataclasses.replace(p, budget=budget)


def time_point(p: Point, ctx: _Context, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of one point: one per batch timed (:func:`lwbench.measure.contract.measure`, paired with ``full``),
    or one ``refused`` / ``failed`` row with its reason."""
    from lwbench.measure.contract import measure
    from lwbench.measure.paired import interval_is_reliable
    from lwbench.models import build_model
    from lwbench.registry import get_method

    cls = get_method(p.method)
    base = _base_row(p, ctx, cls)
    if p.refusal:
        return [{**base, "status": "refused", "reason": p.refusal}]
    t0 = time.perf_counter()
    try:
        text, p = _resolve(p, ctx, cls, say)
        base["budget"] = p.budget
        model = build_model(p.method, p.backbone, p.hw, text, opts=ctx.cfg.method_opts.get(p.method, {}),
                            seed=ctx.cfg.seed, weights=ctx.cfg.weights.get(p.backbone)).model
        reference = model if p.method == REFERENCE else ctx.reference(p)[0]
        batches = _batches(ctx.cfg)
        mcfg = dataclasses.replace(ctx.cfg.measure, paired=True, throughput_batch=max(batches),
                                   batches=tuple(b for b in batches if b not in (1, max(batches))))
        say(f"timing against {REFERENCE} at batch {', '.join(map(str, batches))}")
        m = measure(model, ctx.images[p.hw], mcfg, device=ctx.device, threads=ctx.threads,
                    what=f"{p.method} {p.budget}", reference=reference)
    except LwbenchError as exc:
        return [{**base, "status": "refused", "reason": _one_line(exc)}]
    except Exception as exc:  # one broken point must not stop the grid
        log.warning("%s: failed: %s", p.label(), _one_line(exc))
        return [{**base, "status": "failed", "reason": _one_line(exc)}]
    seconds = time.perf_counter() - t0
    common = {**base, "gmacs": m.gmacs, "reference_gmacs": m.reference_gmacs, "gmac_ratio": m.gmac_ratio,
              "gmac_fraction": m.gmacs / m.reference_gmacs if m.reference_gmacs > 0 else math.nan,
              "tokens": m.tokens_mean, "kernel": m.attention_kernel, "reference_kernel": m.reference_attention_kernel,
              "other_load": m.other_load, "isolated": m.measure_isolated, "point_seconds": seconds}
    entries = json.loads(m.timing_batches or "{}")  # batch 1: the latency pass, cycling through the images
    rows = []
    for b, e in sorted(entries.items(), key=lambda kv: int(kv[0])):
        if "error" in e:
            rows.append({**common, "batch": int(b), "status": str(e["error"]), "reason": str(e["error"])})
            continue
        lo, hi = float(e["ci_low"]), float(e["ci_high"])
        rows.append({**common, "batch": int(b), "status": "ok", "speedup": float(e["speedup"]), "ci_low": lo,
                     "ci_high": hi, "reliable": interval_is_reliable(lo, hi) and not e.get("contended", False),
                     "contended": bool(e.get("contended", False)), "rounds": e.get("rounds"),
                     "quiet_rounds": e.get("quiet_rounds"), "conversion": float(e["speedup"]) / m.gmac_ratio,
                     "ms": e.get("ms"), "reference_ms": e.get("reference_ms")})
    return rows


# -- the run ---------------------------------------------------------------------------------------------------
TRAINING_NOTE = ("every method runs on random weights and seeded random images: methods that train are timed "
                 "untrained (speed does not depend on the weights' values); content-adaptive methods keep as many "
                 "tokens as random weights make them keep")


def weights_note(cfg: SpeedConfig | None = None, rows: list[dict[str, str]] | None = None) -> str:
    """What the models ran on, from the config (a run) or the rows (a report): random weights and images unless
    ``--weights``/``--photos`` said otherwise."""
    weights = sorted({r.get("weights") or "random" for r in rows} - {"random"}) if rows is not None \
        else sorted(Path(p).name for p in (cfg.weights.values() if cfg else ()))
    inputs = sorted({r.get("inputs") or "" for r in rows} if rows is not None else {inputs_label(cfg)} if cfg else ())
    photos = [i for i in inputs if i.startswith("photos:")]
    if not weights and not photos:
        return TRAINING_NOTE
    on = (f"backbones with weights ({', '.join(weights)}) run on them, the others on random weights" if weights
          else "every backbone runs on random weights")
    data = (f"the images are real photos ({', '.join(p.split(':')[1] + ': ' + p.split(':')[2] for p in photos)})"
            if photos else "the images seeded noise")
    return (f"{on}, {data}: methods that train are timed untrained on them (speed does not depend on the weights' "
            "values); content-adaptive methods keep as many tokens as these weights and images make them keep")


@dataclass
class SpeedRun:
    """What :func:`run_speed` did (or, dry, would do)."""

    points: list[Point]
    todo: list[Point]
    done: list[Point]
    estimate: Estimate
    device: str
    threads: int
    files: list[Path] = dataclasses.field(default_factory=list)
    timed: int = 0


def _device_threads(cfg: SpeedConfig) -> tuple[str, int]:
    from lwbench.runner import resolve_device

    return resolve_device(cfg.device), int(cfg.threads or os.cpu_count() or 1)


def run_speed(cfg: SpeedConfig, out: str | os.PathLike[str], force: bool = False, dry_run: bool = False,
              command: str = "") -> SpeedRun:
    """Plan the grid, skip what ``out/speed.csv`` has for this machine, commit, threads, device and dtype (unless
    ``force``), time the rest point by point (progress and ETA on the ``lwbench`` log), and write ``speed.csv``
    after every point, then ``table.md`` and ``conversion.png``. ``dry_run``: plan and estimate only; nothing is
    built, counted, timed or written."""
    from lwbench.estimates import duration
    from lwbench.measure.env import environment

    out = Path(out)
    device, threads = _device_threads(cfg)
    env = environment(device, threads, cfg.measure.dtype)
    identity = _identity_of({"machine": env["machine_id"], "commit": env.get("git_sha") or "", "threads": threads,
                             "device": device, "dtype": cfg.measure.dtype, "compile": cfg.measure.compile,
                             "inputs": inputs_label(cfg)})
    points = plan(cfg)
    rows = read_rows(out / CSV_NAME)
    done_set = set() if force else done_keys(rows, identity, _batches(cfg))
    done = [p for p in points if p.key in done_set]
    todo = [p for p in points if p.key not in done_set]
    est = estimate(todo, cfg, device, threads, measured_rate(rows, device, threads))
    result = SpeedRun(points, todo, done, est, device, threads)
    if dry_run:
        return result
    log.info("speed: %d points (%d done, %d to time, %d refused), batches %s, %s with %d thread(s); %s; %s",
             len(points), len(done), len(todo), sum(1 for p in todo if p.refusal),
             ", ".join(map(str, _batches(cfg))), device, threads, duration(est.seconds), weights_note(cfg))
    images = load_inputs(cfg, list(dict.fromkeys(p.hw for p in todo)))
    ctx = _Context(cfg, device, threads, env, images, inputs_label(cfg))
    rate = measured_rate(rows, device, threads)
    planned = [estimate([p], cfg, device, threads, rate).seconds for p in todo]
    t0 = time.perf_counter()
    for j, p in enumerate(todo, 1):
        eta = ""
        if sum(planned[: j - 1]) > 0:  # what is left by the estimate, scaled by how the done points compared with it
            eta = f", eta {duration(sum(planned[j - 1:]) * (time.perf_counter() - t0) / sum(planned[: j - 1]))}"

        def say(stage: str, j: int = j, p: Point = p, eta: str = eta) -> None:
            log.info("speed [%d/%d%s] %s: %s", j, len(todo), eta, p.label(), stage)

        new = time_point(p, ctx, say)
        if new[0]["status"] == "refused":
            say(f"refused: {new[0]['reason']}")
        elif new[0]["status"] != "failed":
            result.timed += 1
        rows = [r for r in rows if not (_identity_of(r) == identity and tuple(r[c] for c in POINT_KEY) == p.key)]
        rows += [{c: _fmt(r.get(c)) for c in COLUMNS} for r in new]
        write_rows(out / CSV_NAME, rows)
    mine = [r for r in rows if _identity_of(r) == identity]
    result.files = write_reports(mine, out, command)
    return result


# -- outputs -------------------------------------------------------------------------------------------------
def _speed_cell(r: dict[str, str]) -> str:
    from lwbench.tables import speedup_cell

    return speedup_cell({"speedup": _num(r["speedup"]), "speedup_ci_low": _num(r["ci_low"]),
                         "speedup_ci_high": _num(r["ci_high"]), "speedup_reliable": r["reliable"] == "true"})


def _size_key(size: str) -> tuple[int, int]:
    h, _, w = size.partition("x")
    return int(h), int(w)


def table_md(rows: list[dict[str, str]], command: str = "") -> str:
    """``table.md``: one section per backbone and size, its timed points sorted by GMACs with the speed-up over
    ``full`` and its 95% interval and the conversion at every batch, then the points that did not run and why."""
    from tabulate import tabulate

    if not rows:
        return "# Speed reference\n\nNo rows.\n"
    first = rows[0]
    note = weights_note(rows=rows)
    dirty = " (uncommitted changes)" if first["git_dirty"] == "true" else ""
    lines = [
        "# Speed reference: speed-up over `full`, timed paired",
        "",
        f"{first['device']} ({first['device_name']}), {first['threads']} thread(s), {first['dtype']}, torch "
        f"{first['torch_version']}, commit {first['commit'][:10] or '?'}{dirty}, machine {first['machine']}"
        + (f"; `{command}`" if command else "") + ".",
        "",
        "GMACs: multiply-accumulates per image (fvcore with a fused-attention handle, the counter of `lwbench "
        "flops`), on the first image timed. Speed-up: full's time per call over the method's, the median over "
        "balanced pairs of rounds of paired blocks (ABBA) with its 95% bootstrap interval "
        "(`lwbench/measure/paired.py`); `(wide)`: the interval is "
        "wider than 1.25x or too few rounds were free of other load. Conversion = speed-up / GMAC ratio (x fewer "
        "GMACs than full). ms: per call of the whole batch, the method's / full's. " + note[0].upper()
        + note[1:] + ".",
    ]
    geometries = sorted({(r["backbone"], r["img_size"], r.get("weights") or "random") for r in rows},
                        key=lambda g: (g[0], _size_key(g[1]), g[2]))
    for backbone, size, weights in geometries:
        here = [r for r in rows if (r["backbone"], r["img_size"], r.get("weights") or "random")
                == (backbone, size, weights)]
        timed = [r for r in here if r["status"] in ("ok", "out of memory")]
        batches = sorted({int(float(r["batch"])) for r in timed})
        points: dict[tuple, dict[int, dict[str, str]]] = {}
        for r in timed:
            points.setdefault((r["method"], r["budget"], r["budget_request"]), {})[int(float(r["batch"]))] = r
        body = []
        for (method, budget, _), per in sorted(points.items(), key=lambda kv: (-_num(next(iter(kv[1].values()))
                                                                                        ["gmacs"]), kv[0])):
            any_r = next(iter(per.values()))
            row = [method, budget, f"{_num(any_r['gmacs']):.4g}", f"{100 * _num(any_r['gmac_fraction']):.1f}%",
                   f"{_num(any_r['gmac_ratio']):.2f}"]
            for b in batches:
                r = per.get(b)
                if r is None:
                    row += ["-", "-", "-"]
                elif r["status"] != "ok":
                    row += [r["status"], "-", "-"]
                else:
                    row += [_speed_cell(r), f"{_num(r['conversion']):.2f}",
                            f"{_num(r['ms']):.4g} / {_num(r['reference_ms']):.4g}"]
            row.append(any_r["kernel"])
            body.append(row)
        headers = ["method", "budget", "GMACs", "of full", "x fewer"]
        for b in batches:
            headers += [f"batch {b}: speed-up [95% CI]", "conv.", "ms"]
        headers.append("attention")
        lines += ["", f"## {backbone} at {size}" + (f", weights {weights}" if weights != "random" else ""), ""]
        if body:
            lines.append(tabulate(body, headers=headers, tablefmt="github", disable_numparse=True))
        not_run = sorted({(r["method"], r["budget"], r["status"], r["reason"]) for r in here
                          if r["status"] in ("refused", "failed")})
        if not_run:
            lines += ["", "Not timed here:"]
            lines += [f"- {m} {b}: {s}: {why}" for m, b, s, why in not_run]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The timed points as result-like rows for :func:`lwbench.plots.conversion_figure` (task ``speed reference``,
    source ``random``): batch 1 as the row's speed-up, other batches in ``timing_batches``, ``geometry`` to panel by."""
    from lwbench.method import parse_budget

    grouped: dict[tuple, dict[int, dict[str, str]]] = {}
    for r in rows:
        if r["status"] == "ok":
            grouped.setdefault((r["backbone"], r["img_size"], r["method"], r["budget"], r["budget_request"],
                                r.get("weights") or "random"), {})[int(float(r["batch"]))] = r
    out = []
    for (backbone, size, method, budget, _, weights), per in grouped.items():
        any_r = next(iter(per.values()))
        one = per.get(1, {})
        try:
            bv = parse_budget(budget)[1]
        except LwbenchError:
            bv = None
        others = {str(b): {"speedup": _num(r["speedup"]), "ci_low": _num(r["ci_low"]), "ci_high": _num(r["ci_high"]),
                           "reliable": r["reliable"] == "true"} for b, r in per.items() if b != 1}
        source = "real" if str(any_r.get("inputs") or "").startswith("photos:") else "random"
        out.append({"task": "speed reference", "source": source, "method": method, "budget": budget,
                    "budget_value": bv if bv is not None else math.nan, "backbone": backbone, "img_size": size,
                    "geometry": f"{backbone} {size}" + (f" ({weights})" if weights != "random" else ""),
                    "gmac_ratio": _num(any_r["gmac_ratio"]),
                    "speedup": _num(one.get("speedup")), "speedup_ci_low": _num(one.get("ci_low")),
                    "speedup_ci_high": _num(one.get("ci_high")),
                    "speedup_reliable": one.get("reliable") == "true" if one else None,
                    "timing_batches": json.dumps(others), "device": any_r["device"],
                    "device_name": any_r["device_name"], "threads": int(any_r["threads"]), "dtype": any_r["dtype"]})
    return out


def write_reports(rows: list[dict[str, str]], out: Path, command: str = "") -> list[Path]:
    """``table.md`` and, when a point was timed, ``conversion.png`` (:func:`lwbench.plots.conversion_figure`, one
    panel row per backbone and size); returns the files written, ``speed.csv`` first."""
    import warnings

    from lwbench.paths import write_text_atomic

    files = [out / CSV_NAME]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / TABLE_NAME, table_md(rows, command))
    files.append(out / TABLE_NAME)
    points = [r for r in plot_rows(rows) if r["method"] != REFERENCE]
    if points:
        import pandas as pd

        from lwbench.plots import conversion_figure, save_figure

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rows without a speed-up are in table.md already
            fig = conversion_figure(pd.DataFrame(points), "speed reference", panel_by="geometry")
        files.append(save_figure(fig, out / PLOT_NAME))
    return files


def format_plan(run: SpeedRun, cfg: SpeedConfig) -> str:
    """The dry run's listing: every point with its state, then the totals and the estimate."""
    from tabulate import tabulate

    from lwbench.estimates import duration

    done = {p.key for p in run.done}
    body = [[p.backbone, p.size, p.method, p.budget,
             "done" if p.key in done else (f"refused: {p.refusal}" if p.refusal else "to time")] for p in run.points]
    batches = _batches(cfg)
    timed = [p for p in run.todo if not p.refusal]
    refused = sum(1 for p in run.points if p.refusal)
    lines = [tabulate(body, headers=["backbone", "size", "method", "budget", "state"], disable_numparse=True), "",
             f"{len(run.points)} points: {len(timed)} to time, {len(run.done)} done, {refused} refused; batches "
             f"{', '.join(map(str, batches))}: {len(timed) * len(batches)} paired timings against "
             f"{REFERENCE} ({len(timed)} worker processes), {run.device} with {run.threads} thread(s)",
             f"estimate: {duration(run.estimate.seconds)} ({run.estimate.rule}; rough, within 2x)",
             f"note: {weights_note(cfg)}"]
    return "\n".join(lines)


__all__ = ["SpeedConfig", "speed_config", "parse_request", "plan", "Point", "match_budget", "run_speed", "SpeedRun",
           "estimate", "pair_seconds", "table_md", "plot_rows", "write_reports", "format_plan", "read_rows",
           "done_keys", "COLUMNS", "DEFAULT_BACKBONES", "DEFAULT_IMG_SIZES", "DEFAULT_BATCHES"]
