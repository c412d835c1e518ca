"""``lwbench recommend``: the README's question answered from stored rows. Under a cost ceiling (GMACs or measured
latency) the most accurate method and budget; above an accuracy floor the cheapest (by paired speed-up when every
candidate was timed, else by GMACs). The winner is set against the runner-up with an interval (paired bootstrap over
the same test images for accuracy, the two speed-up intervals for speed) and called **tied** when the interval
cannot tell them apart, so a recommendation never rests on noise.

Only comparable rows compete: one task, one teacher and one test set (the largest group of rows; what was left out is
said). A config with several seeds competes with its mean and is paired on its first seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lwbench.errors import ConfigError

CONSTRAINTS = ("max_gmacs", "max_latency_ms", "min_accuracy")


@dataclass(frozen=True)
class Recommendation:
    """The answer: ``winner`` and ``runner_up`` rows (dicts), the comparison between them and the candidates."""

    constraint: str
    limit: float
    winner: dict[str, Any] | None
    runner_up: dict[str, Any] | None
    comparison: str
    tied: bool
    candidates: pd.DataFrame
    note: str = ""


def _label(r: dict[str, Any]) -> str:
    budget = r.get("budget")
    regime = str(r.get("regime", "")).replace("_", " ")
    return f"{r['method']}{' ' + budget if budget and budget != '-' else ''} ({regime})"


def comparable(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The largest group of rows sharing teacher and test-set size (rows of other groups would not pair), and a note
    naming what was left out."""
    keys = [k for k in ("teacher_id", "n_eval", "source") if k in df]
    if not keys or df.empty:
        return df, ""
    groups = df.groupby(keys, dropna=False)
    if groups.ngroups <= 1:
        return df, ""
    best = max(groups.groups, key=lambda g: len(groups.groups[g]))
    kept = groups.get_group(best)
    left = len(df) - len(kept)
    desc = ", ".join(f"{k}={v}" for k, v in zip(keys, best if isinstance(best, tuple) else (best,), strict=True))
    return kept, (f"note: {left} row(s) on another teacher or test set left out (kept the {len(kept)} rows with "
                  f"{desc}); select rows with lwbench results to see them")


def candidates(df: pd.DataFrame) -> pd.DataFrame:
    """One line per method/budget/regime: mean metric over seeds, its first seed's row for pairing."""
    df = df[df.get("status", "ok").fillna("ok") == "ok"] if "status" in df else df
    out = []
    for _, g in df.groupby(["method", "budget", "regime"], dropna=False):
        g = g.sort_values("seed") if "seed" in g else g
        first = g.iloc[0].to_dict()
        first["metric_mean"] = float(pd.to_numeric(g["metric_value"], errors="coerce").mean())
        first["seeds"] = int(g["seed"].nunique()) if "seed" in g else 1
        out.append(first)
    return pd.DataFrame(out)


def _reads_annotations(method: str) -> bool:
    from lwbench.registry import METHODS

    try:
        return bool(getattr(METHODS.get(method), "reads_annotations", False))
    except Exception:  # a row of a method not installed here: judged by its row only
        return False


