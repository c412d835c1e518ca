from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lwbench.errors import ConfigError, LwbenchError
from lwbench.plots import pareto_figure, pareto_front, pareto_plot

# -- pareto_front --------------------------------------------------------------------------------------


def brute_force_front(pts: np.ndarray, x_higher_better: bool = False) -> np.ndarray:
    """The definition, O(N^2): i is on the front unless some j is at least as good on both axes and better on one."""
    x = -pts[:, 0] if x_higher_better else pts[:, 0]
    y = pts[:, 1]
    out = np.zeros(len(pts), dtype=bool)
    for i in range(len(pts)):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        dominated = (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        out[i] = not dominated.any()
    return out


def test_front_known_answer_with_ties():
    pts = [(1, 50), (2, 60), (2, 55), (3, 58), (4, 70), (4, 70), (5, 65), (0.5, 40), (6, 70)]
    # (2,55): same cost as (2,60) but worse. (3,58): costlier and worse than (2,60).
    # (4,70) twice: exact duplicates are both on the front. (6,70): same accuracy at more cost.
    assert pareto_front(pts).tolist() == [True, True, False, False, True, True, False, True, False]


def test_front_throughput_direction_flips():
    pts = [(10, 80), (20, 70), (5, 75), (20, 60), (40, 50), (40, 50)]
    # throughput: higher x is better, so (5, 75) is beaten by (10, 80) which is faster and more accurate
    assert pareto_front(pts, x_higher_better=True).tolist() == [True, True, False, False, True, True]
    # as a cost (lower x better) the same points give a different front
    assert pareto_front(pts).tolist() == [True, False, True, False, False, False]


def test_front_nan_empty_single_and_lower_is_better_metric():
    assert pareto_front(np.zeros((0, 2))).tolist() == []
    assert pareto_front([]).tolist() == []
    assert pareto_front([(3, 1)]).tolist() == [True]
    assert pareto_front([(1, math.nan), (2, 5), (math.nan, 9)]).tolist() == [False, True, False]
    assert pareto_front([(1, 0.3), (2, 0.1), (3, 0.2)], y_higher_better=False).tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        pareto_front([1, 2, 3])


@pytest.mark.parametrize("higher", [False, True])
def test_front_matches_definition_on_random_grids(higher):
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = rng.integers(0, 6, size=(rng.integers(1, 30), 2)).astype(float)  # coarse grid -> many ties
        assert pareto_front(pts, x_higher_better=higher).tolist() == brute_force_front(pts, higher).tolist()


# -- plots --------------------------------------------------------------------------------------------


def frame(sources=("synthetic",), with_mem=True):
    rows = []
    spec = {"lookwhere": [(16, 0.3, 62.0), (64, 0.9, 78.0), (128, 1.7, 80.0)],
            "random": [(16, 0.28, 40.0), (64, 0.85, 60.0)],
            "tome": [(4, 2.6, 80.5), (8, 2.0, 76.0)]}
    for source, (method, pts) in itertools.product(sources, spec.items()):
        for k, g, acc in pts:
            key = "r" if method == "tome" else "k"
            rows.append(dict(method=method, budget=f"{key}={k}", budget_key=key, budget_value=float(k),
                             task="traffic_signs", source=source, backbone="lw_vit_test_p8", img_size="64x64",
                             profile="quick", seed=0, metric="top1", metric_value=acc - (5 if source == "real" else 0),
                             gmacs=g, latency_ms=1 + 3 * g, throughput=300 / g,
                             peak_mem_mb=10 + 5 * g if with_mem else math.nan, mem_kind="cpu_peak_rss_delta",
                             device="cpu", device_name="Test CPU", threads=1,
                             replicate_id=f"{source}-{method}-{key}{k}"))
    rows.append(dict(method="full", budget="-", budget_key="-", budget_value=math.nan, task="other",
                     source="synthetic", metric="top1", metric_value=1.0, gmacs=1.0))
    return pd.DataFrame(rows)


def drawn_points(fig):
    """(x, y) of the markers of the method lines (frontier rings and error bars excluded: they have no face)."""
    ax = fig.axes[0]
    pts = [c.get_offsets() for c in ax.collections if len(c.get_facecolors())]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def frontier_rings(fig):
    return np.asarray(next(c for c in fig.axes[0].collections if c.get_gid() == "pareto_frontier").get_offsets())


def error_bars(fig):
    """(x, ylo, yhi) of every vertical error bar drawn (the metric's interval or spread over seeds)."""
    from matplotlib.collections import LineCollection

    segs = [seg for c in fig.axes[0].collections if isinstance(c, LineCollection) and c.get_gid() != "timing_iqr"
            for seg in c.get_segments()]
    return sorted((float(a[0]), float(a[1]), float(b[1])) for a, b in segs)


def test_plot_writes_png(tmp_path):
    out = pareto_plot(frame(), "traffic_signs", x="gmacs", out=tmp_path / "sub" / "p.png")
    assert out == tmp_path / "sub" / "p.png" and out.stat().st_size > 20_000
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 500
    assert [p.name for p in out.parent.iterdir()] == ["p.png"]  # temp file replaced


def test_figure_content_gmacs():
    fig = pareto_figure(frame(), "traffic_signs", x="gmacs")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel().startswith("GMACs (multiply-accumulates, log scale)")
    assert ax.get_ylabel().startswith("top1 (%)")
    title = fig._suptitle.get_text()
    assert "traffic_signs" in title and "SYNTHETIC" in title and "lw_vit_test_p8" in title and "Test CPU" in title
    assert len(drawn_points(fig)) == 7  # every point once
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["lookwhere (k)", "random (k)", "tome (r)", "Pareto frontier"]
    assert len(fig.axes) == 1 and len(fig.legends) == 2  # memory: marker area, decoded by a size legend
    sizes = fig.legends[1]  # the methods' legend is the first
    assert "peak memory" in sizes.get_title().get_text()
    # 10 + 5 * gmacs; CPU peak RSS is approximate (it moves with the allocator's state), and says so
    assert [t.get_text() for t in sizes.get_texts()] == ["~11.4 MB", "~17.2 MB", "~23 MB"]
    assert "approximate" in sizes.get_title().get_text()
    # frontier rings sit exactly on the Pareto-optimal points
    rings = frontier_rings(fig)
    assert error_bars(fig) == []  # one seed per point: no spread to show
    assert "mean of" not in title
    assert sorted(map(tuple, rings)) == [(0.28, 40.0), (0.3, 62.0), (0.9, 78.0), (1.7, 80.0),
                                                     (2.6, 80.5)]
    texts = {t.get_text() for t in ax.texts}
    assert {"16", "64", "128", "4", "8"} <= texts


def test_figure_throughput_frontier_flips():
    fig = pareto_figure(frame(), "traffic_signs", x="throughput")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("throughput (img/s, log scale)")
    rings = frontier_rings(fig)
    # lookwhere k=16 (1000 img/s, 62 %) is fast and good; random k=16 (~1071 img/s, 40 %) is the fastest
    got = sorted((round(x), y) for x, y in rings)
    assert got == [(115, 80.5), (176, 80.0), (333, 78.0), (1000, 62.0), (1071, 40.0)]
    assert "Test CPU" in fig._suptitle.get_text() and "1 thread" in fig._suptitle.get_text()


def test_sources_never_mixed(tmp_path):
    df = frame(sources=("synthetic", "real"))
    with pytest.warns(UserWarning, match="plotting only real"):
        fig = pareto_figure(df, "traffic_signs")
    ys = drawn_points(fig)[:, 1]
    assert len(ys) == 7 and max(ys) == 75.5  # real accuracies are 5 points lower in this frame
    assert "SYNTHETIC" not in fig._suptitle.get_text() and "real data" in fig._suptitle.get_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = pareto_figure(df, "traffic_signs", source="synthetic")
    assert max(drawn_points(fig)[:, 1]) == 80.5 and "SYNTHETIC" in fig._suptitle.get_text()
    with pytest.raises(LwbenchError, match="no real results for task 'traffic_signs'; it has synthetic"):
        pareto_figure(frame(), "traffic_signs", source="real")


def test_seeds_are_averaged_and_rows_without_x_are_left_out():
    df = frame()
    extra = df.iloc[[0]].assign(seed=1, metric_value=64.0)  # lookwhere k=16 again: 62 and 64 -> 63
    df = pd.concat([df, extra, df.iloc[[1]].assign(budget="k=999", latency_ms=math.nan)], ignore_index=True)
    with pytest.warns(UserWarning, match="1 synthetic row.* no latency_ms .*lookwhere k=999"):
        fig = pareto_figure(df, "traffic_signs", x="latency_ms")
    pts = drawn_points(fig)
    assert len(pts) == 7 and 63.0 in pts[:, 1] and 62.0 not in pts[:, 1]
    assert "mean of 1-2 seeds per point, bars ± std over seeds" in fig._suptitle.get_text()  # the others have one seed
    bar = error_bars(fig)  # latency 1 + 3 * 0.3 ms, accuracies 62 and 64: mean 63 ± std sqrt(2)
    assert len(bar) == 1 and bar[0] == pytest.approx((1.9, 63 - 2 ** 0.5, 63 + 2 ** 0.5))


def test_same_replicate_two_seeds_is_one_point_with_its_spread():
    base = frame().iloc[[0]]  # lookwhere k=16, seed 0, 62 %
    df = pd.concat([base, base.assign(seed=1, metric_value=66.0)], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same config: nothing to warn about
        fig = pareto_figure(df, "traffic_signs")
    assert drawn_points(fig).tolist() == [[0.3, 64.0]]
    bar = error_bars(fig)  # 62 and 66: mean 64 ± std 2 sqrt(2)
    assert len(bar) == 1 and bar[0] == pytest.approx((0.3, 64 - 8 ** 0.5, 64 + 8 ** 0.5))
    assert "mean of 2 seeds" in fig._suptitle.get_text()


def test_different_configs_at_one_budget_are_not_averaged():
    base = frame().iloc[[0]]  # lookwhere k=16, seed 0
    # same method, budget and seed, but a different finetune length: another config, another replicate_id
    other = base.assign(replicate_id="lookwhere-k16-finetune.steps=500", metric_value=70.0)
    third = base.assign(replicate_id="lookwhere-k16-finetune.steps=50", metric_value=58.0)
    df = pd.concat([base, other, third], ignore_index=True)
    with pytest.warns(UserWarning, match=r"traffic_signs: lookwhere k=16 has 3 different configs; drawn as separate "
                                         r"points \(filter the results to compare like with like\)") as rec:
        fig = pareto_figure(df, "traffic_signs")
    assert sum("different configs" in str(w.message) for w in rec) == 1  # once, not once per point
    assert sorted(drawn_points(fig)[:, 1].tolist()) == [58.0, 62.0, 70.0]  # never the mean, 63.3
    assert "mean of" not in fig._suptitle.get_text() and error_bars(fig) == []


def test_mixed_seed_counts_and_old_rows_are_titled_truthfully():
    df = frame()
    lw16, lw64 = df.iloc[[0]], df.iloc[[1]]
    df = pd.concat([df, lw16.assign(seed=1, metric_value=64.0), lw16.assign(seed=2, metric_value=66.0),
                    lw64.assign(seed=1, metric_value=80.0)], ignore_index=True)
    fig = pareto_figure(df, "traffic_signs")
    assert "mean of 1-3 seeds per point" in fig._suptitle.get_text()
    ys = drawn_points(fig)[:, 1].tolist()
    assert len(ys) == 7 and 64.0 in ys and 79.0 in ys  # (62 + 64 + 66) / 3 and (78 + 80) / 2
    bars = error_bars(fig)  # 62, 64, 66: 64 ± 2; 78, 80: 79 ± sqrt(2)
    expected = [(0.3, 62.0, 66.0), (0.9, 79 - 2 ** 0.5, 79 + 2 ** 0.5)]
    assert len(bars) == len(expected)  # pytest.approx takes flat sequences only (pytest >= 9.2 refuses nesting)
    for got, want in zip(bars, expected, strict=True):
        assert list(got) == pytest.approx(list(want))
    # old result files have no replicate_id: seed replicates cannot be told from other configs, so no averaging
    old = df.drop(columns="replicate_id")
    with pytest.warns(UserWarning, match="lookwhere k=16 has 3 different configs.*no replicate_id"):
        fig = pareto_figure(old, "traffic_signs")
    assert len(drawn_points(fig)) == 10 and "mean of" not in fig._suptitle.get_text()


def test_plot_without_memory_has_no_size_legend(tmp_path):
    fig = pareto_figure(frame(with_mem=False), "traffic_signs")
    assert len(fig.axes) == 1 and len(fig.legends) == 1
    out = pareto_plot(frame(with_mem=False), "traffic_signs", out=tmp_path / "p.svg")
    assert out.read_text().lstrip().startswith("<?xml")


def test_plot_errors():
    with pytest.raises(ConfigError, match="unknown x axis 'flops'"):
        pareto_figure(frame(), "traffic_signs", x="flops")
    with pytest.raises(LwbenchError, match="no results for task 'cub'; tasks with results: other, traffic_signs"):
        pareto_figure(frame(), "cub")
    with pytest.raises(LwbenchError, match="no results to plot"):
        pareto_figure(pd.DataFrame(), "cub")
    with pytest.raises(LwbenchError, match="have a throughput value"), pytest.warns(UserWarning):
        pareto_figure(frame(), "other", x="throughput")


def test_unequal_effort_is_said_on_the_figure():
    base = frame()
    same = base.assign(teacher_id="t0", method_train_time_s=0.0)
    assert "not equal-effort" not in pareto_figure(same, "traffic_signs")._suptitle.get_text()
    trained = same.assign(method_train_time_s=[30.0 if m == "lookwhere" else 0.0 for m in same["method"]])
    title = pareto_figure(trained, "traffic_signs")._suptitle.get_text()
    assert "not equal-effort: lookwhere trained on top of the teacher, random, tome not" in title
    two = same.assign(teacher_id=["t1" if m == "tome" else "t0" for m in same["method"]])
    with pytest.warns(UserWarning, match="rows differ in teacher: 5 rows with teacher t0, 2 rows with teacher t1"):
        title = pareto_figure(two, "traffic_signs")._suptitle.get_text()
    assert "not one comparison: rows with teacher t1 drawn as their own lines" in title


def test_compiled_and_eager_timings_are_separate_lines_on_a_timing_axis():
    from lwbench.plots import _aggregate

    base = {"method": "full", "budget": "-", "metric": "top1", "metric_value": 90.0, "gmacs": 1.0, "seed": 0,
            "autocast": "none", "device": "cpu", "threads": 2}
    df = pd.DataFrame([{**base, "compile": "none", "latency_ms": 10.0, "replicate_id": "a"},
                       {**base, "compile": "max-autotune", "latency_ms": 6.0, "replicate_id": "b"}])
    lines = set(_aggregate(df, "latency_ms")["line"])
    assert lines == {"full · compile none", "full · compile max-autotune"}
    with pytest.warns(UserWarning, match="2 different configs"):  # one line, two points, named in a notice
        assert set(_aggregate(df, "gmacs")["line"]) == {"full"}  # MACs do not depend on how calls were timed


# -- what a reader needs to decode the figure --------------------------------------------------------------------


def point_colors(fig):
    """{line: RGBA of its markers' face, or of the edge for hollow (off-the-shelf) markers}."""
    out = {}
    for c in fig.axes[0].collections:
        gid = c.get_gid() or ""
        if gid.startswith("points:"):
            face = c.get_facecolors()[0]
            out[gid.removeprefix("points:")] = tuple(c.get_edgecolors()[0] if tuple(face) == (1, 1, 1, 1) else face)
    return out


def test_method_colours_are_stable_whatever_else_is_plotted():
    from lwbench.plots import method_style

    df = frame()
    alone = point_colors(pareto_figure(df[df["method"] == "tome"], "traffic_signs"))
    extra = df[df["method"] == "lookwhere"].assign(method="aaa_plugin", replicate_id=lambda d: d["replicate_id"] + "p")
    more = point_colors(pareto_figure(pd.concat([extra, df], ignore_index=True), "traffic_signs"))
    assert alone["tome"] == more["tome"] and more["lookwhere"] == point_colors(pareto_figure(df, "traffic_signs"))[
        "lookwhere"]
    assert len(set(more.values())) == 4  # every method its own colour
    # the styles the built-in methods declare: distinct colours and markers; a plugin's is a function of its name alone
    declared = declared_styles()
    assert len({c for c, _ in declared.values()}) == len(declared)
    assert len(set(declared.values())) == len(declared)
    assert method_style("my_plugin") == method_style("my_plugin") and method_style("tome") == declared["tome"]
    assert method_style("my_plugin")[0] not in {c for c, _ in declared.values()}


def test_filled_glyph_markers_keep_their_colour():
    """A mathtext glyph is drawn as the outline of its strokes: the white edge that sets a filled shape apart would
    whiten a thin glyph (APT's boxplus read as hollow, i.e. as an off-the-shelf point, in the reference plot)."""
    from lwbench.plots import filled_edge

    assert filled_edge(r"$\boxplus$", "#e6550d") == "#e6550d"
    assert filled_edge("o", "#e6550d") == "white"
    df = frame()
    fig = pareto_figure(df.assign(method=df["method"].replace({"tome": "apt"})), "traffic_signs")
    apt = next(c for c in fig.axes[0].collections if c.get_gid() == "points:apt")
    assert tuple(apt.get_edgecolors()[0]) == tuple(apt.get_facecolors()[0]) != (1, 1, 1, 1)
    assert not any(tuple(c.get_edgecolors()[0]) == tuple(c.get_facecolors()[0])
                   for c in fig.axes[0].collections if c.get_gid() == "points:lookwhere")  # "o": white edge


def test_every_method_with_an_off_the_shelf_regime_draws_a_solid_marker():
    """Off-the-shelf points are hollow (white face, coloured edge): a thin glyph looks the same filled or hollow,
    so a training-free method, which appears in both regimes, must use a filled shape or a solid glyph."""
    from lwbench.registry import METHODS

    thin = {r"$\boxplus$", r"$\bowtie$", r"$\heartsuit$", r"$\diamondsuit$", r"$\oplus$", r"$\otimes$"}
    for name, (_, marker) in declared_styles().items():
        if METHODS.get(name).training == "none":
            assert marker not in thin, f"{name}: {marker} is thin; its off-the-shelf points would not read hollow"


def declared_styles() -> dict[str, tuple[str, str]]:
    """``Method.style`` of every built-in method that declares one (read from the registry, not a list)."""
    from lwbench.registry import METHODS

    classes = {name: METHODS.get(name) for name in METHODS.names()}
    return {name: cls.style for name, cls in classes.items() if cls.__dict__.get("style") is not None}


def with_full(df):
    full = [dict(method="full", budget="-", budget_key="-", budget_value=math.nan, task="traffic_signs",
                 source="synthetic", backbone="lw_vit_test_p8", img_size="64x64", profile="quick", seed=0,
                 metric="top1",
                 metric_value=acc, metric_ci_low=acc - 1, metric_ci_high=acc + 1, gmacs=3.0, latency_ms=10.0,
                 latency_iqr_ms=2.0, peak_mem_mb=25.0, mem_kind="cpu_peak_rss_delta", device="cpu",
                 device_name="Test CPU", threads=1, regime=regime, replicate_id=f"full-{regime}")
            for acc, regime in ((85.0, "finetuned"), (82.0, "off_the_shelf"))]
    return pd.concat([df.assign(regime="finetuned"), pd.DataFrame(full)], ignore_index=True)


def test_chance_and_full_reference_lines_are_drawn_and_labelled():
    fig = pareto_figure(with_full(frame()), "traffic_signs")
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    assert lines["chance"].get_ydata()[0] == pytest.approx(25.0)  # traffic signs: 4 classes
    assert lines["full_reference:full"].get_ydata()[0] == pytest.approx(85.0)
    assert lines["full_reference:full (off the shelf)"].get_ydata()[0] == pytest.approx(82.0)
    texts = {t.get_gid(): [] for t in ax.texts}
    for t in ax.texts:
        texts[t.get_gid()].append(t.get_text())
    assert texts["chance_label"] == ["chance: 25 (1/4 classes)"]
    assert sorted(texts["full_reference_label"]) == ["full (off the shelf): 82.0", "full: 85.0"]
    lo, hi = ax.get_ylim()
    assert lo < 25 < hi
    # the two full labels are 3 points apart on the axis: nudged apart so they do not overlap
    boxes = [t.get_window_extent() for t in ax.texts if t.get_gid() == "full_reference_label"]
    assert not boxes[0].overlaps(boxes[1])
    # an explicit chance level wins; a metric without one (mIoU) draws none
    fig = pareto_figure(frame(), "traffic_signs", chance=50.0)
    assert [ln.get_ydata()[0] for ln in fig.axes[0].get_lines() if ln.get_gid() == "chance"] == [50.0]
    fig = pareto_figure(frame().assign(metric="miou"), "traffic_signs")
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "chance"]


def test_chance_far_below_the_points_is_said_not_drawn():
    from lwbench.plots import chance_level

    df = frame()
    narrow = df.assign(metric_value=70 + (df["metric_value"] - 40) / 10)  # 70..74 %: chance 0.1 would flatten them
    fig = pareto_figure(narrow, "traffic_signs", chance=0.1)
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "chance"]
    assert "chance: 0.1, below the axis" in fig.axes[0].get_ylabel()
    fig = pareto_figure(narrow, "traffic_signs")  # the task's own chance level, 25 (1/4 classes): a longer label
    label, axes = fig.axes[0].yaxis.label, fig.axes[0]
    assert "chance: 25 (1/4 classes), below the axis" in label.get_text()
    fig.draw_without_rendering()
    assert label.get_window_extent().height <= axes.get_window_extent().height  # never taller than the axes
    assert chance_level(df, "traffic_signs", "top5") == (100.0, 4)
    assert chance_level(df, "no_such_task", "top1") is None
    bil = df.assign(task="billiards", config=[{"task_opts": {"label_fn": "sum-all-modulo10"}}] * len(df))
    assert chance_level(bil, "billiards", "top1") == (10.0, 10)


