"""Pareto plots: accuracy against cost for every method on one task, the frontier highlighted.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas instead of pyplot, so
plotting never switches the caller's backend or needs a display. A plot shows one data source
only: synthetic and real numbers answer different questions and are never drawn together.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lwbench.errors import ConfigError, LwbenchError
from lwbench.paths import temp_beside
from lwbench.results import SOURCES, metric_label

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

X_AXES = {
    "gmacs": "GMACs (multiply-accumulates)",
    "latency_ms": "latency, batch 1 (ms)",
    "throughput": "throughput (img/s)",
}
X_HIGHER_BETTER = {"gmacs": False, "latency_ms": False, "throughput": True}
MEM_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss_delta": "CPU: weights + peak RSS growth"}
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">", "p", "*")


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


def _select(df: pd.DataFrame, task: str, x: str, source: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of one task and one source with a usable x and metric; the source actually plotted."""
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis '{x}' for a Pareto plot; use one of {', '.join(X_AXES)}")
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
    d = d[d["source"] == source]
    metrics = list(dict.fromkeys(d["metric"]))
    if len(metrics) > 1:
        _notice(f"task '{task}' rows report several metrics {metrics}; plotting {metrics[0]}")
        d = d[d["metric"] == metrics[0]]
    xv = d[x].astype(float) if x in d.columns else np.full(len(d), np.nan)
    ok = np.isfinite(xv) & (xv > 0) & np.isfinite(d["metric_value"].astype(float))
    if not ok.all():
        gone = d.loc[~ok, ["method", "budget"]].astype(str).agg(" ".join, axis=1)
        _notice(f"{len(gone)} {source} row(s) of '{task}' have no {x} (not measured?) and are left out: "
                f"{', '.join(sorted(set(gone))[:6])}{' ...' if len(set(gone)) > 6 else ''}")
    d = d[ok]
    if d.empty:
        raise LwbenchError(f"no {source} results for task '{task}' have a {x} value to plot; "
                           f"measure it or plot another x (--x {', '.join(k for k in X_AXES if k != x)})")
    return d, source


def _replicate_keys(d: pd.DataFrame) -> pd.Series:
    """The replicate group of each row: its ``replicate_id`` (the config hash without the seed), or a key of its
    own for rows without one (older result files), which are never averaged with anything."""
    import pandas as pd

    own = pd.Series([f"\0row{i}" for i in range(len(d))], index=d.index)
    if "replicate_id" not in d.columns:
        return own
    rid = d["replicate_id"]
    ok = rid.map(lambda v: isinstance(v, str) and bool(v))
    return rid.where(ok, own).astype(str)


TIMING_MODE = ("compile", "autocast", "device", "threads")


