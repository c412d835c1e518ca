"""Results for others to read: a paper-ready LaTeX table and Hugging Face Hub evaluation results.

``lwbench report --format latex`` writes ``table.tex``: one booktabs ``table`` per data source with method, budget,
the metric with its 95% interval (mean ± std over seeds where several), GMACs, the paired speed-up over ``full`` and
the paired difference to ``full`` in the same regime, seed and teacher, one section per regime.

``lwbench report --format hf`` writes, for every method, budget and regime (each a model of its own on the Hub),
``<model>/.eval_results/<task>.yaml`` in the Hub's ``.eval_results`` format
(https://huggingface.co/docs/hub/eval-results, ``huggingface_hub.EvalResultEntry``): a list of entries with
``dataset.id`` (a Hub Benchmark dataset), ``dataset.task_id``, ``value``, and the optional ``date`` and ``notes``, here
the setting behind the number. A folder is what the model's repo root gets (``hf upload <repo> <out>/<model> .``).

Both are for publishing, so rows that must not be read as one comparison (other test sets, teachers or recipes,
:mod:`lwbench.mixing`) are refused in one line with the ``--where`` that selects one side, instead of being
split as the Markdown report splits them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lwbench.errors import ConfigError
from lwbench.mixing import differences
from lwbench.schema import finite_float

if TYPE_CHECKING:
    import pandas as pd

#: First line of every file these exports write: how ``lwbench report`` recognises its own files.
LATEX_MARK = "% lwbench report --format latex"
HF_MARK = "# lwbench report --format hf"
#: The fields of one ``.eval_results`` entry (huggingface_hub's EvalResultEntry, the Hub's documentation).
HF_ENTRY_KEYS = {"dataset": True, "value": True, "verifyToken": False, "date": False, "source": False, "notes": False}
HF_DATASET_KEYS = {"id": True, "task_id": True, "revision": False}
HF_SOURCE_KEYS = {"url": True, "name": False, "user": False, "org": False}

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_REGIMES = (("finetuned", "Fine-tuned"), ("off_the_shelf", "Off the shelf"))


def tex(text: Any) -> str:
    """``text`` with LaTeX's special characters escaped (``topk_random`` -> ``topk\\_random``)."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def refuse_mixed(d: pd.DataFrame, what: str) -> None:
    """A :class:`ConfigError` naming the first way the rows of ``d`` must not be read as one comparison."""
    diffs = differences(d)
    if diffs:
        x = diffs[0]
        raise ConfigError(f"{what}: {x.line().replace('; never averaged, kept apart', '')}; one table or file must "
                          f"not mix them")


_finite = finite_float  # one definition: lwbench.schema.finite_float


def _gmacs(v: Any) -> str:
    x = _finite(v)
    if x is None:
        return "--"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:#.3g}"


def _mean_pairs(pairs: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, float]]:
    """The paired differences to ``full`` by (method, budget, regime), averaged over seeds (diff and interval ends,
    as tables average the seeds' intervals), with how many seeds."""
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for p in pairs:
        out.setdefault((p["method"], p["budget"], p["regime"]), []).append(p)
    return {k: {c: sum(float(p[c]) for p in v) / len(v) for c in ("diff", "ci_low", "ci_high")} | {"n": len(v)}
            for k, v in out.items()}