@pytest.mark.parametrize("x", ["gmacs", "latency_ms", "throughput"])
def test_log_ticks_enclose_every_point(x):
    fig = pareto_figure(with_full(frame()), "traffic_signs", x=x)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    labelled = [t for t, lab in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True) if lab.get_text()]
    pts = drawn_points(fig)[:, 0]
    assert len(ticks) >= 3 and min(labelled) <= pts.min() and max(labelled) >= pts.max()
    assert lo < pts.min() and hi > pts.max() and "log scale" in ax.get_xlabel()


def test_log_ticks_known_answers():
    from lwbench.plots import log_ticks

    ticks, (lo, hi) = log_ticks(0.0223, 0.3646)
    assert ticks == [0.02, 0.05, 0.1, 0.2, 0.5] and lo < 0.02 and hi > 0.5
    assert log_ticks(4.3, 320)[0] == [2, 5, 10, 20, 50, 100, 200, 500]
    assert log_ticks(0.2, 0.27)[0] == [0.2, 0.3]  # under a decade: 1..9 per decade
    assert log_ticks(1, 5000)[0] == [1, 10, 100, 1000, 10000]
    assert log_ticks(0.5, 0.5)[0] == [0.5]


def test_latency_iqr_bars():
    df = with_full(frame())
    fig = pareto_figure(df, "traffic_signs", x="latency_ms")
    from matplotlib.collections import LineCollection

    iqr = [seg for c in fig.axes[0].collections if isinstance(c, LineCollection) and c.get_gid() == "timing_iqr"
           for seg in c.get_segments()]
    assert len(iqr) == 2  # the two full rows carry latency_iqr_ms=2: 10 ms -> 9..11
    assert sorted(tuple(np.round(np.asarray(s)[:, 0], 6)) for s in iqr) == [(9.0, 11.0), (9.0, 11.0)]
    assert "horizontal bars: latency IQR" in fig._suptitle.get_text()


