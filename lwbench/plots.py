"""Pareto plots (accuracy against cost for every method on one task, the frontier highlighted) and conversion plots
(each method's speed-up over `full`, timed paired, against its MAC reduction: how much of it becomes time).

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas instead of pyplot, so
plotting never switches the caller's backend or needs a display. A plot shows one data source
only: synthetic and real numbers answer different questions and are never drawn together.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lwbench.errors import ConfigError, LwbenchError, UnknownNameError
from lwbench.mixing import differences, regime_mismatch, side_labels
from lwbench.paths import temp_beside
from lwbench.schema import SOURCES
from lwbench.tables import (
    APPROXIMATE_MEM_KINDS,
    REFERENCE_METHOD,
    WIDE_RATIO,
    metric_label,
    speedup_is_wide,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

X_AXES = {
    "gmacs": "GMACs (multiply-accumulates, log scale)",
    "latency_ms": "latency, batch 1 (ms, log scale)",
    "throughput": "throughput (img/s, log scale)",
    "speedup": "speed-up over full, batch 1, timed paired (×, log scale)",
}
X_HIGHER_BETTER = {"gmacs": False, "latency_ms": False, "throughput": True, "speedup": True}
# The spread of a timing axis: the rows store the interquartile range's width (p75 - p25), not its ends.
X_IQR = {"latency_ms": "latency_iqr_ms", "throughput": "throughput_iqr"}
# The interval of a ratio axis: the rows store its ends.
X_INTERVAL = {"speedup": ("speedup_ci_low", "speedup_ci_high")}
# Axes whose values are timings (never averaged across devices, precisions or compile modes).
TIMED_X = ("latency_ms", "throughput", "speedup")
MEM_KINDS = {"cuda_allocated_growth": "CUDA: weights + allocated growth of one warm forward",
             "cuda_max_allocated": "CUDA max allocated (rows before 2026-12-06)",
             "cpu_peak_rss_delta": "CPU: weights + peak RSS growth, approximate (allocator-dependent)"}
# The PNG ``Software`` tag of every plot lwbench writes: how ``lwbench report`` tells its own plots from a user's
# file of the same name, which it must not replace.
PNG_SOFTWARE = "lwbench pareto_plot"

def filled_edge(marker: str, color: str) -> str:
    """Edge colour of a filled (not hollow) marker: white sets a filled shape off from its neighbours, but a mathtext
    glyph (``"$\\boxplus$"``) is drawn as the outline of its strokes, so a white edge would whiten the thin glyph
    and make it read as hollow: glyphs get their own colour."""
    return color if str(marker).startswith("$") else "white"


def method_style(method: str) -> tuple[str, str]:
    """``(colour, marker)`` of ``method`` in every lwbench figure: its class's ``plot_style`` (a built-in method's
    own ``style``; a plugin's, by default, a pick from the colours and markers no built-in uses, by its name), so
    adding a method to the results never re-colours the others. A name the registry does not know (a plugin not
    loaded in this process) gets the same pick from its name as it gets with the plugin loaded."""
    from lwbench.method import name_style  # here: it imports torch, which a plot of stored rows does not need
    from lwbench.registry import METHODS

    try:
        return METHODS.get(method).plot_style()
    except UnknownNameError:
        return name_style(method)


def pareto_front(points: Any, x_higher_better: bool = False, y_higher_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    ``points`` is ``(N, 2)``: column 0 the cost axis (lower is better unless ``x_higher_better``, as for
    throughput), column 1 the metric (higher is better unless ``y_higher_better=False``). A point is
    dominated when another is at least as good on both axes and strictly better on one, so exact
    duplicates of a frontier point are all on the frontier, and of several points with the same cost only
    the most accurate ones are. Points with a NaN coordinate are never on the frontier. O(N log N).
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        if pts.size == 0:
            return np.zeros(0, dtype=bool)
        raise ValueError(f"pareto_front needs an (N, 2) array of (cost, metric), got shape {pts.shape}")
    # Normalise to "lower x is better, higher y is better".
    xs = -pts[:, 0] if x_higher_better else pts[:, 0]
    ys = pts[:, 1] if y_higher_better else -pts[:, 1]
    mask = np.zeros(len(pts), dtype=bool)
    valid = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
    if valid.size == 0:
        return mask
    order = valid[np.argsort(xs[valid], kind="stable")]
    best = -math.inf  # best metric among strictly cheaper points
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and xs[order[j]] == xs[order[i]]:
            j += 1
        group = order[i:j]
        top = ys[group].max()
        if top > best:
            mask[group[ys[group] == top]] = True
            best = top
        i = j
    return mask


def _notice(msg: str) -> None:
    warnings.warn(f"lwbench: {msg}", UserWarning, stacklevel=3)


def _one(values: Any) -> list[str]:
    return [str(v) for v in dict.fromkeys(values) if isinstance(v, str) and v]


def _task_source(df: pd.DataFrame, task: str, source: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of one task and one source (default: real if it has any), with a notice when the other source is left
    out; the source actually plotted."""
    if df is None or df.empty or "task" not in df.columns:
        raise LwbenchError("no results to plot; run `lwbench run ...` first or check --results-dir")
    d = df[df["task"] == task]
    if d.empty:
        known = ", ".join(sorted(map(str, df["task"].dropna().unique()))) or "none"
        raise LwbenchError(f"no results for task '{task}'; tasks with results: {known}")
    present = [s for s in SOURCES if s in set(d["source"])] + sorted(set(d["source"]) - set(SOURCES))
    if source is not None:
        if source not in present:
            raise LwbenchError(f"no {source} results for task '{task}'; it has {', '.join(present)} results "
                               f"(pass --source {present[0]})")
    else:
        source = present[0]
        if len(present) > 1:
            _notice(f"task '{task}' has {' and '.join(present)} results; plotting only {source} "
                    f"(ask for the other with source=..., e.g. --source {present[1]}); sources are never mixed")
    return d[d["source"] == source], source


