"""Results as tables: the compact terminal/markdown table of ``lwbench results`` and the report, CSV and JSON.

Printing is kept apart from storing (:mod:`lwbench.results`) because it is where the judgement lives: which
columns a block shows, how a speed-up interval too wide to read is written, when rows that differ only in
their seed are averaged, which notes go under a table. The store and the schema stay small and stable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lwbench.results import sort_frame
from lwbench.schema import FLOAT_FIELDS, ResultError, finite_float, flatten, jsonable

if TYPE_CHECKING:
    import pandas as pd

# Metrics stored in percent, and how table headers and plot axes name them.
METRIC_LABELS = {"top1": "top1 (%)", "top5": "top5 (%)", "miou": "mIoU (%)", "pixel_acc": "pixel acc (%)"}


def metric_label(metric: str) -> str:
    """Header/axis label of a metric, with its unit: ``top1`` -> ``top1 (%)``."""
    return METRIC_LABELS.get(metric, metric)


# Compact columns of table/md output: (column, header, short header, decimals), in this order. The metric column's
# header is per group; ``{tb}`` is the block's throughput batch. The speed-up columns lead the timing (a ratio to `full`
# timed paired in one process reproduces on a shared machine, an absolute time does not) and appear only in blocks that
# have them; the absolute medians follow. The task is the block's heading, not a column. ``--wide`` tables use the
# headers, the terminal's and markdown's tables the short ones.
_COMPACT: tuple[tuple[str, str, str, int], ...] = (
    ("method", "method", "method", -1),
    ("labels", "labels", "labels", -1),
    ("budget", "budget", "budget", -1),
    ("regime", "regime", "regime", -1),
    ("source", "source", "source", -1),
    ("metric_value", "", "", 2),
    ("hard_value", "hard subset [95% CI]", "hard [95% CI]", 1),
    ("finetune_steps", "ft steps", "ft steps", 0),
    ("object_recall", "object recall", "recall", 2),
    ("gmacs", "GMACs (MACs)", "GMACs", 3),
    ("speedup", "speed-up bs1 [95% CI]", "speed-up bs1 [95% CI]", 2),
    ("conversion", "conv bs1", "conv bs1", 2),
    ("throughput_speedup", "speed-up {tb} [95% CI]", "speed-up {tb} [95% CI]", 2),
    ("throughput_conversion", "conv {tb}", "conv {tb}", 2),
    ("attention_kernel", "attn", "attn", -1),
    ("latency_ms", "ms bs1 [IQR]", "ms bs1 [IQR]", 2),
    ("throughput", "img/s{tb}", "img/s{tb}", 1),
    ("peak_mem_mb", "peak mem (MB)", "mem MB", 1),
    ("tokens_mean", "tokens", "tokens", 1),
    ("method_train_time_s", "method train (s)", "train s", 1),
)
# The terminal table (``table`` without ``wide``) fits this many characters: the columns below always, then the others
# in _OPTIONAL's order while the table stays this narrow. ``source`` is the block's heading there (SYNTHETIC, loudly),
# and in markdown too, where every other column stays.
TABLE_WIDTH = 120
# Shorter still in the terminal's table (its notes say the intervals are 95%).
_TERMINAL_HEADERS = {"speedup": "speed-up bs1", "throughput_speedup": "speed-up {tb}"}
_REQUIRED = ("method", "budget", "regime", "metric_value", "gmacs", "speedup")
_OPTIONAL = ("labels", "throughput_speedup", "object_recall", "hard_value", "latency_ms", "conversion",
             "throughput_conversion", "tokens_mean", "peak_mem_mb", "throughput", "attention_kernel", "finetune_steps",
             "method_train_time_s")
# The metric on the hard subset (the test images lowres at its default size gets wrong), added to a frame by
# lwbench.report.with_hard_subset; averaged over seeds like the metric.
HARD_SUBSET_FIELDS = ("hard_value", "hard_ci_low", "hard_ci_high")
# Columns shown only in a block where some row has a value: (column, the column that decides).
_ONLY_IF_ANY = {"hard_value": "hard_value", "speedup": "speedup", "conversion": "speedup",
                "throughput_speedup": "throughput_speedup",
                "throughput_conversion": "throughput_speedup", "attention_kernel": "attention_kernel"}
# A speed-up interval whose high end is more than this many times its low end is too wide to read. The row's
# ``speedup_reliable`` says so; this is the same rule (lwbench.measure.paired.RELIABLE_RATIO, kept equal by a test)
# for rows or frames that lack that field.
WIDE_RATIO = 1.25
# The method every speed-up is relative to.
REFERENCE_METHOD = "full"
# ``mem_kind`` values whose peak is approximate: CPU peak RSS moves with the allocator's state.
APPROXIMATE_MEM_KINDS = frozenset({"cpu_peak_rss_delta"})
# Settings that say nothing about how a row was obtained: left out of the "differs" column.
_NOT_SETTINGS = ("results", "force", "quiet", "teacher_id")
FORMATS = ("table", "csv", "md", "json")


def source_label(source: Any) -> str:
    """How a source is shown to people: synthetic rows are SYNTHETIC, loudly."""
    return "SYNTHETIC" if source == "synthetic" else str(source)


def _cell(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals < 0:
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if decimals == 3:  # GMACs span 1e-3 (test models) to 1e2 (ViT-L at 518 px): 3 significant digits
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:#.3g}"
    return f"{x:.{decimals}f}"


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per replicate group (``replicate_id``: rows that differ only in their seed), numeric columns
    averaged, with ``metric_std`` (sample std over seeds, NaN for one), ``n_seeds`` and ``seeds``; the metric's
    interval columns become the mean of the seeds' intervals. Rows without a replicate id stay as they are."""
    import pandas as pd

    if df.empty or "replicate_id" not in df.columns:
        return df.assign(metric_std=math.nan, n_seeds=1)
    df = df.copy()
    key = replicate_keys(df)
    out = []
    for _, g in df.groupby(key, sort=False):
        first = g.iloc[0].copy()
        for col in g.columns:
            if col in FLOAT_FIELDS or col in HARD_SUBSET_FIELDS:
                first[col] = pd.to_numeric(g[col], errors="coerce").mean()
            elif col.endswith("speedup_reliable"):  # the mean of the seeds' speed-ups is readable if each one was
                known = [_flag(v) for v in g[col] if _flag(v) is not None]
                first[col] = all(known) if known else None
        first["metric_std"] = float(g["metric_value"].std(ddof=1)) if len(g) > 1 else math.nan
        first["n_seeds"] = int(g["seed"].nunique()) if "seed" in g.columns else len(g)
        first["seeds"] = ",".join(str(int(v)) for v in sorted(g["seed"].dropna().unique())) if "seed" in g else ""
        out.append(first)
    return sort_frame(pd.DataFrame(out).reset_index(drop=True))


