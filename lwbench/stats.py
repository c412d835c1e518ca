"""Confidence intervals over test images: a seeded percentile bootstrap, and its paired form for two rows.

A metric is computed from per-image "sufficient statistics" kept beside each row, so an interval can be
recomputed and two rows evaluated on the same images can be compared image by image:

* ``top1`` / ``top5``: ``(N,)`` 0/1 per image; the metric is their mean in percent;
* ``miou``: ``(N, 2, C)`` per-image per-class intersection and union pixel counts; the metric is the mean
  over classes with a non-empty union of ``sum(inter) / sum(union)`` (what the whole-set confusion matrix
  gives), in percent.

Resampling draws image indices with replacement; the paired bootstrap uses the *same* indices for both rows,
so a difference shared by both rows' hard images does not inflate its interval (lm-evaluation-harness reports
a standard error per metric for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

LEVEL = 0.95
CHUNK = 256  # resamples per batch: bounds memory at CHUNK x N counts


def _mean_percent(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 100.0 * (counts @ x) / counts.sum(axis=1)


def _miou(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    inter = np.tensordot(counts, x[:, 0, :].astype(np.float64), axes=1)  # (R, C)
    union = np.tensordot(counts, x[:, 1, :].astype(np.float64), axes=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    return 100.0 * np.nanmean(iou, axis=1)


_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "top1": _mean_percent, "top5": _mean_percent, "miou": _miou}


def statistic(metric: str) -> Callable[[np.ndarray], float]:
    """The metric (percent) of a per-image array: ``statistic("top1")(np.array([1, 0, 1, 1])) == 75.0``."""
    if metric not in _STATISTICS:
        raise ValueError(f"no bootstrap statistic for metric '{metric}' (known: {', '.join(_STATISTICS)})")
    fn = _STATISTICS[metric]
    return lambda x: float(fn(np.ones((1, len(x))), np.asarray(x, dtype=np.float64))[0])


def _resampled(x: np.ndarray, metric: str, n_resamples: int, seed: int) -> np.ndarray:
    """The metric on ``n_resamples`` bootstrap resamples of the images of ``x`` (one per row of counts)."""
    fn, n = _STATISTICS[metric], len(x)
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    out = []
    for start in range(0, n_resamples, CHUNK):
        r = min(CHUNK, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        counts = np.zeros((r, n))
        np.add.at(counts, (np.repeat(np.arange(r), n), idx.ravel()), 1.0)
        out.append(fn(counts, x))
    return np.concatenate(out)


def _check(x: Any, metric: str) -> np.ndarray:
    x = np.asarray(x)
    if metric not in _STATISTICS:
        raise ValueError(f"no bootstrap statistic for metric '{metric}' (known: {', '.join(_STATISTICS)})")
    if len(x) == 0:
        raise ValueError("bootstrap over zero images")
    return x


def bootstrap_ci(per_image: Any, metric: str, n_resamples: int = 1000, seed: int = 0,
                 level: float = LEVEL) -> dict[str, Any]:
    """``{value, ci_low, ci_high, se, n_resamples, seed, level}``: the metric and its percentile-bootstrap
    interval over the images of ``per_image``."""
    x = _check(per_image, metric)
    value = statistic(metric)(x)
    stats = _resampled(x, metric, int(n_resamples), int(seed))
    a = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [a, 1 - a])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "se": float(np.nanstd(stats, ddof=1)),
            "n_resamples": int(n_resamples), "seed": int(seed), "level": level}


def paired_bootstrap(a: Any, b: Any, metric: str, n_resamples: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """``{diff, ci_low, ci_high, se, share_not_above, n, ...}`` for ``metric(a) - metric(b)``, both rows
    resampled with the same image indices. ``share_not_above`` is the share of resamples where the
    difference is <= 0 (a one-sided bootstrap p-value for "a beats b")."""
    a, b = _check(a, metric), _check(b, metric)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same test images: {a.shape[0]} vs {b.shape[0]} per-image "
                         f"outcomes (shapes {a.shape} and {b.shape})")
    diff = statistic(metric)(a) - statistic(metric)(b)
    da = _resampled(a, metric, int(n_resamples), int(seed))
    db = _resampled(b, metric, int(n_resamples), int(seed))  # same seed: the same indices
    d = da - db
    q = (1 - level) / 2
    lo, hi = np.nanquantile(d, [q, 1 - q])
    return {"diff": float(diff), "ci_low": float(lo), "ci_high": float(hi), "se": float(np.nanstd(d, ddof=1)),
            "share_not_above": float(np.mean(d <= 0)), "n": int(len(a)), "n_resamples": int(n_resamples),
            "seed": int(seed), "level": level}


__all__ = ["bootstrap_ci", "paired_bootstrap", "statistic", "LEVEL"]