def _aggregate(d: pd.DataFrame, x: str, task: str = "") -> pd.DataFrame:
    """One point per replicate group: rows that differ only in their seed (same ``replicate_id``) are averaged.

    Lines are methods, split by backbone/profile/size if those are mixed. Different configs at one budget of a
    line (different ``replicate_id``) stay separate points, with one notice naming them. Columns: ``line``,
    ``budget``, ``method``, ``x``, ``y`` (means), ``ylo``/``yhi`` (min/max over the seeds), ``mem``, ``bv``,
    ``n`` (rows) and ``nseeds`` (distinct seeds; rows without a seed count one each).
    """
    import pandas as pd

    d = d.copy()
    label = d["method"].astype(str)
    # Timings taken compiled and eager, in another precision or on another device are different measurements:
    # on a timing axis they are never averaged or joined into one line, each is its own line, named.
    timing = TIMING_MODE if x in ("latency_ms", "throughput") else ()
    for col in ("backbone", "profile", "img_size", *timing):
        if col in d.columns and d[col].astype(str).nunique() > 1:
            label = label + " · " + (f"{col} " if col in timing else "") + d[col].astype(str)
    if "regime" in d.columns:  # never mix regimes silently: off-the-shelf rows are their own (dashed) lines
        label = label.where(d["regime"] != "off_the_shelf", label + " " + OFF_THE_SHELF)
    d["_line"] = label
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
    g = d.groupby(["_line", "_budget", "_rep"], sort=False, dropna=False)
    agg = pd.DataFrame({
        "method": g["method"].first(), "x": g["_x"].mean(), "y": g["_y"].mean(), "ystd": g["_y"].std(ddof=1),
        "cilo": g["_metric_ci_low"].mean(), "cihi": g["_metric_ci_high"].mean(),
        "mem": g["_mem"].mean(), "bv": g["_bv"].first(), "n": g.size(), "nseeds": g["_seed"].nunique(),
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
    devices = []
    for _, r in d.drop_duplicates([c for c in ("device", "device_name") if c in d.columns]).iterrows():
        name = r.get("device_name") if isinstance(r.get("device_name"), str) and r.get("device_name") else None
        dev = r.get("device") if isinstance(r.get("device"), str) else None
        text = f"{dev}: {name}" if dev and name else (name or dev)
        if text and text not in devices:
            devices.append(text)
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


def _effort_note(d: pd.DataFrame) -> str:
    """Says on the figure when its points did not get equal effort: rows from different task-trained
    backbones, or methods trained on top of the shared one beside methods that were not."""
    bits = []
    teachers = _one(d.get("teacher_id", []))
    if len(teachers) > 1:
        bits.append(f"{len(teachers)} different teachers")
    if "regime" in d.columns and d["regime"].notna().all():
        from lwbench.results import recipe_note

        note = recipe_note(d.assign(teacher_id=d.get("teacher_id", "")).drop(columns="teacher_id"))
        if note:
            bits.append(note.removeprefix("not equal-effort: "))
    elif "method_train_time_s" in d.columns:
        secs = d.groupby("method")["method_train_time_s"].max()
        trained, untrained = sorted(secs[secs > 0].index), sorted(secs[~(secs > 0)].index)
        if trained and untrained:
            bits.append(f"{', '.join(trained)} trained on top of the teacher, {', '.join(untrained)} not")
    return f"not equal-effort: {'; '.join(bits)}" if bits else ""


OFF_THE_SHELF = "(off the shelf)"

_LABEL_SPOTS = ((7, 6, "left", "bottom"), (7, -6, "left", "top"), (-7, 6, "right", "bottom"),
                (-7, -6, "right", "top"), (0, 11, "center", "bottom"), (0, -11, "center", "top"))


def _place_labels(fig: Any, ax: Any, labels: list[Any], points: np.ndarray, paths: list[np.ndarray],
                  marker_px: float = 7.0) -> None:
    """Greedy label placement: each budget label takes the first spot around its marker that overlaps no
    marker, method line or earlier label (else the least-overlapping spot), so crowded clusters stay legible."""
    if not labels:
        return
    fig.draw_without_rendering()  # settle the constrained layout, so display coordinates are final
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(points)
    r = marker_px * fig.dpi / 72.0
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
    out = Path(out) if out is not None else Path(f"pareto_{task}_{x}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    tmp = temp_beside(out.parent, out.stem, suffix=f".{fmt}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def pareto_figure(df: pd.DataFrame, task: str, x: str = "gmacs", source: str | None = None) -> Figure:
    """The Pareto figure of ``task`` (an Agg-backed ``matplotlib.figure.Figure``, no pyplot state).

    One line with markers per method (sorted by ``x``; split by backbone/profile/size if those vary),
    log-scaled x, the Pareto frontier over all points as a thick grey step line with ringed markers
    (for throughput higher is better and the frontier flips), markers filled by peak memory (colorbar)
    and labelled with their budget. Rows that differ only in their seed (one ``replicate_id``) are
    averaged into one point with min..max error bars; different configs at one budget stay separate
    points, with a notice. With both sources in ``df`` only ``source`` (default: the real one) is drawn,
    with a notice; the title says SYNTHETIC for synthetic data.
    """
    import matplotlib as mpl
    import seaborn as sns
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    d, source = _select(df, task, x, source)
    agg = _aggregate(d, x, task)
    higher = X_HIGHER_BETTER[x]
    agg["front"] = pareto_front(agg[["x", "y"]].to_numpy(), x_higher_better=higher)
    agg["tied"] = tied_with_front(agg, higher)
    metric = str(d["metric"].iloc[0])
    mem_kinds = [MEM_KINDS.get(k, k) for k in _one(d.get("mem_kind", []))]
    has_mem = bool(np.isfinite(agg["mem"]).any())

    lines = list(dict.fromkeys(agg["line"]))
    palette = sns.color_palette("tab10" if len(lines) <= 10 else "husl", len(lines))
    cmap = mpl.colormaps["viridis"].with_extremes(bad="white")
    mems = agg["mem"][np.isfinite(agg["mem"])]
    lo, hi = (float(mems.min()), float(mems.max())) if has_mem else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    norm = mpl.colors.Normalize(lo, hi)

    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(9.0, 5.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_xscale("log")

        # Frontier first, so it sits underneath everything.
        fr = agg[agg["front"]].sort_values(["x", "y"])
        ax.step(fr["x"], fr["y"], where="pre" if higher else "post", color="0.15", lw=7, alpha=0.16,
                solid_capstyle="round", zorder=1)

        halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
        handles, labels, paths = [], [], []
        for i, line in enumerate(lines):
            color, marker = palette[i], _MARKERS[i % len(_MARKERS)]
            pts = agg[agg["line"] == line].sort_values(["x", "bv", "y"])
            style = "--" if line.endswith(OFF_THE_SHELF) else "-"
            ax.plot(pts["x"], pts["y"], color=color, lw=1.8, alpha=0.9, zorder=2, ls=style)
            paths.append(pts[["x", "y"]].to_numpy())
            spread = pts[np.isfinite(pts["ylo"]) & np.isfinite(pts["yhi"])]
            if len(spread):  # seeds' std, or the bootstrap interval
                ax.errorbar(spread["x"], spread["y"], yerr=[spread["y"] - spread["ylo"], spread["yhi"] - spread["y"]],
                            fmt="none", ecolor=color, elinewidth=1.3, capsize=3.5, capthick=1.3, alpha=0.85,
                            zorder=2.5)
                paths.extend(np.array([[r.x, r.ylo], [r.x, r.yhi]]) for r in spread.itertuples())
            face = pts["mem"].to_numpy() if has_mem else None
            ax.scatter(pts["x"], pts["y"], c=face if has_mem else [color], cmap=cmap if has_mem else None,
                       norm=norm if has_mem else None, marker=marker, s=70, edgecolors=[color], linewidths=1.8,
                       zorder=3, plotnonfinite=True)
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
                                  markerfacecolor="white", markeredgecolor=color, markeredgewidth=1.8,
                                  label=f"{line} ({key})" if key else line))
        ax.scatter(fr["x"], fr["y"], s=260, facecolors="none", edgecolors="black", linewidths=1.6, zorder=4,
                   gid="pareto_frontier")
        handles.append(Line2D([], [], color="0.15", lw=7, alpha=0.16, marker="o", markersize=14,
                              markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.6,
                              label="Pareto frontier"))
        tied = agg[agg["tied"]]
        if len(tied):
            ax.scatter(tied["x"], tied["y"], s=260, facecolors="none", edgecolors="black", linewidths=1.2,
                       linestyles=":", zorder=4, gid="tied_with_frontier")
            handles.append(Line2D([], [], ls="none", marker="o", markersize=14, markerfacecolor="none",
                                  markeredgecolor="black", markeredgewidth=1.2, label="tied with the frontier (bars overlap)"))

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel(X_AXES[x] + ("  →  better" if higher else "  ←  better"))
        ax.set_ylabel(metric_label(metric) + "  (↑ better)")
        head, sub = _title(d, task, source, x, agg["nseeds"])
        # A figure title (not an axes title) so constrained layout keeps it clear of the outside legend.
        fig.suptitle(f"{head}\n{sub}" if sub else head, x=0.01, ha="left", fontsize=10.5,
                     color="firebrick" if source == "synthetic" else "black")
        if has_mem:
            sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
            label = "peak memory (MB)" + (f"\n{', '.join(mem_kinds)}" if mem_kinds else "")
            fig.colorbar(sm, ax=ax, label=label, pad=0.01, fraction=0.04, aspect=30)
        # Below the axes, so the title can use the full width and no point is ever covered.
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False,
                   fontsize=8.5, title="method (budget key)" + ("; marker fill = peak memory" if has_mem else ""),
                   title_fontsize=8.5, columnspacing=1.6)
        _place_labels(fig, ax, labels, agg[["x", "y"]].to_numpy(), paths)

    return fig