# Columns that tell rows of one replicate id apart only when that id is wrong (a hand-made or edited frame): seeds are
# averaged only where these agree too, so rows on other test sets, teachers or recipes never are (lwbench.mixing).
NEVER_AVERAGED = ("n_eval", "finetune_recipe", "teacher_steps", "teacher_probe_steps", "init")


def replicate_keys(df: pd.DataFrame) -> pd.Series:
    """The group of each row that may be averaged over seeds: its ``replicate_id`` (the config hash without the
    seed) and its :data:`NEVER_AVERAGED` columns; a key of its own for a row without a replicate id (older result
    files), which is never averaged with anything."""
    import pandas as pd

    own = pd.Series([f"\0row{i}" for i in range(len(df))], index=df.index)
    if "replicate_id" not in df.columns:
        return own
    ok = df["replicate_id"].map(lambda v: isinstance(v, str) and bool(v))
    key = df["replicate_id"].astype(str)
    for col in NEVER_AVERAGED:
        if col in df.columns:
            key = key + "|" + df[col].map(lambda v: "" if v is None or (isinstance(v, float) and v != v)
                                          else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return key.where(ok, own)


def metric_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """``94.1 [93.2, 95.0]`` (the 95% interval over test images), or ``94.1 ± 0.4 (3 seeds)`` for a mean over
    seeds, or the bare value when neither is known."""
    v = r.get("metric_value", math.nan)
    if v is None or v != v:
        return "-"
    n = r.get("n_seeds", 1)
    n = 1 if n is None or n != n else int(n)
    if n > 1:
        return f"{v:.{decimals}f} ± {r.get('metric_std', math.nan):.{decimals}f} ({n} seeds)"
    lo, hi = r.get("metric_ci_low", math.nan), r.get("metric_ci_high", math.nan)
    if lo is None or hi is None or lo != lo or hi != hi:
        return f"{v:.{decimals}f}"
    return f"{v:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


def hard_subset_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """The metric on the hard subset (``lwbench.report.with_hard_subset``) with its 95% interval, the mean over
    seeds when several were aggregated, ``-`` when the row has none."""
    v = _finite(r.get("hard_value"))
    if v is None:
        return "-"
    n = r.get("n_seeds", 1)
    if n is not None and n == n and int(n) > 1:
        return f"{v:.{decimals}f} ({int(n)} seeds)"
    lo, hi = _finite(r.get("hard_ci_low")), _finite(r.get("hard_ci_high"))
    if lo is None or hi is None:
        return f"{v:.{decimals}f}"
    return f"{v:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


_finite = finite_float  # one definition: lwbench.schema.finite_float


def _flag(value: Any) -> bool | None:
    """A stored bool read back from JSON, a frame or a CSV (``True``, ``np.True_``, ``"false"``); None if unknown."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return bool(value)
    except (TypeError, ValueError):
        return None


def speedup_is_wide(r: Mapping[str, Any], prefix: str = "") -> bool | None:
    """Whether the row's speed-up interval is too wide to read (the machine was too busy to time the row): its
    ``{prefix}speedup_reliable`` field when set, else the interval's ends (high / low > :data:`WIDE_RATIO`). None
    when the row has no speed-up; ``prefix`` is ``""`` for batch 1 and ``"throughput_"`` for the throughput batch."""
    if _finite(r.get(f"{prefix}speedup")) is None:
        return None
    reliable = _flag(r.get(f"{prefix}speedup_reliable"))
    if reliable is not None:
        return not reliable
    lo, hi = _finite(r.get(f"{prefix}speedup_ci_low")), _finite(r.get(f"{prefix}speedup_ci_high"))
    if lo is None or hi is None:
        return None  # no interval: nothing says it is wide
    return not (lo > 0 and hi / lo <= WIDE_RATIO)


def speedup_cell(r: Mapping[str, Any], prefix: str = "") -> str:
    """``2.31x [2.20, 2.43]`` (the speed-up over the reference with its 95% interval), ``2.3x [0.9, 5.1] (wide)``
    (one decimal fewer: the interval is too wide to read), ``2.31x`` without an interval, ``-`` without a
    speed-up (rows timed before paired timing)."""
    v = _finite(r.get(f"{prefix}speedup"))
    if v is None:
        return "-"
    wide = bool(speedup_is_wide(r, prefix))
    d = 1 if wide else 2
    lo, hi = _finite(r.get(f"{prefix}speedup_ci_low")), _finite(r.get(f"{prefix}speedup_ci_high"))
    text = f"{v:.{d}f}x" + (f" [{lo:.{d}f}, {hi:.{d}f}]" if lo is not None and hi is not None else "")
    return text + (" (wide)" if wide else "")


def conversion_of(r: Mapping[str, Any], prefix: str = "") -> float | None:
    """``{prefix}conversion`` (speed-up / GMAC ratio: the share of the MAC saving that became time), computed from
    the speed-up and ``gmac_ratio`` when the field is missing; None without a speed-up."""
    c = _finite(r.get(f"{prefix}conversion"))
    if c is not None:
        return c
    v, g = _finite(r.get(f"{prefix}speedup")), _finite(r.get("gmac_ratio"))
    return v / g if v is not None and g is not None and g > 0 else None


def attention_cell(r: Mapping[str, Any]) -> str:
    """The attention kernel that ran (``cpu_flash``), with the reference's when it ran another (``math (ref
    flash)``: part of that speed-up is the kernel's); ``-`` when not recorded."""
    k, ref = r.get("attention_kernel"), r.get("reference_attention_kernel")
    if not isinstance(k, str) or not k:
        return "-"
    return f"{k} (ref {ref})" if isinstance(ref, str) and ref and ref != k else k


