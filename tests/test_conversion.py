"""Speed-ups timed paired against `full`: how tables show them (with their interval, wide ones marked, older rows
without them) and the conversion plot (speed-up against GMAC ratio, one panel per batch)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lwbench.plots import conversion_figure, conversion_plot, method_style, pareto_figure
from lwbench.registry import METHODS
from lwbench.tables import format_results, speedup_cell

FULL_ID = "fullref00000"


def speed_rows(old: int = 1, batches: bool = True) -> list[dict]:
    """Rows of one task: `full` (the reference), lookwhere at three budgets, tome at two (one of them timed on a busy
    machine: a wide interval), and ``old`` rows timed before paired timing (no speed-up columns at all)."""
    base = dict(task="traffic_signs", source="synthetic", backbone="lw_vit_test_p8", img_size="64x64", profile="quick",
                seed=0, metric="top1", device="cpu", device_name="Test CPU", threads=2, dtype="float32",
                autocast="none", compile="none", throughput_batch=32, mem_kind="cpu_peak_rss_delta",
                peak_mem_mb=12.0, latency_ms=2.0, latency_iqr_ms=0.1, throughput=500.0)
    rows = [dict(base, method="full", budget="-", budget_value=math.nan, run_id=FULL_ID, replicate_id="rfull",
                 metric_value=90.0, gmacs=4.0, timing_protocol="paired", attention_kernel="cpu_flash")]
    spec = [("lookwhere", "k=8", 8, 0.4, 85.0, 2.5, 0.1, True), ("lookwhere", "k=16", 16, 0.8, 88.0, 2.0, 0.08, True),
            ("lookwhere", "k=32", 32, 1.6, 89.0, 1.5, 0.05, True), ("tome", "r=2", 2, 2.0, 89.5, 1.6, 0.05, True),
            ("tome", "r=4", 4, 1.0, 88.5, 2.2, 1.2, False)]
    for m, b, v, g, acc, s, half, ok in spec:
        ratio = 4.0 / g
        lo, hi = (s - half, s + half)
        row = dict(base, method=m, budget=b, budget_value=float(v), run_id=f"{m}{v:08d}"[:12],
                   replicate_id=f"r{m}{v}", metric_value=acc, metric_ci_low=acc - 1, metric_ci_high=acc + 1,
                   gmacs=g, timing_protocol="paired", reference_run_id=FULL_ID, reference_gmacs=4.0,
                   gmac_ratio=ratio, speedup=s, speedup_ci_low=lo, speedup_ci_high=hi, speedup_reliable=ok,
                   conversion=s / ratio, reference_latency_ms=2.0 * s, throughput_speedup=s * 1.5,
                   throughput_speedup_ci_low=(s - half) * 1.5, throughput_speedup_ci_high=(s + half) * 1.5,
                   throughput_speedup_reliable=ok, throughput_conversion=s * 1.5 / ratio, timing_rounds=40,
                   attention_kernel="math" if m == "tome" else "cpu_flash", reference_attention_kernel="cpu_flash")
        if batches:
            row["timing_batches"] = json.dumps({"8": {"speedup": s * 1.2, "ci_low": lo * 1.2, "ci_high": hi * 1.2,
                                                      "ms": 1.0, "reference_ms": s * 1.2, "rounds": 20},
                                                "32": {"speedup": s * 1.5, "ci_low": lo * 1.5, "ci_high": hi * 1.5},
                                                "128": {"error": "out of memory"}})
        rows.append(row)
    for i in range(old):  # an older row: timed one model per process, none of the paired columns
        rows.append(dict(base, method="random", budget=f"k={8 + i}", budget_value=8.0 + i, run_id=f"random{i:06d}",
                         replicate_id=f"rrandom{i}", metric_value=70.0, gmacs=0.4))
    return rows


def speed_frame(**kw) -> pd.DataFrame:
    from lwbench.results import rows_to_frame

    return rows_to_frame(speed_rows(**kw))


def store_speed_rows(root, **kw):
    """``speed_rows`` written to a :class:`ResultStore` at ``root`` as valid rows (config, hashes), so the CLI and
    the report read them back; the reference ids point at the stored `full` row."""
    from lwbench.results import ResultStore
    from lwbench.schema import config_hash

    store = ResultStore(root)
    rows = speed_rows(**kw)
    ids = {}
    for r in rows:
        config = {k: r[k] for k in ("method", "budget", "task", "source", "seed", "backbone")}
        ids[r["run_id"]] = config_hash(config)
        r.update(config=config, run_id=ids[r["run_id"]], config_hash=ids[r["run_id"]], status="ok")
    for r in rows:
        if "reference_run_id" in r:
            r["reference_run_id"] = ids[r["reference_run_id"]]
        store.write(r)
    return store


# -- table cells ----------------------------------------------------------------------------------------------------


def test_speedup_cells_reliable_wide_and_missing():
    reliable = {"speedup": 2.3125, "speedup_ci_low": 2.2, "speedup_ci_high": 2.43, "speedup_reliable": True}
    assert speedup_cell(reliable) == "2.31x [2.20, 2.43]"
    wide = {"speedup": 2.31, "speedup_ci_low": 0.94, "speedup_ci_high": 5.12, "speedup_reliable": False}
    assert speedup_cell(wide) == "2.3x [0.9, 5.1] (wide)"  # a decimal fewer: the interval is too wide to read
    assert speedup_cell({}) == speedup_cell({"speedup": math.nan}) == speedup_cell({"speedup": None}) == "-"
    assert speedup_cell({"speedup": 1.5}) == "1.50x"  # no interval: nothing says it is wide
    # without the reliable field (or read back from a CSV as text) the interval's ends decide, by the same rule
    assert speedup_cell({k: v for k, v in wide.items() if k != "speedup_reliable"}).endswith("(wide)")
    assert speedup_cell({**wide, "speedup_reliable": "False"}).endswith("(wide)")
    assert speedup_cell({**reliable, "speedup_reliable": np.True_}) == "2.31x [2.20, 2.43]"
    assert speedup_cell({"throughput_speedup": 4.0, "throughput_speedup_ci_low": 3.9,
                         "throughput_speedup_ci_high": 4.1}, "throughput_") == "4.00x [3.90, 4.10]"


def test_wide_rule_is_the_measurements_own():
    paired = pytest.importorskip("lwbench.measure.paired")
    from lwbench.tables import WIDE_RATIO

    assert WIDE_RATIO == paired.RELIABLE_RATIO


def _body(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def test_table_leads_with_the_speedup_and_marks_wide_old_and_reference_rows():
    text = format_results(speed_frame(), "table", wide=True)
    header = next(ln for ln in text.splitlines() if ln.startswith("method"))
    order = ["GMACs (MACs)", "speed-up bs1 [95% CI]", "conv bs1", "speed-up bs32 [95% CI]", "conv bs32", "attn",
             "ms bs1 [IQR]", "img/s bs32", "peak mem (MB)"]
    assert [header.index(h) for h in order] == sorted(header.index(h) for h in order)  # the ratio before the times
    assert " task " not in header  # the block's heading names the task
    k16 = _body(text, "lookwhere  T-fd      k=16")[0]
    assert "2.00x [1.92, 2.08]" in k16 and " 0.40 " in k16 and "3.00x [2.88, 3.12]" in k16 and " 0.60 " in k16
    assert "cpu_flash" in k16 and "~12.0" in k16  # CPU memory: approximate
    r4 = _body(text, "tome")[0] if "r=4" in _body(text, "tome")[0] else _body(text, "tome")[1]
    assert "2.2x [1.0, 3.4] (wide)" in r4 and "~0.6" in r4 and "math (ref cpu_flash)" in r4
    full = _body(text, "full")[0]
    assert full.count("1x (reference)") == 2
    old = _body(text, "random")[0]
    assert old.split()[old.split().index("0.400") + 1] == "-"  # no speed-up: '-' where the ratio would be
    notes = [ln for ln in text.splitlines() if ln.startswith("note:")]
    assert any("(wide): the interval's ends are more than 1.25x apart: the machine was too busy" in n for n in notes)
    assert any("speed-up '-': 1 row(s) timed one model per process" in n for n in notes)
    assert any("conv = speed-up / GMAC ratio" in n for n in notes)
    assert any("attn (ref X)" in n for n in notes)
    assert any("peak mem ~: CPU, approximate, allocator-dependent" in n for n in notes)


def test_md_table_has_the_same_cells_and_ends_before_its_notes():
    md = format_results(speed_frame(), "md")
    assert "speed-up bs1 [95% CI]" in md and "conv bs32" in md
    assert "2.2x [1.0, 3.4] (wide)" in md and "2.00x [1.92, 2.08]" in md
    lines = md.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("note:"))
    assert lines[first - 1] == "" and lines[first - 2].startswith("|")  # a blank line: notes are not table rows


def test_older_rows_without_the_columns_keep_their_table():
    full = {k: v for k, v in speed_rows()[0].items() if k not in ("timing_protocol", "attention_kernel")}
    old = [r for r in speed_rows() if r["method"] == "random"] + [full]
    for frame in (pd.DataFrame(old), speed_frame().pipe(lambda d: d[d["method"].isin(["random"])]),
                  pd.DataFrame(old).assign(speedup=None, gmac_ratio=math.nan, timing_protocol="", attention_kernel="")):
        text = format_results(frame, "table")
        assert "speed-up" not in text and "conv" not in text and "attn" not in text and "ms bs1 [IQR]" in text
    # one old row beside paired ones: shown with '-' and the note; the block's other rows keep their cells
    mixed = format_results(speed_frame(old=2), "table")
    assert "speed-up '-': 2 row(s)" in mixed and all(" - " in ln for ln in _body(mixed, "random"))


def test_seeds_average_their_speedups_and_one_wide_seed_makes_the_mean_wide():
    rows = [r for r in speed_rows(old=0) if r["budget"] == "k=16"]
    twin = dict(rows[0], seed=1, run_id="other", speedup=2.2, speedup_ci_low=1.0, speedup_ci_high=3.0,
                speedup_reliable=False)
    text = format_results(pd.DataFrame([rows[0], twin]), "table")
    assert "2 seeds" in text and "2.1x [1.5, 2.5] (wide)" in text


# -- the conversion plot ---------------------------------------------------------------------------------------------


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and (ax.get_gid() or "").startswith("panel:")]


def points(ax, prefix=("points:", "wide:")):
    """{gid: [(x, y), ...]} of the drawn method markers of one panel."""
    return {c.get_gid(): [tuple(round(float(v), 6) for v in p) for p in c.get_offsets()] for c in ax.collections
            if (c.get_gid() or "").startswith(prefix)}


def bars(ax):
    from matplotlib.collections import LineCollection

    return sorted((round(float(a[0]), 6), round(float(a[1]), 6), round(float(b[1]), 6)) for c in ax.collections
                  if isinstance(c, LineCollection) and c.get_gid() == "speedup_interval" for a, b in c.get_segments())


def test_conversion_plot_one_panel_per_batch_with_points_bars_diagonal_and_reference():
    with pytest.warns(UserWarning, match=r"1 synthetic row\(s\) of 'traffic_signs' have no paired speed-up"):
        fig = conversion_figure(speed_frame(), "traffic_signs")
    axes = panels(fig)
    # batch 1 (speedup), 8 (timing_batches), 32 (throughput_speedup; the timing_batches' 32 is the same one);
    # 128 ran out of memory: no panel
    assert [ax.get_gid() for ax in axes] == ["panel:batch 1", "panel:batch 8", "panel:batch 32"]
    assert [ax.get_title() for ax in axes] == ["batch 1 (latency)", "batch 8", "batch 32 (throughput batch)"]
    b1 = axes[0]
    assert b1.get_xscale() == b1.get_yscale() == "log"
    got = points(b1)
    assert got["points:lookwhere"] == [(2.5, 1.5), (5.0, 2.0), (10.0, 2.5)]  # x = gmac_ratio, y = speedup
    assert got["points:tome"] == [(2.0, 1.6)] and got["wide:tome"] == [(4.0, 2.2)]  # the wide one hollow
    assert (10.0, 2.4, 2.6) in bars(b1) and (4.0, 1.0, 3.4) in bars(b1) and len(bars(b1)) == 5
    assert points(axes[2])["points:lookwhere"] == [(2.5, 2.25), (5.0, 3.0), (10.0, 3.75)]  # throughput speed-up
    assert points(axes[1])["points:lookwhere"] == [(2.5, 1.8), (5.0, 2.4), (10.0, 3.0)]  # timing_batches["8"]
    for ax in axes:
        diag = next(line for line in ax.get_lines() if line.get_gid() == "conversion_1")
        np.testing.assert_allclose(diag.get_ydata(), diag.get_xdata())  # speed-up = GMAC ratio
        half = next(line for line in ax.get_lines() if line.get_gid() == "conversion_0.5")
        np.testing.assert_allclose(half.get_ydata(), 0.5 * np.asarray(half.get_xdata()))
        ref = next(c for c in ax.collections if c.get_gid() == "reference")
        assert ref.get_offsets().tolist() == [[1.0, 1.0]]
        labels = [t.get_text() for t in ax.texts]
        assert "conversion 1: speed-up = GMAC ratio" in labels
    title = fig._suptitle.get_text()
    for bit in ("traffic_signs", "SYNTHETIC", "lw_vit_test_p8 @ 64x64", "Test CPU", "2 threads", "float32",
                "1 row(s) without a paired speed-up", "hollow, faded"):
        assert bit in title, bit
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("hollow, faded: interval wide") for t in legend) and "lookwhere (k)" in legend


def test_conversion_panels_are_a_grid_of_devices_by_batches():
    cpu = speed_frame(batches=False)
    gpu = cpu.assign(device="cuda", device_name="Test GPU", dtype="bfloat16", throughput_speedup=math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = conversion_figure(pd.concat([cpu, gpu], ignore_index=True), "traffic_signs")
    # rows: cpu float32, cuda bfloat16; columns: batch 1, 32; the GPU rows have no throughput speed-up: no panel
    assert [ax.get_gid() for ax in panels(fig)] == ["panel:batch 1", "panel:batch 32", "panel:batch 1"]
    titles = [ax.get_title() for ax in panels(fig)]  # each panel names its device and mode
    assert titles[0].startswith("cpu: Test CPU, 2 threads · float32\nbatch 1")
    assert titles[1].startswith("cpu: Test CPU, 2 threads · float32\nbatch 32")
    assert titles[2].startswith("cuda: Test GPU, 2 threads · bfloat16\nbatch 1")
    labels = [ax.get_ylabel() for ax in panels(fig)]
    assert labels[0].startswith("speed-up over full") and labels[1] == ""
    assert len([ax for ax in fig.axes if not ax.get_visible()]) == 1


def test_conversion_styles_are_the_pareto_styles():
    from matplotlib.colors import to_hex

    df = speed_frame()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = conversion_figure(df, "traffic_signs")
        par = pareto_figure(df, "traffic_signs", x="speedup")
    pareto = {c.get_gid().split(":", 1)[1]: c for c in par.axes[0].collections
              if (c.get_gid() or "").startswith("points:")}
    for gid_, coll in ((c.get_gid(), c) for c in panels(conv)[0].collections
                       if (c.get_gid() or "").startswith("points:")):
        method = gid_.split(":", 1)[1]
        colour, marker = method_style(method)
        assert to_hex(coll.get_facecolors()[0]) == colour == to_hex(pareto[method].get_facecolors()[0])
        assert (coll.get_paths()[0].vertices == pareto[method].get_paths()[0].vertices).all()  # the same marker
        assert METHODS.get(method).style == (colour, marker)  # the style the method's class declares


def test_conversion_plot_without_any_speedup_says_so():
    from lwbench.errors import LwbenchError

    old = speed_frame().pipe(lambda d: d[d["method"].isin(["full", "random"])])
    with pytest.raises(LwbenchError, match="have a paired speed-up to plot"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conversion_figure(old, "traffic_signs")


def test_conversion_plot_is_written_atomically_and_tagged(tmp_path):
    from lwbench.plots import PNG_SOFTWARE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = conversion_plot(speed_frame(batches=False), "traffic_signs", out=tmp_path / "c" / "conv.png")
    assert [p.name for p in out.parent.iterdir()] == ["conv.png"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.info.get("Software") == PNG_SOFTWARE


def test_cli_plot_conversion_and_pareto_speedup(tmp_path, capsys):
    from lwbench.cli import main

    store_speed_rows(tmp_path / "res")
    out = tmp_path / "conv.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["plot", "conversion", "--task", "traffic_signs", "--results", str(tmp_path / "res"),
                     "--out", str(out), "--source", "synthetic"]) == 0
        assert out.stat().st_size > 20_000 and capsys.readouterr().out.strip() == str(out)
        assert main(["plot", "conversion", "--task", "traffic_signs", "--results", str(tmp_path / "res")]) == 0
        assert (tmp_path / "res" / "conversion_traffic_signs.png").is_file()
        assert main(["plot", "pareto", "--task", "traffic_signs", "--x", "speedup",
                     "--results", str(tmp_path / "res")]) == 0
        assert (tmp_path / "res" / "pareto_traffic_signs_speedup.png").is_file()


# -- the Pareto plot against the speed-up ----------------------------------------------------------------------------


def test_pareto_against_speedup_draws_its_interval_and_puts_full_at_one():
    with pytest.warns(UserWarning, match=r"1 synthetic row\(s\) of 'traffic_signs' have no speedup"):
        fig = pareto_figure(speed_frame(), "traffic_signs", x="speedup")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("speed-up over full") and "→  better" in \
        ax.get_xlabel()
    from matplotlib.collections import LineCollection

    horiz = sorted((round(float(a[1]), 6), round(float(a[0]), 6), round(float(b[0]), 6)) for c in ax.collections
                   if isinstance(c, LineCollection) and c.get_gid() == "speedup_interval" for a, b in c.get_segments())
    assert (88.0, 1.92, 2.08) in horiz and (88.5, 1.0, 3.4) in horiz and len(horiz) == 5  # full has none
    assert [1.0, 90.0] in next(c for c in ax.collections if c.get_gid() == "points:full").get_offsets().tolist()
    sub = fig._suptitle.get_text()
    assert "the speed-up's 95% interval" in sub and "1 row(s) with a wide speed-up interval" in sub
    # the frontier flips: a higher speed-up is better
    front = next(c for c in ax.collections if c.get_gid() == "pareto_frontier").get_offsets().tolist()
    assert [2.5, 85.0] in front and [1.5, 89.0] not in front


def test_pareto_memory_legend_says_cpu_memory_is_approximate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = pareto_figure(speed_frame(), "traffic_signs")
    sizes = fig.legends[-1]
    assert "approximate" in sizes.get_title().get_text().replace("\n", " ")
    assert all(t.get_text().startswith("~") for t in sizes.get_texts())


# -- the report -----------------------------------------------------------------------------------------------------


def test_report_writes_conversion_png_only_when_rows_have_speedups(tmp_path):
    from lwbench.report import foreign_files, write_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = write_report(store_speed_rows(tmp_path / "new"), "traffic_signs", tmp_path / "a")
        assert [p.name for p in written] == ["rows.csv", "table.md", "pareto_gmacs.png", "pareto_latency_ms.png",
                                             "conversion.png"]
        table = (tmp_path / "a" / "table.md").read_text()
        assert "speed-up bs1 [95% CI]" in table and "(wide)" in table and "timed paired with `full`" in table
        assert "kernels that ran: cpu_flash, math" in table
        assert foreign_files(tmp_path / "a", ["conversion.png"]) == []  # its own file: replaced on a rerun
        assert write_report(store_speed_rows(tmp_path / "new2"), "traffic_signs", tmp_path / "a")[-1].name == \
            "conversion.png"

        store = store_speed_rows(tmp_path / "old")
        for r in store.rows():
            if r["method"] != "random":
                store.path_for(r).unlink()
        written = write_report(store, "traffic_signs", tmp_path / "b")
    assert "conversion.png" not in [p.name for p in written] and not (tmp_path / "b" / "conversion.png").exists()
    assert "speed-up bs1" not in (tmp_path / "b" / "table.md").read_text()
    # a user's conversion.png beside a report's table.md is not the report's: refused, not replaced
    (tmp_path / "b" / "conversion.png").write_bytes(b"\x89PNG\r\n\x1a\n mine")
    assert foreign_files(tmp_path / "b", ["conversion.png"]) == [tmp_path / "b" / "conversion.png"]