def _number(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def _speed_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    lo_a, hi_b = _number(a.get("speedup_ci_low")), _number(b.get("speedup_ci_high"))
    return not (math.isfinite(lo_a) and math.isfinite(hi_b)) or lo_a <= hi_b


def recommend(store: Any, df: pd.DataFrame, constraint: str, limit: float) -> Recommendation:
    """``df``: the stored rows of one task (already filtered). ``constraint`` one of :data:`CONSTRAINTS`."""
    from lwbench.stats import paired_bootstrap

    if constraint not in CONSTRAINTS:
        raise ConfigError(f"constraint must be one of {', '.join(CONSTRAINTS)}, not '{constraint}'")
    if df.empty:
        raise ConfigError("no stored rows to recommend from; run e.g. `lwbench compare --task traffic_signs "
                          "--methods lookwhere,tome,evit` first")
    rows, note = comparable(df)
    refs = sorted(m for m in rows["method"].unique() if _reads_annotations(m))
    if refs:
        rows = rows[~rows["method"].isin(refs)]
        note = "\n".join(n for n in (note, f"note: left out {', '.join(refs)}: reads the test annotations (a "
                                            "ceiling to read the others against, not a method to deploy)") if n)
    cand = candidates(rows)
    metric_name = str(cand["metric"].iloc[0]) if "metric" in cand else "top1"
    if constraint == "max_gmacs":
        fit = cand[pd.to_numeric(cand["gmacs"], errors="coerce") <= limit]
        fit = fit.sort_values("metric_mean", ascending=False)
    elif constraint == "max_latency_ms":
        if "latency_ms" not in cand or cand["latency_ms"].isna().all():
            raise ConfigError("no stored row was timed; rerun without --set measure.latency=false")
        fit = cand[pd.to_numeric(cand["latency_ms"], errors="coerce") <= limit]
        fit = fit.sort_values("metric_mean", ascending=False)
    else:
        fit = cand[cand["metric_mean"] >= limit]
        timed = "speedup" in fit and fit["speedup"].notna().all() and len(fit)
        fit = (fit.sort_values("speedup", ascending=False) if timed else
               fit.sort_values("gmacs", ascending=True))
    if fit.empty:
        return Recommendation(constraint, limit, None, None, "no stored row meets the constraint", False, cand, note)
    winner = fit.iloc[0].to_dict()
    others = fit[fit["method"] != winner["method"]]  # the question is which method: the best of another one
    runner = others.iloc[0].to_dict() if len(others) else None
    if runner is None:
        return Recommendation(constraint, limit, winner, None, "the only method that meets the constraint", False,
                              fit, note)
    if constraint in ("max_gmacs", "max_latency_ms"):
        a, b = store.per_image(winner).get(metric_name), store.per_image(runner).get(metric_name)
        if a is None or b is None or len(a) != len(b):
            return Recommendation(constraint, limit, winner, runner, "not paired (per-image outcomes missing)",
                                  False, fit, note)
        d = paired_bootstrap(a, b, metric_name, n_resamples=int(winner.get("bootstrap_resamples") or 1000))
        tied = d["ci_low"] <= 0.0
        text = (f"{d['diff']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] points over {_label(runner)}, "
                f"paired over {d['n']} images")
        return Recommendation(constraint, limit, winner, runner, text, tied, fit, note)
    if "speedup" in winner and math.isfinite(_number(winner.get("speedup"))):
        tied = _speed_overlap(winner, runner)
        text = (f"speed-up {_number(winner['speedup']):.2f}x [{_number(winner.get('speedup_ci_low')):.2f}, "
                f"{_number(winner.get('speedup_ci_high')):.2f}] against {_label(runner)}'s "
                f"{_number(runner['speedup']):.2f}x [{_number(runner.get('speedup_ci_low')):.2f}, "
                f"{_number(runner.get('speedup_ci_high')):.2f}] (both paired against full)")
    else:
        tied = math.isclose(_number(winner["gmacs"]), _number(runner["gmacs"]), rel_tol=1e-3)
        text = f"{_number(winner['gmacs']):.3g} GMACs against {_label(runner)}'s {_number(runner['gmacs']):.3g}"
    return Recommendation(constraint, limit, winner, runner, text, tied, fit, note)


def format_recommendation(rec: Recommendation, top: int = 5) -> str:
    """The answer in one line, the reason, then the best few candidates."""
    from tabulate import tabulate

    what = {"max_gmacs": f"at most {rec.limit:g} GMACs", "max_latency_ms": f"at most {rec.limit:g} ms at batch 1",
            "min_accuracy": f"at least {rec.limit:g} accuracy"}[rec.constraint]
    lines = [rec.note] if rec.note else []
    if rec.winner is None:
        best = rec.candidates
        lines.append(f"no stored row has {what}; the stored rows span "
                     f"{_number(best['metric_mean'].min()):.1f}-{_number(best['metric_mean'].max()):.1f} accuracy and "
                     f"{_number(best['gmacs'].min()):.3g}-{_number(best['gmacs'].max()):.3g} GMACs")
        return "\n".join(lines)
    goal = "most accurate" if rec.constraint != "min_accuracy" else "fastest"
    verdict = "tied with the runner-up" if rec.tied else "ahead of the runner-up"
    lines.append(f"{goal} with {what}: {_label(rec.winner)}, {rec.winner['metric_mean']:.1f} "
                 f"[{_number(rec.winner.get('metric_ci_low')):.1f}, {_number(rec.winner.get('metric_ci_high')):.1f}]"
                 f", {_number(rec.winner['gmacs']):.3g} GMACs"
                 + (f" ({verdict}: {rec.comparison})" if rec.runner_up is not None else f" ({rec.comparison})"))
    if rec.tied:
        lines.append("tied: the interval includes no difference, so either is a fair choice; more test images or "
                     "seeds would separate them")
    table = [[_label(r), f"{r['metric_mean']:.1f}", f"{_number(r['gmacs']):.3g}",
              f"{_number(r.get('speedup')):.2f}x" if math.isfinite(_number(r.get('speedup'))) else "-",
              f"{_number(r.get('latency_ms')):.1f}" if math.isfinite(_number(r.get('latency_ms'))) else "-",
              r.get("seeds", 1)] for r in rec.candidates.head(top).to_dict("records")]
    lines.append(tabulate(table, headers=["candidate", "accuracy", "GMACs", "speed-up bs1", "ms bs1", "seeds"]))
    return "\n".join(lines)


__all__ = ["recommend", "format_recommendation", "Recommendation", "candidates", "comparable", "CONSTRAINTS"]