def mem_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """Peak memory, ``~``-prefixed when it is approximate (CPU peak RSS, which moves with the allocator's state)."""
    v = _finite(r.get("peak_mem_mb"))
    if v is None:
        return "-"
    return ("~" if r.get("mem_kind") in APPROXIMATE_MEM_KINDS else "") + f"{v:.{decimals}f}"


def _batches(group: pd.DataFrame) -> list[int]:
    """The throughput batch sizes of a block's rows that have a throughput figure."""
    if "throughput_batch" not in group.columns:
        return []
    timed = [c for c in ("throughput", "throughput_speedup") if c in group.columns]
    has = group[timed].apply(pd_numeric).notna().any(axis=1) if timed else group["throughput_batch"].notna()
    return sorted({int(b) for b in pd_numeric(group.loc[has, "throughput_batch"]).dropna()})


def _references(group: pd.DataFrame) -> set[int]:
    """Positions of the block's reference rows: a row another row's speed-up is relative to (its run id is their
    ``reference_run_id``), or a paired-timed `full` row without a speed-up of its own."""
    refs = {v for v in group.get("reference_run_id", []) if isinstance(v, str) and v}
    out = set()
    for i, (_, r) in enumerate(group.iterrows()):
        if _finite(r.get("speedup")) is not None:
            continue
        if r.get("run_id") in refs or (r.get("method") == REFERENCE_METHOD and r.get("timing_protocol") == "paired"):
            out.add(i)
    return out


