"""``lwbench report --task T --out DIR``: the reference comparison of one task, regenerated from the store.

It writes, from the rows alone (nothing is re-run):

* ``rows.csv``: every row of the task, every column;
* ``table.md``: where and how the rows were obtained (machine, threads, dtype, kernel, commit, busy rows),
  the results table with 95% intervals in both regimes, and each method's **paired** difference to ``full``
  in the same regime, seed and teacher (a paired bootstrap over the same test images, so "within X points"
  is a statement with a confidence level), and every method's accuracy on the **hard subset**, the test images
  ``lowres`` at its default size gets wrong (:func:`hard_subset_rows`);
* ``pareto_gmacs.png`` and ``pareto_latency_ms.png`` (error bars, tied points marked);
* ``conversion.png`` when rows were timed paired against ``full``: each method's speed-up against its GMAC ratio,
  one panel per batch size (:func:`lwbench.plots.conversion_plot`).

Re-running a report into the same folder is the normal way to regenerate it (``benchmarks/reference/`` is made
so), so the report replaces its own earlier files; a file of those names that it did not write is refused
(:func:`foreign_files`) unless ``overwrite``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lwbench.errors import ConfigError
from lwbench.export import HF_MARK, LATEX_MARK
from lwbench.paths import write_text_atomic
from lwbench.plots import PNG_SOFTWARE
from lwbench.results import ResultStore, rows_to_frame
from lwbench.row_filter import RowFilter
from lwbench.schema import ResultError
from lwbench.tables import REFERENCE_METHOD, format_results

REFERENCE = REFERENCE_METHOD
_TABLE_HEADING = re.compile(r"# \S+: the reference comparison\s*$")


def paired_rows(store: ResultStore, rows: list[dict[str, Any]], reference: str = REFERENCE,
                same_budget: bool = False, gmacs_within: float | None = None) -> list[dict[str, Any]]:
    """Each row against the ``reference`` row of the same regime, seed, teacher and test set (and budget, with
    ``same_budget``: a selector against ``saliency`` at the same k; or, with ``gmacs_within``, the reference row of
    the closest GMACs when they differ by at most that fraction of the reference's: matched compute): the paired
    bootstrap difference of their metric (rows whose per-image outcomes are missing are left out)."""
    from lwbench.stats import paired_bootstrap

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("regime"), r.get("seed"), r.get("teacher_id"), r.get("n_eval"),
                r.get("budget") if same_budget else None)

    refs: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == reference:
            refs.setdefault(key(r), []).append(r)

    def match(r: dict[str, Any]) -> dict[str, Any] | None:
        candidates = refs.get(key(r), [])
        if gmacs_within is None:
            return candidates[-1] if candidates else None
        g = r.get("gmacs")
        near = [c for c in candidates if g and c.get("gmacs") and abs(g - c["gmacs"]) <= gmacs_within * c["gmacs"]]
        return min(near, key=lambda c: abs(g - c["gmacs"])) if near else None

    out = []
    for r in rows:
        if r["method"] == reference:
            continue
        ref = match(r)
        if ref is None:
            continue
        a, b = store.per_image(r).get(r["metric"]), store.per_image(ref).get(r["metric"])
        if a is None or b is None or len(a) != len(b):
            continue
        n = int(r.get("bootstrap_resamples") or 1000)
        d = paired_bootstrap(a, b, r["metric"], n_resamples=n, seed=int(r.get("bootstrap_seed") or 0))
        out.append({"method": r["method"], "budget": r["budget"], "regime": r.get("regime", "-"),
                    "seed": r.get("seed"), "value": r["metric_value"], "reference": ref["metric_value"],
                    "reference_budget": ref["budget"],
                    "diff": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": len(a),
                    "gmacs_ratio": ref["gmacs"] / r["gmacs"] if r.get("gmacs") else math.nan})
    return out


#: The "no learning" floor of where to look: every selector at the same budget is paired against it in the report.
NO_LEARNING = "saliency"

#: The method every other row is paired with at matched compute: the paper's, and the one users ask about.
MATCHED_REFERENCE = "lookwhere"

#: How close two rows' GMACs must be to count as matched compute (a fraction of the reference row's).
MATCHED_GMACS = 0.10

#: The method whose mistakes define the hard subset (VTC-Bench's filter, arXiv:2510.07143): the test images that
#: plain downsampling to its default size gets wrong are the ones where looking at high resolution must matter.
HARD_FILTER = "lowres"


def _default_size(row: dict[str, Any]) -> float | None:
    """``lowres``'s default size (its ``--budget`` when none is given) for the row's backbone and image size."""
    from lwbench.backbones import spec_of
    from lwbench.registry import get_method

    try:
        return float(get_method(HARD_FILTER).default_budget(spec_of(row["backbone"], row["img_size"])))
    except Exception:  # a backbone this install cannot describe: fall back to the rows' own sizes
        return None


def _size(row: dict[str, Any]) -> float:
    try:
        return float(str(row.get("budget", "")).partition("=")[2])
    except ValueError:
        return math.nan


def hard_subset_rows(store: ResultStore, rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict]]:
    """``(filter_row, results)``: each row's metric, with its 95% bootstrap interval, on the test images that the
    ``lowres`` row at its default size got wrong (same seed, teacher and test set; classification only).

    The filter row is ``lowres`` at its default size, fine-tuned when both regimes ran (it is trained for that
    size there); without one at that size, the ``lowres`` row whose size is nearest. ``(None, [])`` when the
    rows have no ``lowres`` row with per-image outcomes, or their metric has no per-image correctness."""
    import numpy as np

    from lwbench.stats import bootstrap_ci

    metric = rows[0]["metric"] if rows else ""
    if metric not in ("top1", "top5"):
        return None, []
    read: dict[int, Any] = {}

    def outcome(r: dict[str, Any]):  # each row's per-image file read once, and only when needed
        if id(r) not in read:
            read[id(r)] = store.per_image(r).get(metric)
        return read[id(r)]

    candidates = [r for r in rows if r["method"] == HARD_FILTER and outcome(r) is not None]
    if not candidates:
        return None, []
    default = _default_size(candidates[0])

    def preference(r: dict[str, Any]) -> tuple:
        gap = abs(_size(r) - default) if default is not None else _size(r)
        return (gap if math.isfinite(gap) else math.inf, r.get("regime") != "finetuned", str(r.get("run_id")))

    flt = min(candidates, key=preference)
    wrong = np.asarray(outcome(flt)) == 0
    if not wrong.any():
        return flt, []
    key = (flt.get("seed"), flt.get("teacher_id"), flt.get("n_eval"))
    out = []
    for r in rows:
        a = outcome(r)
        if (r.get("seed"), r.get("teacher_id"), r.get("n_eval")) != key or a is None or len(a) != len(wrong):
            continue
        ci = bootstrap_ci(np.asarray(a)[wrong], metric, n_resamples=int(r.get("bootstrap_resamples") or 1000),
                          seed=int(r.get("bootstrap_seed") or 0))
        out.append({"run_id": r.get("run_id"), "method": r["method"], "budget": r["budget"],
                    "regime": r.get("regime", "-"), "value": r["metric_value"], "hard": ci["value"],
                    "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                    "n": int(wrong.sum()), "gmacs": r.get("gmacs", math.nan)})
    return flt, out


def with_hard_subset(store: ResultStore, df):
    """``df`` (a results frame) with the hard-subset columns ``hard_value``, ``hard_ci_low`` and ``hard_ci_high``
    for every row that has one, so ``lwbench results`` and the report's table show it beside the metric.

    The subset is chosen per task, source, seed and teacher (:func:`hard_subset_rows` on each such group of the
    store's rows of the frame's tasks, so a frame filtered to one method still has its filter); rows without
    per-image outcomes, or in a group with no ``lowres`` row, get NaN."""
    if df.empty or "run_id" not in df.columns:
        return df
    tasks = set(df["task"]) if "task" in df.columns else None
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in store.rows():  # every row of the frame's tasks: the filter row may be one the frame left out
        if tasks is None or r.get("task") in tasks:
            key = (r.get("task"), r.get("source"), r.get("seed"), r.get("teacher_id"))
            groups.setdefault(key, []).append(r)
    found: dict[Any, dict[str, Any]] = {}
    for rows in groups.values():
        found.update({h["run_id"]: h for h in hard_subset_rows(store, rows)[1]})
    if not found:
        return df
    df = df.copy()
    for col, key in (("hard_value", "hard"), ("hard_ci_low", "ci_low"), ("hard_ci_high", "ci_high")):
        df[col] = [found[i][key] if i in found else math.nan for i in df["run_id"]]
    return df


def hard_subset_table(flt: dict[str, Any], results: list[dict[str, Any]], metric: str) -> str:
    from tabulate import tabulate

    body = [[h["method"], h["budget"], h["regime"], f"{h['gmacs']:.3g}", f"{h['value']:.1f}",
             f"{h['hard']:.1f} [{h['ci_low']:.1f}, {h['ci_high']:.1f}]"]
            for h in sorted(results, key=lambda h: (h["regime"], -h["hard"], h["method"], h["budget"]))]
    return tabulate(body, headers=["method", "budget", "regime", "GMACs", f"{metric} (all)",
                                   f"{metric} on the hard subset [95% CI]"], tablefmt="github", disable_numparse=True)


def provenance(rows: list[dict[str, Any]]) -> str:
    """One paragraph: where the rows were measured and with what protocol, and which were timed on a busy
    machine."""
    def one(key: str) -> str:
        vals = sorted({str(r.get(key)) for r in rows})
        return ", ".join(vals)

    busy = [f"{r['method']} {r['budget']} ({r.get('regime', '-')})" for r in rows if r.get("machine_busy")]
    timed = [r for r in rows if r["method"] != REFERENCE]
    paired = sum(r.get("timing_protocol") == "paired" for r in timed)
    if timed and paired == len(timed):
        how = (f"each row timed paired with `{REFERENCE}` in one process (alternating blocks on the same images; "
               f"speed-up with a 95% bootstrap interval over the rounds)")
    elif paired:
        how = (f"{paired} row(s) timed paired with `{REFERENCE}` in one process (with a speed-up), "
               f"{len(timed) - paired} alone in a fresh process (older protocol: absolute times only)")
    else:
        how = "each point alone in a fresh process (older protocol: absolute times only, no speed-up)"
    kernels = sorted({str(r.get("attention_kernel")) for r in rows if r.get("attention_kernel")})
    lines = [
        f"- machine: {one('device')} {one('device_name')}, {one('cpu_count')} logical CPUs; "
        f"torch {one('torch_version')}, timm {one('timm_version')}",
        f"- timing: {one('threads')} thread(s), dtype {one('dtype')}, autocast {one('autocast')}, "
        f"torch.compile {one('compile')}, attention {one('attention_backend')}"
        + (f" (kernels that ran: {', '.join(kernels)})" if kernels else "")
        + f", batch 1 latency and batch {one('throughput_batch')} throughput, {how}",
        f"- lwbench commit(s): {one('git_sha')} (uncommitted changes: {one('git_dirty')})",
        f"- teacher(s): {one('teacher_id')}, {one('teacher_steps')} steps; fine-tuning recipe(s): "
        f"{one('finetune_recipe')}",
        f"- intervals: 95% percentile bootstrap over the {one('n_eval')} test images "
        f"({one('bootstrap_resamples')} resamples, seed {one('bootstrap_seed')})",
        f"- timed while other processes were busy: {', '.join(busy) if busy else 'none'}",
    ]
    return "\n".join(lines)


def paired_table(pairs: list[dict[str, Any]], metric: str, reference: str = REFERENCE,
                 reference_budget: bool = False) -> str:
    """Markdown table of :func:`paired_rows`; ``reference_budget`` adds the reference row's budget (pairs matched by
    GMACs, where it differs from the row's own)."""
    from tabulate import tabulate

    def ratio(p: dict[str, Any]) -> str:
        return f"{p['gmacs_ratio']:.2f}x" if reference_budget else f"{p['gmacs_ratio']:.1f}x"

    body = [[p["method"], p["budget"], *([p["reference_budget"]] if reference_budget else []), p["regime"], p["seed"],
             f"{p['value']:.1f}", f"{p['reference']:.1f}",
             f"{p['diff']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]", ratio(p)]
            for p in sorted(pairs, key=lambda p: (p["regime"], p["method"], p["budget"]))]
    return tabulate(body, headers=["method", "budget", *([f"{reference} budget"] if reference_budget else []),
                                   "regime", "seed", metric, f"{reference} {metric}",
                                   f"difference to {reference} [95% CI, paired]", f"fewer GMACs than {reference}"],
                    tablefmt="github", disable_numparse=True)


def methods_table(methods: Iterable[str]) -> str:
    """A markdown table of what each method needs (:mod:`lwbench.labels`, read from its class): training, the
    attention map it reads, its token count and whether it serves dense output; ``?`` for a method not registered
    here (a plugin not loaded)."""
    from lwbench.labels import method_labels

    heads = ["training", "attn map", "tokens", "dense"]
    lines = ["| method | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for m in methods:
        labels = method_labels(m)
        words = labels.words() if labels is not None else dict.fromkeys(heads, "?")
        lines.append(f"| `{m}` | " + " | ".join(words[h] for h in heads) + " |")
    return "\n".join(lines)


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _written_by_report(path: Path, table_is_ours: bool) -> bool:
    """Whether ``path`` is a file an earlier report wrote, told by its content, so that folders written before
    this check existed (the committed ``benchmarks/reference/*``) are recognised without a marker file:
    ``table.md`` by its heading, ``rows.csv`` by the row schema's header, a Pareto PNG by the ``Software`` tag
    :func:`lwbench.plots.pareto_plot` writes or, for older untagged plots, by a report's ``table.md`` beside it."""
    if not path.is_file():
        return False
    head = _head(path)
    if path.name == "table.md":
        return bool(_TABLE_HEADING.match(head.split(b"\n", 1)[0].decode("utf-8", "replace")))
    if path.name == "rows.csv":
        return head.startswith(b"run_id,config_hash,")
    if path.suffix == ".tex":
        return head.startswith(LATEX_MARK.encode())
    if path.suffix == ".yaml":
        return head.startswith(HF_MARK.encode())
    if path.suffix == ".png":  # untagged: only Pareto plots, from before the tag (conversion.png came with it)
        return b"Software\x00" + PNG_SOFTWARE.encode() in head or (table_is_ours and path.name.startswith("pareto_"))
    return False


def foreign_files(out: str | Path, names: Iterable[str]) -> list[Path]:
    """The files among ``names`` in the folder ``out`` that exist and were not written by ``lwbench report``
    (or by :func:`lwbench.plots.pareto_plot`), in the order of ``names``: what a report must not replace
    silently."""
    out = Path(out)
    table_is_ours = _written_by_report(out / "table.md", False)
    return [out / n for n in names
            if (out / n).exists() or (out / n).is_symlink()
            if not _written_by_report(out / n, table_is_ours)]


FORMATS = ("md", "latex", "hf")


def _prepare(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuse, before anything is written, names in ``out`` that are folders or files an earlier report did not
    write (unless ``overwrite``); then create ``out``."""
    folders = [out / n for n in names if (out / n).is_dir()]
    if folders:
        raise ConfigError(f"--out {out}: {folders[0]} is a folder, where the report writes a file; "
                          f"move it or give another --out")
    foreign = [] if overwrite else foreign_files(out, names)
    if foreign:
        more = f" (and {', '.join(p.name for p in foreign[1:])})" if len(foreign) > 1 else ""
        raise ConfigError(f"--out {out}: {foreign[0]}{more} exists and was not written by lwbench report; "
                          f"give another --out, or pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create that folder ({err.strerror}); give another --out") from None


def write_export(store: ResultStore, rows: list[dict[str, Any]], task: str, out: Path, fmt: str, command: str = "",
                 overwrite: bool = False, hf_dataset: str | None = None) -> list[Path]:
    """``--format latex``: ``table.tex``; ``--format hf``: ``<model>/.eval_results/<task>.yaml`` per method, budget
    and regime (:mod:`lwbench.export`). Returns the files written."""
    from lwbench.export import hf_entries, hf_yaml, latex_table
    from lwbench.logs import log
    from lwbench.tables import aggregate_seeds

    agg = aggregate_seeds(rows_to_frame(rows))
    if fmt == "latex":
        text = latex_table(agg, paired_rows(store, rows), task, command)
        _prepare(out, ["table.tex"], overwrite)
        write_text_atomic(out / "table.tex", text)
        return [out / "table.tex"]
    models = hf_entries(agg, task, hf_dataset)
    names = [f"{m}/.eval_results/{task}.yaml" for m in models]
    _prepare(out, names, overwrite)
    if not hf_dataset:
        log.warning("--format hf: dataset.id is '%s', a placeholder: the Hub lists results under a Benchmark "
                    "dataset's id; give --hf-dataset OWNER/NAME before uploading", task)
    written = []
    for (model, entries), name in zip(models.items(), names, strict=True):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, hf_yaml(entries, f"{model} on {task}" + (f"; regenerate: {command}" if command
                                                                          else "")))
        written.append(path)
    return written


def write_report(store: ResultStore, task: str, out: str | Path, command: str = "",
                 overwrite: bool = False, select: RowFilter | None = None, fmt: str = "md",
                 hf_dataset: str | None = None) -> list[Path]:
    """Write the report files of ``task`` into the folder ``out`` (created if missing); returns their paths.

    ``select`` keeps only some of the task's rows (:class:`lwbench.row_filter.RowFilter`: ``--where``,
    ``--run-ids``, ``--sweep``). ``fmt``: ``md`` (rows.csv, table.md, the plots), ``latex`` (table.tex) or ``hf``
    (Hugging Face ``.eval_results`` files, :func:`write_export`). Files of an earlier report there are replaced; any
    other file of the same name is refused with a :class:`ConfigError` before anything is written, unless
    ``overwrite``.
    """
    from lwbench.plots import conversion_plot, conversion_points, pareto_plot

    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format '{fmt}'; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    rows = store.rows(task=task)
    if not rows:
        raise ResultError(f"no results for task '{task}' in {store.root}; run lwbench sweep first")
    if select:
        kept = select.apply(rows)
        if not kept:
            raise ConfigError(f"{select.no_match(rows)}: none of the {len(rows)} rows of task '{task}' is left")
        rows = kept
    if fmt != "md":
        return write_export(store, rows, task, out, fmt, command, overwrite, hf_dataset)
    df = with_hard_subset(store, rows_to_frame(rows))  # rows.csv and the table carry it too
    plots = [x for x in ("gmacs", "latency_ms") if df[x].notna().any()]
    with warnings.catch_warnings():  # which source is drawn is said once, by the plot itself
        warnings.simplefilter("ignore")
        speedups = not conversion_points(df, task)[0].empty
    names = ["rows.csv", "table.md", *(f"pareto_{x}.png" for x in plots), *(["conversion.png"] if speedups else [])]
    _prepare(out, names, overwrite)
    written = []
    csv = out / "rows.csv"
    write_text_atomic(csv, df.to_csv(index=False))
    written.append(csv)
    metric = rows[0]["metric"]
    pairs = paired_rows(store, rows)
    text = [f"# {task}: the reference comparison", ""]
    if command:
        text += ["Regenerate:", "", "```bash", command, "```", ""]
    text += [provenance(rows), "", "## Results (95% interval over test images)", "",
             "`regime`: `off_the_shelf` = the method on the task-trained backbone with no training; `finetuned` = "
             "fine-tuned from it with the same recipe at its budget (`ft steps`).", "",
             format_results(df, "md").strip(), "",
             "## What each method needs (declared by its class: `lwbench list methods`)", "",
             methods_table(sorted(df["method"].unique())), "",
             f"## Paired difference to `{REFERENCE}` (same regime, seed, teacher and test images)", "",
             paired_table(pairs, metric) if pairs else "(no pairs: no full row or no per-image outcomes)", ""]
    floor = paired_rows(store, rows, reference=NO_LEARNING, same_budget=True)
    if floor:
        text += [f"## Paired difference to `{NO_LEARNING}` at the same budget (what learning where to look buys)", "",
                 f"`{NO_LEARNING}` picks the patches by a pixel statistic, with no learning: a selector that does not "
                 "beat it here has learned nothing a heuristic could not do.", "",
                 paired_table(floor, metric, NO_LEARNING), ""]
    matched = paired_rows(store, rows, reference=MATCHED_REFERENCE, gmacs_within=MATCHED_GMACS)
    if matched:
        text += [f"## Paired difference to `{MATCHED_REFERENCE}` at matched GMACs (within "
                 f"{MATCHED_GMACS:.0%})", "",
                 f"Every row whose GMACs come within {MATCHED_GMACS:.0%} of a `{MATCHED_REFERENCE}` row of the same "
                 "regime, seed and teacher, against the closest such row, on the same test images: which method "
                 "spends the same compute better (a budget is placed beside a LookWhere budget in the sweep file "
                 "for this).", "",
                 paired_table(matched, metric, MATCHED_REFERENCE, reference_budget=True), ""]
    flt, hard = hard_subset_rows(store, rows)
    if flt is not None and hard:
        text += [f"## Hard subset: the {hard[0]['n']} of {flt.get('n_eval')} test images `{HARD_FILTER} "
                 f"{flt['budget']}` ({flt.get('regime', '-')}) gets wrong", "",
                 "Plain downsampling fails on these, so they are the images where looking at high resolution has to "
                 "matter (VTC-Bench's filter). That row itself scores 0 here by construction.", "",
                 hard_subset_table(flt, hard, metric), ""]
    md = out / "table.md"
    write_text_atomic(md, "\n".join(text))
    written.append(md)
    for x in plots:
        written.append(pareto_plot(df, task, x=x, out=out / f"pareto_{x}.png"))
    if speedups:
        written.append(conversion_plot(df, task, out=out / "conversion.png"))
    return written


__all__ = ["write_report", "write_export", "FORMATS", "foreign_files", "paired_rows", "paired_table", "provenance",
           "hard_subset_rows", "hard_subset_table", "with_hard_subset", "methods_table"]