def latex_table(agg: pd.DataFrame, pairs: Sequence[Mapping[str, Any]], task: str, command: str = "",
                reference: str = "full") -> str:
    """The LaTeX (booktabs) table of one task's rows.

    ``agg``: a results frame with seeds aggregated (:func:`lwbench.tables.aggregate_seeds`); ``pairs``: the paired
    differences to ``reference`` (:func:`lwbench.report.paired_rows`). One ``table`` per source, one section per
    regime, rows cheapest first. Needs ``\\usepackage{booktabs}``."""
    from lwbench.tables import metric_label, speedup_is_wide

    refuse_mixed(agg, "--format latex")
    deltas = _mean_pairs(pairs)
    out = [f"{LATEX_MARK}: {task}" + (f"; regenerate: {command}" if command else ""), "% needs \\usepackage{booktabs}"]
    for source, block in agg.groupby("source", sort=False):
        metrics = list(dict.fromkeys(block["metric"]))
        metric = metrics[0] if len(metrics) == 1 else "metric"
        head = metric_label(metric).replace("top1", "Top-1").replace("mIoU", "mIoU").replace("%", r"\%")
        regimes = [r for r, _ in _REGIMES if r in set(block.get("regime", []))] or [None]
        body = []
        wide = False
        seeds = sorted({int(n) for n in block.get("n_seeds", [1]) if n == n})
        for regime in regimes:
            part = block if regime is None else block[block["regime"] == regime]
            part = part.sort_values(["gmacs", "metric_value"], ascending=[True, False], kind="stable",
                                    na_position="last")
            if len(regimes) > 1:
                if body:
                    body.append(r"\midrule")
                body.append(rf"\multicolumn{{6}}{{l}}{{\textit{{{dict(_REGIMES)[regime]}}}}} \\")
            for _, r in part.iterrows():
                n = int(r.get("n_seeds", 1) or 1)
                v = float(r["metric_value"])
                if n > 1:
                    cell = f"{v:.1f} $\\pm$ {float(r.get('metric_std', math.nan)):.1f}"
                else:
                    lo, hi = _finite(r.get("metric_ci_low")), _finite(r.get("metric_ci_high"))
                    cell = f"{v:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else "")
                sp = _finite(r.get("speedup"))
                if r["method"] == reference:
                    speed = r"1$\times$"
                elif sp is None:
                    speed = "--"
                else:
                    mark = bool(speedup_is_wide(r))
                    wide |= mark
                    speed = f"{sp:.2f}$\\times$" + (r"$^\dagger$" if mark else "")
                dl = deltas.get((r["method"], r["budget"], r.get("regime", "-")))
                delta = "--" if dl is None else (f"${dl['diff']:+.1f}$ [${dl['ci_low']:+.1f}$, "
                                                 f"${dl['ci_high']:+.1f}$]")
                budget = "--" if r["budget"] in ("-", "", None) else tex(r["budget"])
                body.append(f"{tex(r['method'])} & {budget} & {cell} & {_gmacs(r.get('gmacs'))} & {speed} & "
                            f"{delta} \\\\")
        n_eval = sorted({int(x) for x in block.get("n_eval", []) if _finite(x) is not None})
        what = "SYNTHETIC data (generated in-tree)" if source == "synthetic" else f"{source} data"
        backbone = ", ".join(sorted({str(b) for b in block.get("backbone", []) if isinstance(b, str)}))
        size = ", ".join(sorted({str(b) for b in block.get("img_size", []) if isinstance(b, str)}))
        bits = [f"{tex(task)}, {what}, {tex(backbone)} at {tex(size)}."]
        if seeds and seeds[-1] > 1:
            bits.append(f"{head.split(' ')[0]}: mean $\\pm$ std over {seeds[-1] if len(seeds) == 1 else 'several'} "
                        f"seeds.")
        else:
            bits.append(f"{head.split(' ')[0]} with its 95\\% bootstrap interval over the "
                        f"{'/'.join(map(str, n_eval)) or '?'} test images.")
        bits.append(f"Speed-up: \\texttt{{{tex(reference)}}}'s batch-1 latency over the row's, timed paired in one "
                    "process." + (r" $^\dagger$: its 95\% interval is wide (the machine was busy)." if wide else ""))
        bits.append(f"$\\Delta$: paired bootstrap difference to \\texttt{{{tex(reference)}}} (same regime, seed, "
                    "teacher and test images), with its 95\\% interval, in points.")
        label = re.sub(r"[^a-z0-9]+", "-", f"{task}-{source}".lower()).strip("-")
        out += [r"\begin{table}[t]", r"  \centering", r"  \small", r"  \begin{tabular}{llrrrr}", r"    \toprule",
                rf"    Method & Budget & {head} [95\% CI] & GMACs & Speed-up & $\Delta$ vs.\ "
                rf"\texttt{{{tex(reference)}}} \\",
                r"    \midrule", *(f"    {line}" for line in body), r"    \bottomrule", r"  \end{tabular}",
                f"  \\caption{{{' '.join(bits)}}}", f"  \\label{{tab:lwbench-{label}}}", r"\end{table}", ""]
    return "\n".join(out)


def model_name(method: str, budget: str, regime: str) -> str:
    """The folder of one method/budget/regime's Hub files: ``lookwhere-k28-finetuned``, ``full-off_the_shelf``."""
    bits = [method] + ([str(budget).replace("=", "")] if budget not in ("-", "", None) else []) + [regime or "-"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(bits))