def speed_notes(group: pd.DataFrame, shown: set[str]) -> list[str]:
    """The footnotes of a block's speed-up, attention and memory columns (``shown``: the columns in its table)."""
    notes = []
    rows = [r for _, r in group.iterrows()]
    if "speedup" in shown or "throughput_speedup" in shown:
        text = (f"speed-up: `{REFERENCE_METHOD}`'s median time / the row's, both timed paired in one process "
                f"(alternating blocks, same images), with a 95% bootstrap interval over the rounds")
        if shown & {"conversion", "throughput_conversion"}:
            text += "; conv = speed-up / GMAC ratio, the share of the MAC saving that became time (1: all of it)"
        if shown & {"latency_ms", "throughput"}:
            text += "; ms, img/s: the absolute medians, which move with the machine's load"
        notes.append(text)
        wide = [r for r in rows if speedup_is_wide(r) or speedup_is_wide(r, "throughput_")]
        if wide:
            notes.append(f"(wide): the interval's ends are more than {WIDE_RATIO:g}x apart: the machine was too "
                         f"busy to time this row ({len(wide)} row(s); their conv is ~, one decimal); read the "
                         f"interval, not the ratio, or rerun it on a quiet machine")
        refs = _references(group)
        old = [r for i, r in enumerate(rows) if i not in refs and _finite(r.get("speedup")) is None
               and _finite(r.get("throughput_speedup")) is None]
        if old:
            notes.append(f"speed-up '-': {len(old)} row(s) timed one model per process (before paired timing, "
                         f"or not timed): no ratio to `{REFERENCE_METHOD}`, and their absolute times do not "
                         f"reproduce on a shared machine; rerun them with --force for a speed-up")
    if "attention_kernel" in shown and any("(ref " in attention_cell(r) for r in rows):
        notes.append("attn (ref X): the reference ran another attention kernel, so part of that speed-up is the "
                     "kernel's, not the method's")
    if "peak_mem_mb" in shown and any(r.get("mem_kind") in APPROXIMATE_MEM_KINDS and _finite(r.get("peak_mem_mb"))
                                      is not None for r in rows):
        notes.append("peak mem ~: CPU, approximate, allocator-dependent (weights + the growth of peak RSS during "
                     "one forward; it moves with the allocator's state)")
    return notes


