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

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

LEVEL = 0.95
CHUNK = 256  # at most this many resamples per batch
MAX_CELLS = 1 << 22  # and at most this many resample x image counts per batch (32 MiB of float64)


def _mean_percent(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 100.0 * (counts @ x) / counts.sum(axis=1)


def _miou(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    inter = np.tensordot(counts, x[:, 0, :].astype(np.float64), axes=1)  # (R, C)
    union = np.tensordot(counts, x[:, 1, :].astype(np.float64), axes=1)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    with warnings.catch_warnings():  # a resample with no labelled class at all is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return 100.0 * np.nanmean(iou, axis=1)


_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "top1": _mean_percent, "top5": _mean_percent, "miou": _miou}


def statistic(metric: str) -> Callable[[np.ndarray], float]:
    """The metric (percent) of a per-image array: ``statistic("top1")(np.array([1, 0, 1, 1])) == 75.0``."""
    if metric not in _STATISTICS:
        raise ValueError(f"no bootstrap statistic for metric '{metric}' (known: {', '.join(_STATISTICS)})")
    fn = _STATISTICS[metric]
    return lambda x: float(fn(np.ones((1, len(x))), np.asarray(x, dtype=np.float64))[0])


def _resampled(xs: tuple[np.ndarray, ...], metric: str, n_resamples: int, seed: int) -> list[np.ndarray]:
    """The metric on ``n_resamples`` bootstrap resamples of the images, for each array of ``xs`` (all of the
    same ``N``) with the *same* resampled images. A resample is a row of per-image counts (how often each image
    was drawn), built with one ``bincount`` per batch, so the metric is a matrix product; batches bound memory
    at ``MAX_CELLS`` counts. The draws depend only on ``seed``, ``N`` and ``n_resamples``."""
    fn, n = _STATISTICS[metric], len(xs[0])
    rng = np.random.default_rng(seed)
    xs = tuple(np.asarray(x, dtype=np.float64) for x in xs)
    chunk = max(1, min(CHUNK, MAX_CELLS // n))
    out: list[list[np.ndarray]] = [[] for _ in xs]
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        idx += np.arange(r)[:, None] * n  # flat indices, one block of n per resample
        counts = np.bincount(idx.ravel(), minlength=r * n).reshape(r, n).astype(np.float64)
        for acc, x in zip(out, xs, strict=True):
            acc.append(fn(counts, x))
    return [np.concatenate(acc) if acc else np.zeros(0) for acc in out]


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
    (stats,) = _resampled((x,), metric, int(n_resamples), int(seed))
    a = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [a, 1 - a])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "se": float(np.nanstd(stats, ddof=1)),
            "n_resamples": int(n_resamples), "seed": int(seed), "level": level}


def paired_bootstrap(a: Any, b: Any, metric: str, n_resamples: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> dict[str, Any]:
    """``{diff, ci_low, ci_high, se, share_not_above, p_two_sided, n, n_resamples, seed, level}`` for
    ``metric(a) - metric(b)``, both rows resampled with the same image indices. ``share_not_above`` is the
    share of resamples where the difference is <= 0 (a one-sided bootstrap p-value for "a beats b");
    ``p_two_sided`` = min(1, 2 x the smaller of the shares <= 0 and >= 0)."""
    a, b = _check(a, metric), _check(b, metric)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same test images: {a.shape[0]} vs {b.shape[0]} per-image "
                         f"outcomes (shapes {a.shape} and {b.shape})")
    diff = statistic(metric)(a) - statistic(metric)(b)
    da, db = _resampled((a, b), metric, int(n_resamples), int(seed))  # the same images for both rows
    d = da - db
    q = (1 - level) / 2
    lo, hi = np.nanquantile(d, [q, 1 - q])
    return {"diff": float(diff), "ci_low": float(lo), "ci_high": float(hi), "se": float(np.nanstd(d, ddof=1)),
            "share_not_above": float(np.mean(d <= 0)),
            "p_two_sided": float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))),
            "n": int(len(a)), "n_resamples": int(n_resamples),
            "seed": int(seed), "level": level}


__all__ = ["bootstrap_ci", "paired_bootstrap", "statistic", "LEVEL"]