def _select(df: pd.DataFrame, task: str, x: str, source: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of one task and one source with a usable x and metric; the source actually plotted."""
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis '{x}' for a Pareto plot; use one of {', '.join(X_AXES)}")
    d, source = _task_source(df, task, source)
    metrics = list(dict.fromkeys(d["metric"]))
    if len(metrics) > 1:
        _notice(f"task '{task}' rows report several metrics {metrics}; plotting {metrics[0]}")
        d = d[d["metric"] == metrics[0]]
    xv = d[x].astype(float) if x in d.columns else np.full(len(d), np.nan)
    if x == "speedup" and np.isfinite(xv).any():  # the reference is 1x itself, by definition
        d = d.copy()
        xv = xv.where(np.isfinite(xv) | (d["method"] != REFERENCE_METHOD), 1.0)
        d[x] = xv
    ok = np.isfinite(xv) & (xv > 0) & np.isfinite(d["metric_value"].astype(float))
    if not ok.all():
        gone = d.loc[~ok, ["method", "budget"]].astype(str).agg(" ".join, axis=1)
        why = "timed before paired timing?" if x == "speedup" else "not measured?"
        _notice(f"{len(gone)} {source} row(s) of '{task}' have no {x} ({why}) and are left out: "
                f"{', '.join(sorted(set(gone))[:6])}{' ...' if len(set(gone)) > 6 else ''}")
    d = d[ok]
    if d.empty:
        raise LwbenchError(f"no {source} results for task '{task}' have a {x} value to plot; "
                           f"measure it or plot another x (--x {', '.join(k for k in X_AXES if k != x)})")
    return d, source


def _replicate_keys(d: pd.DataFrame) -> pd.Series:
    """The replicate group of each row (:func:`lwbench.tables.replicate_keys`): rows that differ only in their seed
    share one; rows without a replicate id (older result files) have one of their own and are never averaged."""
    from lwbench.tables import replicate_keys

    return replicate_keys(d).astype(str)


TIMING_MODE = ("compile", "autocast", "device", "threads")


def _aggregate(d: pd.DataFrame, x: str, task: str = "") -> pd.DataFrame:
    """One point per replicate group: rows that differ only in their seed (same ``replicate_id``) are averaged.

    Lines are methods, split by backbone/profile/size if those are mixed, off-the-shelf rows apart, and rows on
    another test set size, teacher or fine-tuning recipe than most apart and named (``full (off the shelf, 64 eval
    images)``, :mod:`lwbench.mixing`), with one notice per difference. Different configs at one budget of a line
    (different ``replicate_id``) stay separate points, with one notice naming them. Columns: ``line``, ``off`` (off
    the shelf), ``main`` (on the main side of every difference),
    ``budget``, ``method``, ``x``, ``y`` (means), ``ylo``/``yhi`` (mean ± std over the seeds, else the 95%
    interval), ``xiqr`` (mean interquartile range of a timing x, NaN for GMACs), ``xlo``/``xhi`` (mean interval
    ends of a ratio x, NaN otherwise), ``mem``, ``bv``, ``n`` (rows) and ``nseeds`` (distinct seeds; rows without
    a seed count one each).
    """
    import pandas as pd

    d = d.copy()
    label = d["method"].astype(str)
    # Timings taken compiled and eager, in another precision or on another device are different measurements:
    # on a timing axis they are never averaged or joined into one line, each is its own line, named.
    timing = TIMING_MODE if x in TIMED_X else ()
    for col in ("backbone", "profile", "img_size", *timing):
        if col in d.columns and d[col].astype(str).nunique() > 1:
            label = label + " · " + (f"{col} " if col in timing else "") + d[col].astype(str)
    # Never mix regimes silently: off-the-shelf rows are their own (dashed) lines. Rows on another test set, teacher
    # or fine-tuning recipe than most (lwbench.mixing) are their own lines too, named: never averaged with the others.
    off = (d["regime"] == "off_the_shelf") if "regime" in d.columns else pd.Series(False, index=d.index)
    diffs = differences(d)
    sides = pd.Series(side_labels(diffs, len(d)), index=d.index)
    parts = [[OFF_THE_SHELF.strip("()")] * bool(o) + [s] * bool(s) for o, s in zip(off, sides, strict=True)]
    label = label + pd.Series([f" ({', '.join(p)})" if p else "" for p in parts], index=d.index)
    for x_ in diffs:
        _notice(f"{task + ': ' if task else ''}{x_.line()}")
    mismatch = regime_mismatch(d, REFERENCE_METHOD)
    if mismatch:
        _notice(f"{task + ': ' if task else ''}{mismatch}")
    d["_line"] = label
    d["_off"] = off
    d["_main"] = sides == ""
    d["_budget"] = d["budget"].astype(str) if "budget" in d.columns else "-"
    d["_rep"] = _replicate_keys(d)
    d["_bv"] = d["budget_value"].astype(float) if "budget_value" in d.columns else np.nan
    d["_mem"] = d["peak_mem_mb"].astype(float) if "peak_mem_mb" in d.columns else np.nan
    d["_x"] = d[x].astype(float)
    d["_y"] = d["metric_value"].astype(float)
    d["_seed"] = d["seed"] if "seed" in d.columns else np.nan
    d["_seed"] = d["_seed"].where(d["_seed"].notna(), d["_rep"] + [f"\0{i}" for i in range(len(d))])
    for col in ("metric_ci_low", "metric_ci_high"):
        d["_" + col] = d[col].astype(float) if col in d.columns else np.nan
    iqr = X_IQR.get(x)
    d["_xiqr"] = d[iqr].astype(float) if iqr in d.columns else np.nan
    for end, col in zip(("_xlo", "_xhi"), X_INTERVAL.get(x, ("", "")), strict=True):
        d[end] = d[col].astype(float) if col in d.columns else np.nan
    g = d.groupby(["_line", "_budget", "_rep"], sort=False, dropna=False)
    agg = pd.DataFrame({
        "method": g["method"].first(), "x": g["_x"].mean(), "y": g["_y"].mean(), "ystd": g["_y"].std(ddof=1),
        "cilo": g["_metric_ci_low"].mean(), "cihi": g["_metric_ci_high"].mean(), "xiqr": g["_xiqr"].mean(),
        "xlo": g["_xlo"].mean(), "xhi": g["_xhi"].mean(),
        "mem": g["_mem"].mean(), "bv": g["_bv"].first(), "n": g.size(), "nseeds": g["_seed"].nunique(),
        "off": g["_off"].first(), "main": g["_main"].first(),
    }).reset_index().rename(columns={"_line": "line", "_budget": "budget", "_rep": "replicate"})
    # The error bar of a point: mean ± std over its seeds when it has several, else its bootstrap interval over
    # the test images (no bar when neither exists).
    many = agg["nseeds"] > 1
    agg["ylo"] = np.where(many, agg["y"] - agg["ystd"], agg["cilo"])
    agg["yhi"] = np.where(many, agg["y"] + agg["ystd"], agg["cihi"])

    configs = agg.groupby(["line", "budget"], sort=False).size()
    several = configs[configs > 1]
    if len(several):
        parts = [f"{line} {budget} has {n} different configs" if budget not in ("-", "", "nan")
                 else f"{line} has {n} different configs" for (line, budget), n in several.items()]
        shown = ", ".join(parts[:4]) + (f" (and {len(parts) - 4} more)" if len(parts) > 4 else "")
        old = int(agg["replicate"].str.startswith("\0row").sum())
        why = (f"; {old} row(s) from older result files have no replicate_id and are never averaged" if old else "")
        _notice(f"{task + ': ' if task else ''}{shown}; drawn as separate points "
                f"(filter the results to compare like with like){why}")
    return agg


def _seed_note(nseeds: Any) -> str:
    """Title note on what the error bars are: the seeds' spread where a point averages several, else the
    bootstrap interval over test images."""
    counts = sorted({int(n) for n in nseeds})
    if not counts or counts[-1] <= 1:
        return "bars: 95% bootstrap CI over test images"
    lo, hi = counts[0], counts[-1]
    many = f"{hi} seeds" if lo == hi else f"{lo}-{hi} seeds per point"
    return f"mean of {many}, bars ± std over seeds" + (" (1-seed points: 95% CI)" if lo == 1 else "")


def tied_with_front(agg: pd.DataFrame, higher: bool) -> np.ndarray:
    """Points off the frontier whose error bar reaches the frontier at their cost (the best frontier point that
    costs no more, its lower bar end): not shown to be dominated, so drawn as tied rather than beaten."""
    front = agg[agg["front"]]
    tied = np.zeros(len(agg), dtype=bool)
    for i, r in enumerate(agg.itertuples()):
        if r.front or not np.isfinite(r.yhi):
            continue
        cheaper = front[(front["x"] >= r.x) if higher else (front["x"] <= r.x)]
        if not len(cheaper):
            continue
        best = cheaper.loc[cheaper["y"].idxmax()]
        low = best["ylo"] if np.isfinite(best["ylo"]) else best["y"]
        tied[i] = bool(r.yhi >= low)
    return tied


def _title(d: pd.DataFrame, task: str, source: str, x: str, nseeds: Any = ()) -> tuple[str, str]:
    """Figure title: task and source, then backbone, profile, device, threads and, if any, the seed averaging."""
    head = f"{task} · {'SYNTHETIC data' if source == 'synthetic' else f'{source} data'}"
    bits = []
    backbones = _one(d.get("backbone", []))
    sizes = _one(d.get("img_size", []))
    if backbones:
        bits.append(f"{', '.join(backbones)}" + (f" @ {sizes[0]}" if len(sizes) == 1 else ""))
    profiles = _one(d.get("profile", []))
    if len(profiles) == 1:
        bits.append(f"profile {profiles[0]}")
    devices = _devices(d)
    if devices:
        bits.append(" / ".join(devices))
        if len(devices) > 1 and x != "gmacs":
            _notice(f"'{task}' rows were measured on {len(devices)} devices; their {x} values are not comparable")
    threads = [int(t) for t in dict.fromkeys(d["threads"]) if t == t] if "threads" in d.columns else []
    if len(threads) == 1 and x != "gmacs":
        bits.append(f"{threads[0]} thread{'s' if threads[0] != 1 else ''}")
    note = _seed_note(nseeds)
    if note:
        bits.append(note)
    effort = _effort_note(d)
    return head, " · ".join(bits) + (f"\n{effort}" if effort else "")


def _devices(d: pd.DataFrame) -> list[str]:
    """The distinct devices of the rows, ``cpu: <CPU model>`` / ``cuda: <GPU name>``."""
    devices: list[str] = []
    for _, r in d.drop_duplicates([c for c in ("device", "device_name") if c in d.columns]).iterrows():
        text = _device(r)
        if text and text not in devices:
            devices.append(text)
    return devices


def _device(r: Any) -> str:
    name = r.get("device_name") if isinstance(r.get("device_name"), str) and r.get("device_name") else None
    dev = r.get("device") if isinstance(r.get("device"), str) else None
    return (f"{dev}: {name}" if dev and name else (name or dev)) or ""


def _effort_note(d: pd.DataFrame) -> str:
    """Says on the figure when its points are not one comparison: rows on other test sets, teachers or recipes than
    most (drawn apart, left out of the frontier), methods fine-tuned beside an off-the-shelf-only ``full``, methods
    trained on top of the shared teacher beside methods that were not."""
    from lwbench.tables import recipe_note

    diffs = differences(d)
    lines = []
    if diffs:
        others = "; ".join(label for x in diffs for label, _ in x.sides[1:])
        main = ", ".join(x.sides[0][0] for x in diffs)
        lines.append(f"not one comparison: rows with {others} drawn as their own lines, named; frontier over the "
                     f"rows with {main} only")
    mismatch = regime_mismatch(d, REFERENCE_METHOD)
    if mismatch:
        lines.append(mismatch.split(", so ")[0])
    bits = []
    if "regime" in d.columns and d["regime"].notna().all():
        if not any(x.what in ("fine-tuning recipe", "teacher") for x in diffs):
            note = recipe_note(d)
            if note:
                bits.append(note.removeprefix("not equal-effort: "))
    elif "method_train_time_s" in d.columns:
        secs = d.groupby("method")["method_train_time_s"].max()
        trained, untrained = sorted(secs[secs > 0].index), sorted(secs[~(secs > 0)].index)
        if trained and untrained:
            bits.append(f"{', '.join(trained)} trained on top of the teacher, {', '.join(untrained)} not")
    if bits:
        lines.append(f"not equal-effort: {'; '.join(bits)}")
    return "\n".join(lines)


OFF_THE_SHELF = "(off the shelf)"


def _task_opts(d: pd.DataFrame) -> list[dict[str, Any]]:
    """The distinct task options of the rows that carry their resolved config (``config.task_opts``)."""
    import json

    seen: list[dict[str, Any]] = []
    for c in d.get("config", []):
        if isinstance(c, str):
            try:
                c = json.loads(c)
            except ValueError:
                continue
        opts = c.get("task_opts") if isinstance(c, dict) else None
        if isinstance(opts, dict) and opts not in seen:
            seen.append(opts)
    return seen


def chance_level(d: pd.DataFrame, task: str, metric: str) -> tuple[float, int] | None:
    """``(chance %, classes)`` of a top-k metric: ``k / num_classes`` of the task (from a ``num_classes`` column,
    else the registered task built with the rows' task options, else its class default); None for other metrics
    (mIoU has no such chance level), unknown tasks, or rows that disagree on the number of classes."""
    k = {"top1": 1, "top5": 5}.get(metric)
    if k is None:
        return None
    counts: set[int] = set()
    if "num_classes" in d.columns:
        counts = {int(n) for n in d["num_classes"] if isinstance(n, (int, float)) and n == n and n > 0}
    if not counts:
        try:
            from lwbench.registry import get_task

            cls = get_task(task)
        except Exception:  # a plugin task that is not installed here: no chance line rather than no figure
            return None
        source = "synthetic" if "synthetic" in getattr(cls, "sources", ()) else "auto"
        for opts in _task_opts(d) or [{}]:
            try:
                n = cls(source=source, **opts).num_classes
            except Exception:
                n = getattr(cls, "num_classes", None)
            if isinstance(n, int) and n > 0:
                counts.add(n)
    if len(counts) != 1:
        return None
    n = counts.pop()
    return 100.0 * min(k, n) / n, n


def log_ticks(lo: float, hi: float) -> tuple[list[float], tuple[float, float]]:
    """Labelled ticks for a log axis over ``[lo, hi]`` (both > 0) and the axis limits: the limits reach out to the
    first tick at or beyond each end, so the leftmost and rightmost points sit inside the labelled range. Ticks
    are 1-2-5 per decade (1, 10, 100 ... over 3 decades and more; 1..9 within one decade)."""
    lo, hi = float(min(lo, hi)), float(max(lo, hi))
    if not (lo > 0 and math.isfinite(hi)):
        raise ValueError(f"log_ticks needs 0 < lo <= hi, got {lo}, {hi}")
    span = math.log10(hi / lo)
    subs = (1.0,) if span >= 3 else (1.0, 2.0, 5.0) if span >= 0.7 else (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    cands = sorted(float(f"{m * 10.0 ** e:.12g}") for e in range(e0, e1 + 1) for m in subs)
    eps = 1e-9
    first = max(c for c in cands if c <= lo * (1 + eps))
    last = min(c for c in cands if c >= hi * (1 - eps))
    ticks = [c for c in cands if first <= c <= last]
    pad = 10 ** (0.025 * max(math.log10(last / first), 0.3))  # a little air beyond the outer ticks
    return ticks, (first / pad, last * pad)


def wrap_title(text: str, width: int) -> str:
    """Each line of ``text`` wrapped to ``width`` characters, breaking at its `` · `` separators first."""
    out = []
    for line in text.split("\n"):
        cur = ""
        for part in line.split(" · "):
            if cur and len(cur) + 3 + len(part) > width:
                out.append(cur)
                cur = part
            else:
                cur = f"{cur} · {part}" if cur else part
        out.append(cur)
    return "\n".join(textwrap.fill(t, width, break_long_words=False, subsequent_indent="  ") if len(t) > width
                     else t for t in out)


def _fit_suptitle(fig: Any, text: str, **kw: Any) -> Any:
    """A left-aligned figure title wrapped until it fits the figure's width (never clipped at the right edge)."""
    renderer = fig.canvas.get_renderer()
    width = 140
    title = fig.suptitle(wrap_title(text, width), **kw)
    while width > 30 and title.get_window_extent(renderer).x1 > fig.bbox.x1 - 4:
        width -= 6
        title.set_text(wrap_title(text, width))
    return title

def _fit_legend(fig: Any, handles: list[Any], ncol: int, **kw: Any) -> Any:
    """The method legend below the axes with ``ncol`` columns, fewer while it is wider than the figure (long
    names, e.g. "algm (off the shelf) (threshold)", would otherwise be clipped at both edges)."""
    renderer = fig.canvas.get_renderer()
    while True:
        legend = fig.legend(handles=handles, loc="outside lower center", ncol=ncol, **kw)
        box = legend.get_window_extent(renderer)
        if ncol <= 1 or (box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1):
            return legend
        legend.remove()
        ncol -= 1


_LABEL_SPOTS = ((7, 6, "left", "bottom"), (7, -6, "left", "top"), (-7, 6, "right", "bottom"),
                (-7, -6, "right", "top"), (0, 11, "center", "bottom"), (0, -11, "center", "top"))


def _place_labels(fig: Any, ax: Any, labels: list[Any], points: np.ndarray, paths: list[np.ndarray],
                  marker_px: Any = 7.0) -> None:
    """Greedy label placement: each budget label takes the first spot around its marker that overlaps no
    marker, method line or earlier label (else the least-overlapping spot), so crowded clusters stay legible."""
    if not labels:
        return
    fig.draw_without_rendering()  # settle the constrained layout, so display coordinates are final
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(points)
    r = np.asarray(marker_px, dtype=float) * fig.dpi / 72.0  # one radius (points) for all markers, or one each
    boxes = [np.column_stack([pts[:, 0] - r, pts[:, 1] - r, pts[:, 0] + r, pts[:, 1] + r])]
    for path in paths:  # a method's line becomes a chain of small boxes, one every ~3 px
        disp = ax.transData.transform(path)
        for (x0, y0), (x1, y1) in zip(disp[:-1], disp[1:], strict=True):
            t = np.linspace(0, 1, max(2, int(math.hypot(x1 - x0, y1 - y0) / 3)))[:, None]
            xy = np.array([x0, y0]) + t * np.array([x1 - x0, y1 - y0])
            boxes.append(np.hstack([xy - 1.5, xy + 1.5]))
    obstacles = np.vstack(boxes)

    def overlap(rect: tuple[float, float, float, float]) -> float:
        w = np.minimum(rect[2], obstacles[:, 2]) - np.maximum(rect[0], obstacles[:, 0])
        h = np.minimum(rect[3], obstacles[:, 3]) - np.maximum(rect[1], obstacles[:, 1])
        return float((np.clip(w, 0, None) * np.clip(h, 0, None)).sum())

    for label in labels:
        best, best_cost = None, math.inf
        for dx, dy, ha, va in _LABEL_SPOTS:
            label.set_position((dx, dy))
            label.set_ha(ha)
            label.set_va(va)
            box = label.get_window_extent(renderer)
            rect = (box.x0, box.y0, box.x1, box.y1)
            cost = overlap(rect)
            if cost < best_cost:
                best, best_cost = ((dx, dy, ha, va), rect), cost
            if cost == 0:
                break
        (dx, dy, ha, va), rect = best
        label.set_position((dx, dy))
        label.set_ha(ha)
        label.set_va(va)
        obstacles = np.vstack([obstacles, np.array([rect])])


def pareto_plot(df: pd.DataFrame, task: str, x: str = "gmacs", out: str | os.PathLike[str] | None = None,
                source: str | None = None, dpi: int = 150) -> Path:
    """Accuracy vs cost for every method on ``task``, written to ``out``; returns the path.

    See :func:`pareto_figure` for what is drawn. The image format follows ``out``'s suffix (png, pdf,
    svg); default ``pareto_<task>_<x>.png``. The file is replaced atomically.
    """
    fig = pareto_figure(df, task, x=x, source=source)
    return save_figure(fig, Path(out) if out is not None else Path(f"pareto_{task}_{x}.png"), dpi)


def save_figure(fig: Figure, out: Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``out`` atomically (a temp file beside it, then ``os.replace``), in the format of ``out``'s
    suffix; a PNG carries the :data:`PNG_SOFTWARE` tag, by which ``lwbench report`` knows its own files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    tmp = temp_beside(out.parent, out.stem, suffix=f".{fmt}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt, metadata={"Software": PNG_SOFTWARE} if fmt == "png" else None)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


MARKER_AREA = (30.0, 330.0)  # marker area (pt^2) of the least and the most peak memory in a figure
_DEFAULT_AREA = 90.0  # every marker when no row has a memory figure
_SOLID = ("-", (0, (5, 1, 1, 1)), (0, (1, 1)))  # lines of one method split by backbone/profile/size/timing mode
_DASHED = ("--", (0, (6, 2, 1, 2)), (0, (2, 2)))  # the same, off the shelf


def _spread_apart(fig: Any, ax: Any, notes: list[Any], gap_px: float = 11.0) -> None:
    """Reference-line labels in the right margin: nudged apart vertically so labels of close lines stay legible."""
    if not notes:
        return
    fig.draw_without_rendering()
    ys = [ax.transData.transform((1.0, n.xy[1]))[1] for n in notes]
    order = np.argsort(ys)
    placed: list[float] = []
    for i in order:
        y = ys[i] if not placed else max(ys[i], placed[-1] + gap_px)
        placed.append(y)
        notes[i].set_position((5, (y - ys[i]) * 72.0 / fig.dpi))


def pareto_figure(df: pd.DataFrame, task: str, x: str = "gmacs", source: str | None = None,
                  chance: float | None = None) -> Figure:
    """The Pareto figure of ``task`` (an Agg-backed ``matplotlib.figure.Figure``, no pyplot state).

    One line with markers per method (sorted by ``x``; split by backbone/profile/size if those vary), in the
    method's own colour and marker (:func:`method_style`, the same in every figure); off-the-shelf lines dashed
    with hollow markers. Log-scaled x whose labelled ticks enclose every point. The Pareto frontier over all
    points is a thick grey step line with ringed markers (for throughput higher is better and the frontier flips).
    Marker area encodes peak memory (a size legend in MB on the right); markers are labelled with their budget.
    Vertical bars: the 95% bootstrap interval, or ± std over seeds where rows that differ only in their seed
    (one ``replicate_id``) are averaged into one point; different configs at one budget stay separate points, with
    a notice. Horizontal bars on a timing axis: the rows' interquartile range (its width, centred on the median);
    on the ``speedup`` axis (the paired speed-up over ``full``, higher is better, ``full`` itself at 1 unless it has
    its own self-paired figure) the speed-up's 95% interval, and the title counts rows whose interval is wide.
    Horizontal reference lines: ``full``'s accuracy per regime and chance (``chance`` %, default ``k /
    num_classes`` of the task for top-k metrics), labelled in the right margin. With both sources in ``df`` only
    ``source`` (default: the real one) is drawn, with a notice; the title says SYNTHETIC for synthetic data.
    """
    import seaborn as sns
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    d, source = _select(df, task, x, source)
    agg = _aggregate(d, x, task)
    higher = X_HIGHER_BETTER[x]
    # The frontier compares like with like: rows on another test set, teacher or recipe than most are drawn, named,
    # but never frontier points (the title says which rows the frontier is over).
    agg["front"] = pareto_front(agg[["x", "y"]].where(agg["main"]).to_numpy(), x_higher_better=higher)
    agg["tied"] = tied_with_front(agg, higher)
    metric = str(d["metric"].iloc[0])
    mem_kinds = [MEM_KINDS.get(k, k) for k in _one(d.get("mem_kind", []))]

    mem = agg["mem"].to_numpy(dtype=float)
    has_mem = bool(np.isfinite(mem).any())
    mlo, mhi = (float(np.nanmin(mem)), float(np.nanmax(mem))) if has_mem else (0.0, 0.0)

    def area(m: Any) -> np.ndarray:
        m = np.asarray(m, dtype=float)
        if not has_mem:
            return np.full(m.shape, _DEFAULT_AREA)
        if mhi - mlo <= 1e-9 * max(abs(mhi), 1.0):
            a = np.full(m.shape, float(np.mean(MARKER_AREA)))
        else:
            a = MARKER_AREA[0] + (MARKER_AREA[1] - MARKER_AREA[0]) * (m - mlo) / (mhi - mlo)
        return np.where(np.isfinite(m), a, _DEFAULT_AREA)

    agg["area"] = area(agg["mem"])
    ring = (np.sqrt(agg["area"]) + 10.0) ** 2  # a ring around a marker, whatever its size

    lines = list(dict.fromkeys(agg["line"]))
    variants: dict[tuple[str, bool], int] = {}
    iqr_note = interval_note = False
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(9.6, 6.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_xscale("log")

        # Frontier first, so it sits underneath everything.
        fr = agg[agg["front"]].sort_values(["x", "y"])
        ax.step(fr["x"], fr["y"], where="pre" if higher else "post", color="0.15", lw=7, alpha=0.16,
                solid_capstyle="round", zorder=1)

        halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
        handles, labels, paths = [], [], []
        xs_lo, xs_hi = list(agg["x"]), list(agg["x"])
        for line in lines:
            pts = agg[agg["line"] == line].sort_values(["x", "bv", "y"])
            method = str(pts["method"].iloc[0])
            color, marker = method_style(method)
            off = bool(pts["off"].iloc[0])
            j = variants.get((method, off), 0)
            variants[(method, off)] = j + 1
            style = (_DASHED if off else _SOLID)[j % 3]
            ax.plot(pts["x"], pts["y"], color=color, lw=1.8, alpha=0.9, zorder=2, ls=style)
            paths.append(pts[["x", "y"]].to_numpy())
            spread = pts[np.isfinite(pts["ylo"]) & np.isfinite(pts["yhi"])]
            if len(spread):  # seeds' std, or the bootstrap interval
                bars = ax.errorbar(spread["x"], spread["y"], yerr=[spread["y"] - spread["ylo"],
                                                                   spread["yhi"] - spread["y"]],
                                   fmt="none", ecolor=color, elinewidth=1.3, capsize=3.5, capthick=1.3, alpha=0.85,
                                   zorder=2.5)
                for c in bars.lines[2]:
                    c.set_gid("metric_interval")
                paths.extend(np.array([[r.x, r.ylo], [r.x, r.yhi]]) for r in spread.itertuples())
            timed = pts[np.isfinite(pts["xiqr"]) & (pts["xiqr"] > 0)]
            if len(timed):  # the timing's interquartile range: the rows keep its width, drawn centred on the median
                half = timed["xiqr"].to_numpy() / 2
                left = np.minimum(half, 0.9 * timed["x"].to_numpy())  # a log axis has no room below zero
                bars = ax.errorbar(timed["x"], timed["y"], xerr=[left, half], fmt="none", ecolor=color,
                                   elinewidth=1.0, capsize=2.5, capthick=1.0, alpha=0.6, zorder=2.4)
                for c in bars.lines[2]:
                    c.set_gid("timing_iqr")
                xs_lo.extend(timed["x"] - left)
                xs_hi.extend(timed["x"] + half)
                iqr_note = True
            ranged = pts[np.isfinite(pts["xlo"]) & np.isfinite(pts["xhi"]) & (pts["xlo"] > 0)]
            if len(ranged):  # a ratio's 95% interval (the speed-up's, over paired timing rounds): its own ends
                bars = ax.errorbar(ranged["x"], ranged["y"], xerr=[np.maximum(ranged["x"] - ranged["xlo"], 0),
                                                                   np.maximum(ranged["xhi"] - ranged["x"], 0)],
                                   fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5, capthick=1.0, alpha=0.6,
                                   zorder=2.4)
                for c in bars.lines[2]:
                    c.set_gid(f"{x}_interval")
                xs_lo.extend(ranged["xlo"])
                xs_hi.extend(ranged["xhi"])
                interval_note = True
            face = "white" if off else color
            ax.scatter(pts["x"], pts["y"], s=pts["area"], c=[face], marker=marker,
                       edgecolors=[color if off else filled_edge(marker, color)], linewidths=1.7 if off else 0.9,
                       zorder=3,
                       gid=f"points:{line}")
            # Markers carry only the budget's value; its key ("k", "r", ...) goes once into the legend.
            keys = {str(b).partition("=")[0] for b in pts["budget"] if "=" in str(b)}
            key = keys.pop() if len(keys) == 1 else None
            for _, p in pts.iterrows():
                text = str(p["budget"])
                if text in ("-", "", "nan"):
                    continue
                if key is not None:
                    text = text.partition("=")[2]
                labels.append(ax.annotate(text, (p["x"], p["y"]), xytext=(7, 6), textcoords="offset points",
                                          fontsize=8, color=color, zorder=5, path_effects=halo))
            handles.append(Line2D([], [], color=color, marker=marker, lw=1.8, markersize=8, ls=style,
                                  markerfacecolor=face, markeredgecolor=color if off else filled_edge(marker, color),
                                  markeredgewidth=1.7 if off else 0.9,
                                  label=f"{line} ({key})" if key else line))
        ax.scatter(fr["x"], fr["y"], s=ring[fr.index], facecolors="none", edgecolors="black", linewidths=1.6,
                   zorder=4, gid="pareto_frontier")
        handles.append(Line2D([], [], color="0.15", lw=7, alpha=0.16, marker="o", markersize=14,
                              markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.6,
                              label="Pareto frontier"))
        tied = agg[agg["tied"]]
        if len(tied):
            ax.scatter(tied["x"], tied["y"], s=ring[tied.index], facecolors="none", edgecolors="black",
                       linewidths=1.2, linestyles=":", zorder=4, gid="tied_with_frontier")
            handles.append(Line2D([], [], ls="none", marker="o", markersize=14, markerfacecolor="none",
                                  markeredgecolor="black", markeredgewidth=1.2,
                                  label="tied with the frontier (bars overlap)"))

        # Reference lines: full's accuracy (one per regime / line of full) and chance, labelled in the right margin.
        notes = []
        full_color = method_style("full")[0]
        for line, grp in agg[agg["method"] == "full"].groupby("line", sort=False):
            # One line per point, never their mean: two `full` configs on one line (a notice names them) are two
            # references, each at its own accuracy.
            for j, (_, p) in enumerate(grp.iterrows()):
                yv = float(p["y"])
                name = f"{line} #{j + 1}" if len(grp) > 1 else str(line)
                ax.axhline(yv, color=full_color, lw=1.0, ls="-." if bool(p["off"]) else "-", alpha=0.7, zorder=1.5,
                           gid=f"full_reference:{name}")
                notes.append(ax.annotate(f"{name}: {yv:.1f}", (1.0, yv), xycoords=ax.get_yaxis_transform(),
                                         xytext=(5, 0), textcoords="offset points", ha="left", va="center",
                                         fontsize=8, color=full_color, annotation_clip=False,
                                         gid="full_reference_label"))
        level = (float(chance), None) if chance is not None else chance_level(d, task, metric)
        chance_off = ""
        if level is not None:
            ys = np.concatenate([agg["y"], agg["ylo"], agg["yhi"]]).astype(float)
            ylo_data, yhi_data = float(np.nanmin(ys)), float(np.nanmax(ys))
            text = f"chance: {level[0]:.3g}" + (f" (1/{level[1]} classes)" if level[1] and metric == "top1"
                                                 else f" ({min(5, level[1])}/{level[1]})" if level[1] else "")
            if level[0] >= ylo_data - max(yhi_data - ylo_data, 10.0):
                ax.axhline(level[0], color="0.3", lw=1.3, ls=":", zorder=1.5, gid="chance")
                notes.append(ax.annotate(text, (1.0, level[0]), xycoords=ax.get_yaxis_transform(), xytext=(5, 0),
                                         textcoords="offset points", ha="left", va="center", fontsize=8,
                                         color="0.3", annotation_clip=False, gid="chance_label"))
            else:  # far below every point (1000 classes): said, not drawn, so the points keep the axis
                chance_off = f"\n{text}, below the axis"  # a second line: one line would outgrow the axes

        ticks, lim = log_ticks(float(np.nanmin(xs_lo)), float(np.nanmax(xs_hi)))
        ax.set_xlim(*lim)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(y=0.08)
        ax.set_xlabel(X_AXES[x] + ("  →  better" if higher else "  ←  better"))
        ax.set_ylabel(metric_label(metric) + "  (↑ better)" + chance_off)
        head, sub = _title(d, task, source, x, agg["nseeds"])
        if iqr_note:
            sub += f" · horizontal bars: {x.split('_')[0]} IQR (p75−p25, centred on the median)"
        if interval_note:
            sub += " · horizontal bars: the speed-up's 95% interval over balanced pairs of timing rounds"
            wide = sum(bool(speedup_is_wide(r)) for _, r in d.iterrows())
            if wide:
                sub += (f" · {wide} row(s) with a wide speed-up interval (high/low > {WIDE_RATIO:g}: the machine was "
                        f"too busy to time them)")
        # A figure title (not an axes title) so constrained layout keeps it clear of the legends; wrapped to fit.
        _fit_suptitle(fig, f"{head}\n{sub}" if sub else head, x=0.01, ha="left", fontsize=10.5,
                      color="firebrick" if source == "synthetic" else "black")
        # Below the axes, so the title can use the full width and no point is ever covered.
        any_off = bool(agg["off"].any())
        _fit_legend(fig, handles, min(len(handles), 4), frameon=False, fontsize=8.5,
                    title="method (budget key)" + ("; dashed, hollow: off the shelf" if any_off else ""),
                    title_fontsize=8.5, columnspacing=1.6)
        if has_mem:  # marker area = peak memory; the size legend decodes it
            values = [mlo] if mhi - mlo <= 1e-9 * max(abs(mhi), 1.0) else list(np.linspace(mlo, mhi, 3))
            approx = "~" if set(_one(d.get("mem_kind", []))) <= APPROXIMATE_MEM_KINDS and mem_kinds else ""
            sizes = [Line2D([], [], ls="none", marker="o", markersize=float(np.sqrt(area(v))), markerfacecolor="0.65",
                            markeredgecolor="0.35", label=f"{approx}{v:.3g} MB") for v in values]
            if not np.isfinite(mem).all():
                sizes.append(Line2D([], [], ls="none", marker="o", markersize=float(np.sqrt(_DEFAULT_AREA)),
                                    markerfacecolor="none", markeredgecolor="0.35", label="not measured"))
            kind = "\n".join(textwrap.wrap(", ".join(mem_kinds), 18)) if mem_kinds else ""
            fig.legend(handles=sizes, loc="outside right center", frameon=False, fontsize=8.5, labelspacing=1.6,
                       borderpad=0.8, title="peak memory\n(marker area)" + (f"\n{kind}" if kind else ""),
                       title_fontsize=8.5)
        _place_labels(fig, ax, labels, agg[["x", "y"]].to_numpy(), paths,
                      marker_px=np.sqrt(agg["area"].to_numpy()) / 2 + 1)
        _spread_apart(fig, ax, notes)

    return fig


# -- conversion: how much of a MAC saving becomes time ---------------------------------------------------------------

# Lines of constant conversion (speed-up / GMAC ratio) drawn on a conversion plot; 1 is the diagonal.
CONVERSION_LINES = (1.0, 0.5, 0.25)
#: A conversion panel with more method lines than this draws no budget labels (they cannot be placed legibly; the
#: legend names each method and its budget key, the table its budget).
CROWDED_LINES = 10


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _timing_mode(r: Any) -> str:
    """How a row was timed, for a panel title: its dtype, with autocast and torch.compile when used."""
    bits = [str(r.get("dtype")) if isinstance(r.get("dtype"), str) and r.get("dtype") else "dtype ?"]
    for col, name in (("autocast", "autocast"), ("compile", "compiled")):
        v = r.get(col)
        if isinstance(v, str) and v and v != "none":
            bits.append(f"{name} {v}")
    return ", ".join(bits)


def _threads(r: Any) -> str:
    t = r.get("threads")
    try:
        t = int(t)
    except (TypeError, ValueError):
        return ""
    return f"{t} thread{'s' if t != 1 else ''}"


def _batch_entries(r: Any) -> list[dict[str, Any]]:
    """The speed-ups of one row, one per batch size: batch 1 (``speedup``), the throughput batch
    (``throughput_speedup``) and every other batch of ``timing_batches`` with a speed-up (not those that ran out of
    memory). Each: ``batch``, ``kind`` (latency / throughput / batch), ``speedup``, ``lo``, ``hi``, ``wide``."""
    import json

    out: list[dict[str, Any]] = []

    def add(batch: int, kind: str, rec: dict[str, Any], prefix: str = "") -> None:
        v = rec.get(f"{prefix}speedup")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v > 0):
            return
        if any(e["batch"] == batch for e in out):
            return
        lo, hi = rec.get(f"{prefix}speedup_ci_low"), rec.get(f"{prefix}speedup_ci_high")
        lo = float(lo) if isinstance(lo, (int, float)) and math.isfinite(lo) else math.nan
        hi = float(hi) if isinstance(hi, (int, float)) and math.isfinite(hi) else math.nan
        out.append({"batch": batch, "kind": kind, "speedup": float(v), "lo": lo, "hi": hi,
                    "wide": bool(speedup_is_wide(rec, prefix))})

    add(1, "latency", r)
    tb = r.get("throughput_batch")
    if isinstance(tb, (int, float)) and not isinstance(tb, bool) and math.isfinite(tb):
        add(int(tb), "throughput", r, "throughput_")
    raw = r.get("timing_batches")
    if isinstance(raw, str) and raw:
        try:
            batches = json.loads(raw)
        except ValueError:
            batches = {}
        for key, e in (batches.items() if isinstance(batches, dict) else ()):
            if isinstance(e, dict) and str(key).isdigit():
                add(int(key), "batch", {"speedup": e.get("speedup"), "speedup_ci_low": e.get("ci_low"),
                                        "speedup_ci_high": e.get("ci_high"), "speedup_reliable": e.get("reliable")})
    return out


def conversion_points(df: pd.DataFrame, task: str, source: str | None = None,
                      panel_by: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str, int]:
    """The points of the conversion plot of ``task``: ``(points, rows, source, left_out)``.

    ``panel_by``: a column whose value starts each point's ``device`` label, so rows that differ in it get panel rows
    of their own (``lwbench speed``'s grid: one per backbone and size).

    ``points`` has one row per (replicate group, batch size): rows that differ only in their seed are averaged
    (their ``wide`` is true if any seed's interval is). Columns: ``method``, ``line`` (the method, ``(off the
    shelf)`` appended for that regime), ``budget``, ``bv``, ``gmac_ratio``, ``batch``, ``kind``, ``speedup``,
    ``lo``, ``hi``, ``wide``, ``device``, ``mode`` and ``panel`` (device, timing mode, batch). ``rows`` are the rows
    of the task and source; ``left_out`` counts the non-reference rows without a paired speed-up or a GMAC ratio
    (older rows, timed one model per process), which are not drawn.
    """
    import pandas as pd

    d, source = _task_source(df, task, source)
    keys = _replicate_keys(d)
    recs, left_out = [], 0
    for (_, r), rep in zip(d.iterrows(), keys, strict=True):
        if r.get("method") == REFERENCE_METHOD:
            continue  # the reference is (1, 1) by definition
        g = r.get("gmac_ratio")
        entries = _batch_entries(r) if isinstance(g, (int, float)) and math.isfinite(g) and g > 0 else []
        if not entries:
            left_out += 1
            continue
        line = str(r["method"]) + (f" {OFF_THE_SHELF}" if r.get("regime") == "off_the_shelf" else "")
        device = ", ".join(b for b in (_device(r), _threads(r)) if b)
        if panel_by is not None:
            device = f"{r.get(panel_by)} · {device}"
        for e in entries:
            recs.append({"rep": rep, "method": str(r["method"]), "line": line, "budget": str(r.get("budget", "-")),
                         "bv": _number(r.get("budget_value")),
                         "gmac_ratio": float(g), "device": device, "mode": _timing_mode(r), **e})
    cols = ["method", "line", "budget", "bv", "gmac_ratio", "batch", "kind", "speedup", "lo", "hi", "wide", "device",
            "mode"]
    if not recs:
        return pd.DataFrame(columns=[*cols, "panel"]), d, source, left_out
    p = pd.DataFrame(recs)
    g = p.groupby(["rep", "line", "device", "mode", "batch"], sort=False, dropna=False)
    p = g.agg(method=("method", "first"), budget=("budget", "first"), bv=("bv", "first"),
              gmac_ratio=("gmac_ratio", "mean"), kind=("kind", "first"), speedup=("speedup", "mean"),
              lo=("lo", "mean"), hi=("hi", "mean"), wide=("wide", "any")).reset_index()
    p["panel"] = list(zip(p["device"], p["mode"], p["batch"], strict=True))
    return p[[*cols, "panel"]], d, source, left_out


def _conversion_title(d: pd.DataFrame, task: str, source: str, pts: pd.DataFrame, left_out: int,
                      devices: list[str], modes: list[str], panel_by: str | None = None) -> str:
    head = (f"{task} · {'SYNTHETIC data' if source == 'synthetic' else f'{source} data'} · "
            f"speed-up over {REFERENCE_METHOD} vs its MAC reduction (conversion)")
    bits = []
    backbones, sizes = _one(d.get("backbone", [])), _one(d.get("img_size", []))
    if backbones:
        bits.append(", ".join(backbones) + (f" @ {sizes[0]}" if len(sizes) == 1 else ""))
    profiles = _one(d.get("profile", []))
    if len(profiles) == 1:
        bits.append(f"profile {profiles[0]}")
    if len(devices) == 1:
        # one panel row: the panel_by value that starts its label is the backbone and size said above
        bits.append(devices[0].split(" · ", 1)[-1] if panel_by is not None else devices[0])
    if len(modes) == 1:
        bits.append(modes[0])
    bits.append("bars: 95% bootstrap interval over balanced pairs of timing rounds")
    wide = int(pts["wide"].sum())
    if wide:
        bits.append(f"hollow, faded: {wide} point(s) whose interval is wide (high/low > {WIDE_RATIO:g}: the machine "
                    f"was too busy to time them)")
    if left_out:
        bits.append(f"{left_out} row(s) without a paired speed-up (older protocol) left out")
    return head + "\n" + " · ".join(bits)


def conversion_figure(df: pd.DataFrame, task: str, source: str | None = None, panel_by: str | None = None) -> Figure:
    """How much of each method's MAC saving becomes time on ``task`` (an Agg-backed ``Figure``, no pyplot state).

    x: ``gmac_ratio`` (how many times fewer MACs than ``full``), y: the speed-up over ``full`` timed paired, with
    its 95% interval as a vertical bar; both axes log-scaled over the same range, so the diagonal (speed-up = GMAC
    ratio, conversion 1: all of the saving became time) runs at 45°, with fainter lines for conversion 0.5 and
    0.25. One panel per (device, timing mode, batch size): batch 1 from ``speedup``, the throughput batch from
    ``throughput_speedup``, more from ``timing_batches``. Every method in its own colour and marker
    (:func:`method_style`, as on the Pareto plots), joined by a thin line over its budgets (dashed off the shelf);
    points whose interval is wide (the machine was too busy) hollow and faded; ``full`` at (1, 1). Rows without
    a paired speed-up are left out with one notice saying how many. ``panel_by``: a column that splits the panel
    rows further (:func:`conversion_points`).
    """
    import seaborn as sns
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    pts, d, source, left_out = conversion_points(df, task, source, panel_by)
    if left_out:
        _notice(f"{left_out} {source} row(s) of '{task}' have no paired speed-up (timed one model per process, "
                f"before paired timing) and are left out of the conversion plot")
    if pts.empty:
        raise LwbenchError(f"no {source} results for task '{task}' have a paired speed-up to plot; rerun them "
                           f"(lwbench run ... --force) to time them against {REFERENCE_METHOD}")
    # A grid: one row per (device, timing mode), one column per batch size.
    panels = sorted(dict.fromkeys(pts["panel"]), key=lambda k: (k[0], k[1], k[2]))
    groups = list(dict.fromkeys((dev, mode) for dev, mode, _ in panels))
    columns = sorted({b for _, _, b in panels})
    devices, modes = list(dict.fromkeys(pts["device"])), list(dict.fromkeys(pts["mode"]))

    vals = np.concatenate([pts["gmac_ratio"], pts["speedup"], pts["lo"], pts["hi"], [1.0]]).astype(float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    ticks, lim = log_ticks(float(vals.min()), float(vals.max()))
    lim = (lim[0] / 1.06, lim[1] * 1.06)  # room for the reference's marker at (1, 1) in the corner
    full_color, full_marker = method_style(REFERENCE_METHOD)
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    nrows, ncols = len(groups), len(columns)
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(max(7.5, 4.6 * ncols + 0.8), 4.6 * nrows + 2.4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        handles: dict[str, Any] = {}
        for panel in panels:
            row, col = groups.index(panel[:2]), columns.index(panel[2])
            ax = axes[row][col]
            ax.set_gid(f"panel:batch {panel[2]}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(*lim)
            ax.set_ylim(*lim)
            ax.set_aspect("equal", adjustable="box")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(FixedLocator(ticks))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_locator(NullLocator())
                axis.set_minor_formatter(NullFormatter())
            grid = np.array(lim)
            for c in CONVERSION_LINES:  # lines of constant conversion: y = c * x
                main = c == 1.0
                ax.plot(grid, c * grid, color="0.25" if main else "0.55", lw=1.4 if main else 0.9,
                        ls="-" if main else "--", alpha=0.9 if main else 0.6, zorder=1, gid=f"conversion_{c:g}")
                xa = min(lim[1] / 1.5, lim[1] / c / 1.5)  # near the line's upper end inside the axes
                ax.annotate("conversion 1: speed-up = GMAC ratio" if main else f"conversion {c:g}", (xa, c * xa),
                            rotation=45, rotation_mode="anchor", ha="right", va="bottom", fontsize=7.5,
                            color="0.25" if main else "0.5", xytext=(0, 2), textcoords="offset points",
                            gid=f"conversion_label_{c:g}", path_effects=halo, transform_rotates_text=True)
            ax.axhline(1.0, color="0.5", lw=0.8, ls=":", zorder=1, gid="no_speedup")
            ax.scatter([1.0], [1.0], s=180, c=[full_color], marker=full_marker, edgecolors="white", linewidths=0.9,
                       zorder=4, gid="reference")
            handles.setdefault(REFERENCE_METHOD, Line2D([], [], ls="none", marker=full_marker, markersize=11,
                                                        markerfacecolor=full_color, markeredgecolor="white",
                                                        label=f"{REFERENCE_METHOD} (the reference, at 1, 1)"))
            here = pts[pts["panel"] == panel]
            labels, paths = [], []
            # more methods than budget labels can be placed legibly (a speed reference's 20-odd): markers only
            crowded = here["line"].nunique() > CROWDED_LINES
            for line in dict.fromkeys(here["line"]):
                lp = here[here["line"] == line].sort_values(["gmac_ratio", "bv"])
                method = str(lp["method"].iloc[0])
                color, marker = method_style(method)
                off = line.endswith(OFF_THE_SHELF)
                ax.plot(lp["gmac_ratio"], lp["speedup"], color=color, lw=1.0, alpha=0.5, ls="--" if off else "-",
                        zorder=2)
                paths.append(lp[["gmac_ratio", "speedup"]].to_numpy())
                bar = lp[np.isfinite(lp["lo"]) & np.isfinite(lp["hi"])]
                if len(bar):
                    eb = ax.errorbar(bar["gmac_ratio"], bar["speedup"],
                                     yerr=[np.maximum(bar["speedup"] - bar["lo"], 0),
                                           np.maximum(bar["hi"] - bar["speedup"], 0)],
                                     fmt="none", ecolor=color, elinewidth=1.2, capsize=3, capthick=1.2, alpha=0.8,
                                     zorder=2.5)
                    for c in eb.lines[2]:
                        c.set_gid("speedup_interval")
                    paths.extend(np.array([[r.gmac_ratio, r.lo], [r.gmac_ratio, r.hi]]) for r in bar.itertuples())
                ok, wide = lp[~lp["wide"]], lp[lp["wide"]]
                if len(ok):
                    ax.scatter(ok["gmac_ratio"], ok["speedup"], s=70, c=[color], marker=marker,
                               edgecolors=filled_edge(marker, color),
                               linewidths=0.8, zorder=3, gid=f"points:{line}")
                if len(wide):
                    ax.scatter(wide["gmac_ratio"], wide["speedup"], s=70, facecolors="white", marker=marker,
                               edgecolors=[color], linewidths=1.4, alpha=0.55, zorder=3, gid=f"wide:{line}")
                keys = {b.partition("=")[0] for b in lp["budget"] if "=" in b}
                key = keys.pop() if len(keys) == 1 else None
                for r in lp.itertuples():
                    if r.budget in ("-", "", "nan") or crowded:
                        continue
                    text = r.budget.partition("=")[2] if key else r.budget
                    labels.append(ax.annotate(text, (r.gmac_ratio, r.speedup), xytext=(7, 6),
                                              textcoords="offset points", fontsize=7.5, color=color, zorder=5,
                                              path_effects=halo))
                handles.setdefault(line, Line2D([], [], color=color, marker=marker, lw=1.0, markersize=8,
                                                ls="--" if off else "-", markerfacecolor=color,
                                                markeredgecolor=filled_edge(marker, color),
                                                label=f"{line} ({key})" if key else line))
            kind = str(here["kind"].iloc[0])
            what = {"latency": "latency", "throughput": "throughput batch"}.get(kind, "")
            # several devices or timing modes (or lwbench speed's geometries): each panel names its own, wrapped
            group = textwrap.fill(f"{panel[0]} · {panel[1]}", 64) + "\n" if len(groups) > 1 else ""
            ax.set_title(f"{group}batch {panel[2]}" + (f" ({what})" if what else ""), fontsize=9.5)
            if row == max(groups.index(q[:2]) for q in panels if q[2] == panel[2]):  # the column's lowest panel
                ax.set_xlabel(f"GMAC ratio: × fewer MACs than {REFERENCE_METHOD} (log)")
            if col == min(columns.index(q[2]) for q in panels if q[:2] == panel[:2]):  # the row's first panel
                ax.set_ylabel(f"speed-up over {REFERENCE_METHOD} (×, log)")
                ax.tick_params(labelleft=True)
            ax.tick_params(labelbottom=True)
            if labels:
                _place_labels(fig, ax, labels, here[["gmac_ratio", "speedup"]].to_numpy(), paths)
        for row, group in enumerate(groups):  # a batch not timed on this device / in this mode: no panel
            for col, b in enumerate(columns):
                if (*group, b) not in panels:
                    axes[row][col].set_visible(False)

        legend = [*handles.values()]
        if bool(pts["wide"].any()):
            legend.append(Line2D([], [], ls="none", marker="o", markersize=8, markerfacecolor="white",
                                 markeredgecolor="0.3", markeredgewidth=1.4, alpha=0.55,
                                 label=f"hollow, faded: interval wide (> {WIDE_RATIO:g}x), machine too busy"))
        legend.append(Line2D([], [], color="0.25", lw=1.4, label="conversion 1 (speed-up = GMAC ratio)"))
        legend.append(Line2D([], [], color="0.55", lw=0.9, ls="--", alpha=0.6,
                             label="conversion " + ", ".join(f"{c:g}" for c in CONVERSION_LINES if c != 1.0)))
        title = _conversion_title(d, task, source, pts, left_out, devices, modes, panel_by)
        _fit_suptitle(fig, title, x=0.01, ha="left",
                      fontsize=10.5, color="firebrick" if source == "synthetic" else "black")
        _fit_legend(fig, legend, min(len(legend), 3), frameon=False, fontsize=8.5, title="method (budget key)",
                    title_fontsize=8.5, columnspacing=1.6)
    return fig


def conversion_plot(df: pd.DataFrame, task: str, out: str | os.PathLike[str] | None = None,
                    source: str | None = None, dpi: int = 150) -> Path:
    """The conversion plot of ``task`` (:func:`conversion_figure`) written to ``out`` (default
    ``conversion_<task>.png``), atomically; returns the path."""
    fig = conversion_figure(df, task, source=source)
    return save_figure(fig, Path(out) if out is not None else Path(f"conversion_{task}.png"), dpi)