def format_results(df: pd.DataFrame, fmt: str = "table", wide: bool = False, width: int = TABLE_WIDTH) -> str:
    """Render a results frame as ``table`` (terminal), ``md``, ``csv`` (all columns) or ``json`` (records).

    Tables have one block per (task, source) with a heading, so synthetic and real numbers are never mixed in one
    block, and the heading of a synthetic block says SYNTHETIC. The metric carries its 95% interval over test images;
    rows that differ only in their seed are aggregated into mean ± std over the seeds (:func:`aggregate_seeds`).
    The regime is a column, and a block whose rows differ in test set size, teacher or fine-tuning recipe gets a
    column naming each row's and a note saying so with the ``--where`` that selects one (:mod:`lwbench.mixing`), as
    does a block where methods were fine-tuned but `full` only ran off the shelf. In a block with paired timings the
    speed-up over `full` with its 95% interval (:func:`speedup_cell`, ``(wide)`` when the interval is too wide to
    read) and the conversion (speed-up / GMAC ratio) lead the timing, at batch 1 and at the throughput batch, with
    the attention kernel that ran; the absolute medians follow, and footnotes say what ``(wide)``, ``-`` and ``~``
    (approximate CPU memory) mean.

    ``table`` fits ``width`` characters (:data:`TABLE_WIDTH`): method, budget, regime, the metric, GMACs and the
    speed-ups always, then the other columns while they fit, and a note names those left out; ``wide=True`` shows
    every column with long headers. ``md`` keeps every column (short headers; the source is in the heading).
    """
    if fmt not in FORMATS:
        raise ResultError(f"unknown results format '{fmt}'; use one of {', '.join(FORMATS)}")
    df = df.copy()
    if "config" in df.columns:
        df["config"] = [c if isinstance(c, str) or c is None else json.dumps(jsonable(c), sort_keys=True)
                        for c in df["config"]]
    df = sort_frame(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [jsonable(r) for r in df.to_dict(orient="records")]
        return json.dumps(records, indent=1, allow_nan=False) + "\n"
    need = [c for c in ("method", "task", "source", "metric", "metric_value") if c not in df.columns]
    if need:
        raise ResultError(f"results frame lacks column(s) {', '.join(need)}")
    if df.empty:
        return "(no results)\n"
    df = aggregate_seeds(df)
    # What each method needs (training, attention map, token count, dense output), read from its class (lwbench.labels;
    # this imports the methods' modules): a four-character code per row and a legend line under the table.
    from lwbench.labels import LEGEND, UNKNOWN_CODE, label_code

    df["labels"] = df["method"].map({m: label_code(m) for m in df["method"].unique()})

    from tabulate import tabulate

    from lwbench.mixing import differences, regime_mismatch

    terminal = fmt == "table" and not wide
    tablefmt = "github" if fmt == "md" else "simple"
    blocks = []
    for (task, source), group in df.groupby(["task", "source"], sort=False):
        metrics = list(dict.fromkeys(group["metric"]))
        cols = [(c, h if wide else _TERMINAL_HEADERS.get(c, short) if terminal else short,
                 1 if terminal and c == "metric_value" else d)
                for c, h, short, d in _COMPACT if c in group.columns
                and (wide or c != "source")
                and (c not in _ONLY_IF_ANY or _any_value(group[_ONLY_IF_ANY[c]]))]
        # Identity columns left out of the compact set come back when they vary inside a block.
        for extra in ("backbone", "img_size", "profile", "seed", "metric"):
            if extra in group.columns and group[extra].nunique(dropna=False) > 1:
                cols.insert(2, (extra, extra, -1))
        batches = _batches(group)
        tb = f"bs{batches[0]}" if len(batches) == 1 else "thr."  # several: each cell names its batch
        group = _by_cost(group)
        diffs = differences(group)  # test sets, teachers, recipes that must not be read as one comparison
        at = next(i for i, (c, _, _) in enumerate(cols) if c == "metric_value")
        cols[at:at] = [(f"\0diff{j}", x.column, -1) for j, x in enumerate(diffs)]
        differs = differing_settings(group)
        if differs:  # rows that would look identical: say what tells them apart
            cols = [*cols, ("run_id", "run id", -1), ("\0differs", "differs", -1)]
        refs = _references(group)
        cells = {c: [] for c, _, _ in cols}
        for i, (_, r) in enumerate(group.iterrows()):
            for c, _, d in cols:
                cells[c].append(differs.get(i, "") if c == "\0differs" else
                                diffs[int(c[5:])].cells[i] if c.startswith("\0diff") else
                                _compact_cell(r, c, d, i in refs, len(batches) > 1))
        headers = {}
        for col, head, _ in cols:
            if col == "metric_value":
                head = (metric_label(metrics[0]) if len(metrics) == 1 else "metric value") + " [95% CI]"
                head = head.replace(" (%)", " %") if terminal else head
            elif col == "throughput":
                head = head.format(tb=f" {tb}" if len(batches) == 1 else "")
            headers[col] = head.format(tb=tb)
        hidden, said = [], []
        if fmt == "md":  # a column that says the same in every row is said once, in the heading
            for c in ("attention_kernel", "finetune_steps"):
                text = _constant(group, c, cells[c]) if c in cells else None
                if text:
                    said.append(text)
                    cols = [t for t in cols if t[0] != c]
        if terminal:
            cols, hidden = _fit(cols, headers, cells, width, timed=_any_value(group.get("speedup", [])) or
                                _any_value(group.get("throughput_speedup", [])))
        body = [[cells[c][i] for c, _, _ in cols] for i in range(len(group))]
        align = ["right" if d >= 0 else "left" for _, _, d in cols]
        table = tabulate(body, headers=[headers[c] for c, _, _ in cols], tablefmt=tablefmt, disable_numparse=True,
                         colalign=align)
        notes = []
        if "selection_warning" in group.columns:  # the distillation guard fired for these rows: say so under them
            fired = group["selection_warning"].map(lambda v: isinstance(v, str) and v != "")
            for _, r in group[fired].iterrows():
                notes.append(f"warning: {r['method']} {r['budget']} seed {r.get('seed', '?')}: "
                             f"{r['selection_warning']}")
        notes += [f"note: {x.line()}" for x in diffs]
        mismatch = regime_mismatch(group, REFERENCE_METHOD)
        if mismatch:
            notes.append(f"note: {mismatch}")
        notes += [f"note: {n}" for n in speed_notes(group, {c for c, _, _ in cols})]
        note = recipe_note(group) if not any(x.what in ("fine-tuning recipe", "teacher") for x in diffs) else ""
        if note:
            notes.append(f"note: {note}")
        teachers = teacher_note(group)
        if teachers:
            notes.append(teachers)
        if any(c == "labels" for c, _, _ in cols):
            unknown = UNKNOWN_CODE in cells["labels"]
            notes.append(LEGEND + (f" | {UNKNOWN_CODE}: a method not registered here (its --plugin)" if unknown
                                   else ""))
        if hidden:
            notes.append(f"note: {len(hidden)} more column(s) with --wide: {', '.join(hidden)}")
        if terminal:
            notes = [_wrap(n, width) for n in notes]
        if notes:  # in markdown a blank line ends the table (the notes would be table rows) and "  " a line
            table += "\n\n" + "  \n".join(notes) if fmt == "md" else "\n" + "\n".join(notes)
        heading = _heading(task, source, group, fmt, tuple(said))
        blocks.append((_wrap_at(heading.rstrip("\n"), width, " | ") + "\n" if terminal else heading) + table)
    return "\n\n".join(blocks) + "\n"


def _width(values: list[str], header: str) -> int:
    """A column's width in a ``simple`` table: tabulate pads headers by 2 (its MIN_PADDING)."""
    return max([len(header) + 2, *(len(v) for v in values)])


def _fit(cols: list[tuple[str, str, int]], headers: dict[str, str], cells: dict[str, list[str]], width: int,
         timed: bool) -> tuple[list[tuple[str, str, int]], list[str]]:
    """The columns of a terminal table that fit ``width``: the required ones (method, budget, regime, the metric,
    GMACs, the speed-ups, or the absolute medians where no row has a speed-up; every identity and difference column
    the block needs), then the optional ones in :data:`_OPTIONAL`'s order while the table stays that narrow. Returns
    the columns in their table order and the headers of those left out."""
    required = set(_REQUIRED) | ({"latency_ms", "throughput"} if not timed else set())
    keep = [c for c, _, _ in cols if c in required or c not in _OPTIONAL]
    total = sum(_width(cells[c], headers[c]) for c in keep) + 2 * (len(keep) - 1)
    for c in _OPTIONAL:
        if c in cells and c not in keep:
            w = _width(cells[c], headers[c]) + 2
            if total + w <= width:
                keep.append(c)
                total += w
    hidden = [headers[c] for c, _, _ in cols if c not in keep]
    return [t for t in cols if t[0] in keep], hidden


def _wrap_at(text: str, width: int, sep: str) -> str:
    """``text`` broken into lines of at most ``width`` characters at its ``sep`` separators."""
    lines, cur = [], ""
    for part in text.split(sep):
        if cur and len(cur) + len(sep) + len(part) > width:
            lines.append(cur)
            cur = "  " + part
        else:
            cur = f"{cur}{sep}{part}" if cur else part
    return "\n".join([*lines, cur])


def _wrap(text: str, width: int) -> str:
    """A note or heading wrapped to ``width`` characters, continuation lines indented."""
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_long_words=False,
                                    break_on_hyphens=False) if len(line) > width else line
                     for line in text.split("\n"))


