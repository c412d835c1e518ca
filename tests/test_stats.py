"""Known answers for the bootstrap intervals (lwbench/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lwbench.stats import bootstrap_ci, paired_bootstrap, statistic


def test_all_correct_has_a_degenerate_interval():
    ci = bootstrap_ci(np.ones(200, np.uint8), "top1", n_resamples=200, seed=0)
    assert ci["value"] == 100.0 and ci["ci_low"] == 100.0 and ci["ci_high"] == 100.0 and ci["se"] == 0.0


def test_standard_error_matches_the_binomial_one():
    """94% of 1000 images: the binomial standard error is sqrt(.94 * .06 / 1000) = 0.75 points."""
    x = np.zeros(1000, np.uint8)
    x[:940] = 1
    ci = bootstrap_ci(x, "top1", n_resamples=2000, seed=1)
    assert ci["value"] == pytest.approx(94.0)
    assert ci["se"] == pytest.approx(100 * (0.94 * 0.06 / 1000) ** 0.5, rel=0.1)
    assert ci["ci_low"] < 94.0 < ci["ci_high"] and ci["ci_high"] - ci["ci_low"] == pytest.approx(4 * 0.75, rel=0.15)


def test_seeded_and_reproducible():
    x = np.random.default_rng(3).integers(0, 2, 300)
    assert bootstrap_ci(x, "top1", 300, seed=5) == bootstrap_ci(x, "top1", 300, seed=5)
    other = [bootstrap_ci(x, "top1", 300, seed=s)["se"] for s in (6, 7, 8)]
    assert any(se != bootstrap_ci(x, "top1", 300, seed=5)["se"] for se in other)  # the seed matters


def test_paired_difference_of_identical_rows_is_exactly_zero():
    x = np.random.default_rng(0).integers(0, 2, 500)
    d = paired_bootstrap(x, x, "top1", 500, seed=0)
    assert d["diff"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0


def test_paired_interval_is_narrower_than_unpaired_on_correlated_rows():
    """b fails on the same hard images as a plus 2% more: the paired interval of the 2-point gap is tight, the
    gap between two independent intervals is not."""
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.9).astype(np.uint8)
    b = a.copy()
    b[np.flatnonzero(a)[:20]] = 0
    d = paired_bootstrap(a, b, "top1", 1000, seed=0)
    assert d["diff"] == pytest.approx(2.0) and d["ci_low"] > 0 and d["share_not_above"] == 0.0
    ua, ub = bootstrap_ci(a, "top1", 1000, 1), bootstrap_ci(b, "top1", 1000, 2)
    assert d["ci_high"] - d["ci_low"] < 0.5 * ((ua["ci_high"] - ua["ci_low"]) + (ub["ci_high"] - ub["ci_low"]))
    with pytest.raises(ValueError, match="same test images: 1000 vs 999"):
        paired_bootstrap(a, b[:-1], "top1")


def test_miou_statistic_equals_the_confusion_matrix_miou():
    """Two images, three classes. Whole set: class 0 inter 5 / union 10, class 1 6 / 8, class 2 never present."""
    x = np.array([[[3, 4, 0], [6, 5, 0]],
                  [[2, 2, 0], [4, 3, 0]]])  # (N, 2 = inter/union, C)
    assert statistic("miou")(x) == pytest.approx(100 * (5 / 10 + 6 / 8) / 2)
    ci = bootstrap_ci(x, "miou", 200, seed=0)
    assert 0 <= ci["ci_low"] <= ci["value"] <= ci["ci_high"] <= 100
    with pytest.raises(ValueError, match="no bootstrap statistic for metric 'auc'"):
        bootstrap_ci(x, "auc")


def test_a_resample_skips_classes_it_never_sees():
    """Class 1 lives only in image 0: a resample of image 1 alone scores class 0 only (as the whole-set mIoU of
    those images would), and the top-1 statistic is a plain mean."""
    x = np.array([[[1, 3], [2, 4]],
                  [[3, 0], [4, 0]]])
    assert statistic("miou")(x[[1, 1]]) == pytest.approx(75.0)
    assert statistic("miou")(x) == pytest.approx(100 * (4 / 6 + 3 / 4) / 2)
    assert statistic("top1")(np.array([1, 0, 1, 1])) == 75.0 and statistic("top5")(np.ones(3)) == 100.0


def test_batching_does_not_change_the_draws(monkeypatch):
    """Memory is bounded by drawing resamples in batches; the batch size leaves every number as it was."""
    import lwbench.stats as st

    x = (np.random.default_rng(0).random(1000) < 0.8).astype(np.uint8)
    whole = bootstrap_ci(x, "top1", 300, seed=4)
    monkeypatch.setattr(st, "MAX_CELLS", 7 * 1000)  # 7 resamples per batch
    assert bootstrap_ci(x, "top1", 300, seed=4) == whole


def test_paired_p_value_and_same_images_for_both_rows():
    rng = np.random.default_rng(1)
    a = (rng.random(800) < 0.7).astype(np.uint8)
    same = paired_bootstrap(a, a, "top1", 200, seed=0)
    assert same["p_two_sided"] == 1.0 and same["share_not_above"] == 1.0 and same["n"] == 800
    b = 1 - a  # a's resampled mean minus b's is 2 * mean(a) - 100 on every resample: the same images
    d = paired_bootstrap(a, b, "top1", 200, seed=0)
    ua = bootstrap_ci(a, "top1", 200, seed=0)
    assert d["ci_low"] == pytest.approx(2 * ua["ci_low"] - 100)
    assert d["ci_high"] == pytest.approx(2 * ua["ci_high"] - 100)
    assert d["p_two_sided"] == 0.0 and d["share_not_above"] == 0.0
    seg = np.random.default_rng(0).integers(1, 50, (30, 2, 4))
    with pytest.raises(ValueError, match="same test images: 30 vs 29"):
        paired_bootstrap(seg, seg[:-1], "miou")