def _hf_notes(r: Mapping[str, Any], reference: str) -> str:
    n = int(r.get("n_seeds", 1) or 1)
    regime = r.get("regime")
    how = ("fine-tuned (" + str(r.get("finetune_recipe")) + ")" if regime == "finetuned" else "off the shelf")
    teacher = _finite(r.get("teacher_steps"))
    bits = [f"lwbench {r.get('method')} {r.get('budget')}, {how}"
            + (f", on a {int(teacher)}-step task-trained backbone" if teacher else "")]
    data = "SYNTHETIC" if r.get("source") == "synthetic" else str(r.get("source"))
    metric = f"{r.get('metric')} (%) on {int(_finite(r.get('n_eval')) or 0)} {data} test images"
    if n > 1:
        bits.append(f"{metric}, mean of {n} seeds ({r.get('seeds')}), std {float(r.get('metric_std')):.2f}")
    else:
        lo, hi = _finite(r.get("metric_ci_low")), _finite(r.get("metric_ci_high"))
        bits.append(metric + (f", 95% CI [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""))
    g, ratio = _finite(r.get("gmacs")), _finite(r.get("gmac_ratio"))
    if g is not None:
        bits.append(f"{_gmacs(g)} GMACs" + (f" ({ratio:.1f}x fewer than {reference})" if ratio and ratio != 1 else ""))
    sp = _finite(r.get("speedup"))
    if sp is not None and r.get("method") != reference:
        lo, hi = _finite(r.get("speedup_ci_low")), _finite(r.get("speedup_ci_high"))
        bits.append(f"{sp:.2f}x speed-up over {reference} at batch 1"
                    + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")
                    + f" ({r.get('device')}, {r.get('device_name')}, {int(_finite(r.get('threads')) or 0)} threads)")
    bits.append(f"backbone {r.get('backbone')} at {r.get('img_size')}")
    return "; ".join(bits)


def hf_entries(agg: pd.DataFrame, task: str, dataset_id: str | None = None,
               reference: str = "full") -> dict[str, list[dict[str, Any]]]:
    """``{model folder: [entry]}``: one ``.eval_results`` entry per method, budget and regime of ``agg`` (a frame with
    seeds aggregated). ``dataset_id`` defaults to ``task`` (a placeholder: the Hub wants a Benchmark dataset's id).
    Two configs of one method, budget and regime would be two models under one name: refused in one line."""
    refuse_mixed(agg, "--format hf")
    out: dict[str, list[dict[str, Any]]] = {}
    owner: dict[str, str] = {}
    for _, r in agg.iterrows():
        name = model_name(str(r["method"]), str(r["budget"]), str(r.get("regime", "-")))
        if r.get("source") == "synthetic" and (agg["source"] != "synthetic").any():
            name += "-synthetic"
        if name in out:
            raise ConfigError(f"--format hf: {r['method']} {r['budget']} ({r.get('regime')}) has two configs "
                              f"(run ids {owner[name]}, {r.get('run_id')}) that would be one model; select one with "
                              f"--run-ids or --where")
        owner[name] = str(r.get("run_id"))
        entry: dict[str, Any] = {"dataset": {"id": dataset_id or task, "task_id": task},
                                 "value": round(float(r["metric_value"]), 2)}
        if isinstance(r.get("created_at"), str) and r.get("created_at"):
            entry["date"] = str(r["created_at"])
        entry["notes"] = _hf_notes(r, reference)
        out[name] = [entry]
    return out


def check_hf_entries(entries: Sequence[Mapping[str, Any]]) -> None:
    """Refuse entries outside the documented ``.eval_results`` fields (:data:`HF_ENTRY_KEYS`), and, when
    ``huggingface_hub`` is installed, entries its ``parse_eval_result_entries`` does not read back unchanged."""
    for e in entries:
        for keys, got, where in ((HF_ENTRY_KEYS, e, "entry"), (HF_DATASET_KEYS, e.get("dataset", {}), "dataset"),
                                 *(((HF_SOURCE_KEYS, e["source"], "source"),) if "source" in e else ())):
            extra = set(got) - set(keys)
            missing = [k for k, required in keys.items() if required and k not in got]
            if extra or missing:
                raise ValueError(f".eval_results {where}: unknown {sorted(extra)} / missing {missing}")
        if not isinstance(e["value"], (int, float)) or isinstance(e["value"], bool):
            raise ValueError(f".eval_results value must be a number, got {e['value']!r}")
    try:
        from huggingface_hub import eval_result_entries_to_yaml, parse_eval_result_entries
    except ImportError:
        return
    back = eval_result_entries_to_yaml(parse_eval_result_entries([dict(e) for e in entries]))
    if back != [dict(e) for e in entries]:
        raise ValueError(f"huggingface_hub reads these .eval_results entries back differently: {back}")


def hf_yaml(entries: Sequence[Mapping[str, Any]], header: str) -> str:
    """The text of one ``.eval_results/*.yaml`` file: a comment line, then the entries."""
    import yaml

    check_hf_entries(entries)
    body = yaml.safe_dump([dict(e) for e in entries], sort_keys=False, allow_unicode=True, width=100)
    return f"{HF_MARK}: {header}\n{body}"


__all__ = ["latex_table", "hf_entries", "hf_yaml", "check_hf_entries", "model_name", "tex", "refuse_mixed",
           "LATEX_MARK", "HF_MARK"]