def _any_value(col: pd.Series) -> bool:
    """Whether a column has a value in some row (a finite number, a non-empty text)."""
    return any(_finite(v) is not None or (isinstance(v, str) and v != "") for v in col)


def _compact_cell(r: Mapping[str, Any], col: str, decimals: int, reference: bool, several_batches: bool) -> str:
    """One cell of a compact table."""
    if col == "source":
        return source_label(r[col])
    if col == "metric_value":
        return metric_cell(r, decimals)
    if col == "hard_value":
        return hard_subset_cell(r, decimals)
    if col == "latency_ms":
        return _latency_cell(r)
    if col == "peak_mem_mb":
        return mem_cell(r, decimals)
    if col == "attention_kernel":
        return attention_cell(r)
    if col in ("speedup", "throughput_speedup"):
        prefix = col.removesuffix("speedup")
        if reference and _finite(r.get(col)) is None:
            return "1x (reference)"
        text = speedup_cell(r, prefix)
        b = _finite(r.get("throughput_batch"))
        if prefix and several_batches and text != "-" and b is not None:
            text += f" @bs{int(b)}"
        return text
    if col in ("conversion", "throughput_conversion"):
        prefix = col.removesuffix("conversion")
        c = conversion_of(r, prefix)
        if c is None:
            return "-"
        return f"~{c:.1f}" if speedup_is_wide(r, prefix) else f"{c:.{decimals}f}"  # of a speed-up too wide to read
    return _cell(r[col], decimals)