def test_long_titles_are_wrapped_not_clipped():
    df = frame().assign(backbone="vit_huge_patch14_clip_quickgelu_224.dfn5b_with_a_very_long_suffix",
                        device_name="AMD EPYC 9654 96-Core Processor with an unusually long marketing name")
    fig = pareto_figure(df, "traffic_signs", x="latency_ms")
    fig.draw_without_rendering()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert fig._suptitle.get_text().count("\n") >= 2
    for leg in fig.legends:  # nothing drawn over the title
        assert not leg.get_window_extent().overlaps(box)



def test_a_legend_of_long_method_names_stays_inside_the_figure():
    """The method legend takes fewer columns rather than run past both edges of the figure (the billiards report
    of the newer methods did, with 4 columns of names like "repshift (off the shelf) (keep_rate)")."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from lwbench.plots import _fit_legend

    names = ["algm (off the shelf) (threshold)", "evit (off the shelf) (keep_rate)", "full (off the shelf)",
             "mctf (off the shelf) (r)", "pitome (off the shelf) (r)", "repshift (off the shelf) (keep_rate)",
             "tome (off the shelf) (r)", "topk (off the shelf) (keep_rate)", "Pareto frontier",
             "tied with the frontier (bars overlap)"]
    handles = [Line2D([], [], marker="o", label=n) for n in names]
    kw = dict(frameon=False, fontsize=8.5, title="method (budget key)", title_fontsize=8.5, columnspacing=1.6)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(9.6, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    fig.add_subplot()
    wide = fig.legend(handles=handles, loc="outside lower center", ncol=4, **kw)
    fig.draw_without_rendering()
    assert wide.get_window_extent().x1 > fig.bbox.x1  # four columns of these names do not fit 9.6 inches
    wide.remove()
    legend = _fit_legend(fig, handles, 4, **kw)
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and legend._ncols < 4 and len(fig.legends) == 1