def _by_cost(group: pd.DataFrame) -> pd.DataFrame:
    """A block's rows cheapest first (GMACs, then the metric, best first), the way a Pareto plot reads."""
    keys = [c for c in ("gmacs", "metric_value", "method", "budget_value") if c in group.columns]
    asc = [k != "metric_value" for k in keys]
    return group.sort_values(keys, ascending=asc, kind="stable", na_position="last").reset_index(drop=True)


def _latency_cell(r: Mapping[str, Any]) -> str:
    """``9.28 [0.41]``: the median and its interquartile range, so a reader sees the spread of the timing."""
    v, iqr = r.get("latency_ms", math.nan), r.get("latency_iqr_ms", math.nan)
    if v is None or v != v:
        return "-"
    try:
        iqr = float(iqr)
    except (TypeError, ValueError):
        iqr = math.nan
    return f"{v:.2f}" if iqr != iqr else f"{v:.2f} [{iqr:.2f}]"


def differing_settings(group: pd.DataFrame) -> dict[int, str]:
    """For rows (positions in ``group``) that share method, budget, regime and seeds and so would look the same
    in a table, the settings in which each differs from the others of its kind, e.g. ``train.lr=0.0005``; the
    whole config is compared when the frame holds it, else the row's recipe and teacher columns."""
    ident = [c for c in ("method", "budget", "regime", "seeds", "seed") if c in group.columns]
    if not ident or len(group) < 2:
        return {}
    keys = ["|".join(str(v) for v in row) for row in group[ident].itertuples(index=False)]
    out: dict[int, str] = {}
    for _, idx in group.groupby(keys, sort=False).indices.items():
        if len(idx) < 2:
            continue
        if "config" in group.columns:
            flats = [flatten(group["config"].iloc[i]) for i in idx]
        else:
            cols = [c for c in ("finetune_recipe", "teacher_id", "teacher_steps", "pretrain_steps", "autocast",
                                "init", "backbone", "img_size") if c in group.columns]
            flats = [{c: group[c].iloc[i] for c in cols} for i in idx]
        names = sorted({k for f in flats for k in f if not k.startswith(_NOT_SETTINGS)})
        varying = [k for k in names if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for i, f in zip(idx, flats, strict=True):
            shown = ", ".join(f"{k}={f.get(k)}" for k in varying[:4]) + (" ..." if len(varying) > 4 else "")
            out[int(i)] = shown or "(same settings: a rerun)"
    return out


def teacher_note(d: pd.DataFrame) -> str:
    """The teacher's training time, said once under the table instead of added to every row's train time."""
    if "teacher_id" not in d.columns or "teacher_train_time_s" not in d.columns:
        return ""
    bits = []
    for tid, g in d.groupby("teacher_id", sort=False):
        secs = pd_numeric(g["teacher_train_time_s"]).max()
        src = ", ".join(sorted({str(v) for v in g.get("teacher_source", []) if isinstance(v, str) and v}))
        if isinstance(tid, str) and tid and secs == secs:
            bits.append(f"{tid} ({secs:.0f} s of training{', ' + src if src else ''})")
    return ("teacher (shared by these rows, not in 'method train'): " + "; ".join(bits)) if bits else ""


def pd_numeric(s):
    import pandas as pd

    return pd.to_numeric(s, errors="coerce")


def recipe_note(d: pd.DataFrame) -> str:
    """Says when the fine-tuned rows of a comparison were not fine-tuned alike (``finetune_recipe``) or
    start from different teachers; ``""`` when they are equal-effort."""
    bits = []
    if "finetune_recipe" in d.columns and "regime" in d.columns:
        ft = d[d["regime"] == "finetuned"]
        recipes = ft.groupby("finetune_recipe")["method"].apply(lambda m: sorted(set(m)))
        if len(recipes) > 1:
            bits.append("fine-tuned with different recipes: " + "; ".join(
                f"{', '.join(ms)}: {rec}" for rec, ms in recipes.items()))
    if "teacher_id" in d.columns and d["teacher_id"].nunique() > 1:
        bits.append(f"{d['teacher_id'].nunique()} different teachers")
    return "not equal-effort: " + " | ".join(bits) if bits else ""


def _constant(group: pd.DataFrame, col: str, cells: list[str]) -> str | None:
    """The heading's text for a markdown column that says the same in every row (the attention kernel, the
    fine-tuning steps of every fine-tuned row), so the table need not repeat it; None when it varies."""
    if col == "attention_kernel" and len(set(cells)) == 1 and cells[0] not in ("-", ""):
        return f"attention kernel {cells[0]}"
    if col == "finetune_steps" and "regime" in group.columns:
        tuned = {c for c, reg in zip(cells, group["regime"], strict=True) if reg == "finetuned"}
        still = {c for c, reg in zip(cells, group["regime"], strict=True) if reg != "finetuned"}
        if len(tuned) == 1 and still <= {"0", "-"}:
            return f"fine-tuned rows: {tuned.pop()} steps"
    return None


def _heading(task: str, source: str, group: pd.DataFrame, fmt: str, extra: tuple[str, ...] = ()) -> str:
    bits = [f"task {task}"]
    bits.append("SYNTHETIC data (generated in-tree, not the real dataset)" if source == "synthetic"
                else f"{source} data")
    for col, name in (("backbone", ""), ("img_size", ""), ("profile", "profile "), ("device_name", "")):
        if col in group.columns:
            vals = [v for v in dict.fromkeys(group[col]) if isinstance(v, str) and v]
            if len(vals) == 1:
                bits.append(f"{name}{vals[0]}")
    bits += [*extra, "GMACs = 1e9 multiply-accumulates"]
    text = " | ".join(bits)
    return f"### {text}\n\n" if fmt == "md" else f"{text}\n"
