"""The hard subset (VTC-Bench's filter): each method's accuracy on the test images ``lowres`` gets wrong."""

from __future__ import annotations

import numpy as np
import pytest
from test_results import make_row

from lwbench.report import hard_subset_rows, write_report
from lwbench.results import ResultStore

OUTCOMES = {  # 8 test images; lowres size=24 (the default for lw_vit_test_p8 at 64x64) misses images 0-3
    ("lowres", 24): [0, 0, 0, 0, 1, 1, 1, 1],
    ("lowres", 32): [0, 1, 1, 1, 1, 1, 1, 1],
    ("full", None): [1, 1, 1, 0, 1, 1, 1, 1],
    ("saliency", 8): [1, 0, 0, 0, 1, 1, 1, 1],
}


def _store(tmp_path, outcomes=OUTCOMES):
    store = ResultStore(tmp_path / "res")
    for (method, budget), top1 in outcomes.items():
        row = make_row(method=method, k=None if budget is None else budget, acc=100.0 * np.mean(top1),
                       n_eval=len(top1), regime="finetuned", teacher_id="t0", bootstrap_resamples=200)
        if method == "lowres":
            row.update(budget=f"size={budget}", budget_key="size")
        store.write(row)
        store.write_per_image(row, {"top1": np.asarray(top1, np.uint8)})
    return store


def test_hard_subset_known_answer(tmp_path):
    store = _store(tmp_path)
    flt, hard = hard_subset_rows(store, store.rows(task="traffic_signs"))
    assert (flt["method"], flt["budget"]) == ("lowres", "size=24")  # the default size, not the nearest to full
    got = {(h["method"], h["budget"]): h for h in hard}
    assert got[("full", "-")]["hard"] == pytest.approx(75.0) and got[("full", "-")]["n"] == 4
    assert got[("saliency", "k=8")]["hard"] == pytest.approx(25.0)
    assert got[("lowres", "size=24")]["hard"] == 0.0
    assert got[("lowres", "size=32")]["hard"] == pytest.approx(75.0)
    lo, hi = got[("full", "-")]["ci_low"], got[("full", "-")]["ci_high"]
    assert lo <= 75.0 <= hi and hi - lo > 0


def test_report_has_the_hard_subset_section(tmp_path):
    store = _store(tmp_path)
    write_report(store, "traffic_signs", tmp_path / "rep")
    text = (tmp_path / "rep" / "table.md").read_text()
    assert "## Hard subset: the 4 of 8 test images `lowres size=24` (finetuned) gets wrong" in text
    assert "75.0 [" in text


def test_no_lowres_row_means_no_section(tmp_path):
    store = _store(tmp_path, {k: v for k, v in OUTCOMES.items() if k[0] != "lowres"})
    assert hard_subset_rows(store, store.rows(task="traffic_signs")) == (None, [])
    write_report(store, "traffic_signs", tmp_path / "rep")
    assert "Hard subset" not in (tmp_path / "rep" / "table.md").read_text()


def test_results_table_has_the_hard_subset_column_even_for_one_method(tmp_path):
    """``lwbench results`` shows each row's hard-subset accuracy beside its metric; filtering the frame to one
    method keeps it (the lowres row that defines the subset is read from the store)."""
    from lwbench.report import with_hard_subset
    from lwbench.tables import format_results

    store = _store(tmp_path)
    table = format_results(with_hard_subset(store, store.frame(task="traffic_signs")), "md")
    assert "hard [95% CI]" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| saliency"))
    assert " 25.0 [0.0, 75.0] |" in line
    only_full = with_hard_subset(store, store.frame(task="traffic_signs", method="full"))
    assert list(only_full["hard_value"]) == [pytest.approx(75.0)]
    assert " 75.0 [" in format_results(only_full, "md")


def test_results_table_has_no_hard_column_without_a_lowres_row(tmp_path):
    from lwbench.report import with_hard_subset
    from lwbench.tables import format_results

    store = _store(tmp_path, {k: v for k, v in OUTCOMES.items() if k[0] != "lowres"})
    df = with_hard_subset(store, store.frame(task="traffic_signs"))
    assert "hard_value" not in df.columns and "hard subset" not in format_results(df, "md")


def test_report_pairs_selectors_with_saliency_at_the_same_budget(tmp_path):
    """Known answer: oracle k=8 is right on 7 of 8 images, saliency k=8 on 5; saliency k=32 (another budget) is
    not oracle's reference."""
    from lwbench.report import paired_rows

    outcomes = {**OUTCOMES, ("oracle", 8): [1, 1, 1, 0, 1, 1, 1, 1], ("saliency", 32): [1, 1, 1, 1, 1, 1, 1, 1]}
    store = _store(tmp_path, outcomes)
    pairs = paired_rows(store, store.rows(task="traffic_signs"), reference="saliency", same_budget=True)
    assert [(p["method"], p["budget"]) for p in pairs] == [("oracle", "k=8")]
    assert pairs[0]["diff"] == pytest.approx(25.0) and pairs[0]["reference"] == pytest.approx(62.5)
    write_report(store, "traffic_signs", tmp_path / "rep")
    text = (tmp_path / "rep" / "table.md").read_text()
    assert "## Paired difference to `saliency` at the same budget" in text and "+25.0 [" in text


def test_report_pairs_rows_with_lookwhere_at_matched_gmacs(tmp_path):
    """Known answer: apt at 0.9 GMACs pairs with lookwhere k=16 (0.88, 2% off) and not k=8 (0.4); saint at 1.7
    pairs with nothing (the nearest lookwhere row, 0.88, is 93% off, beyond the 10% tolerance); the difference is
    paired on the same images (apt right on 6 of 8, lookwhere k=16 on 7: -12.5)."""
    from lwbench.report import paired_rows

    store = ResultStore(tmp_path / "res")
    for method, k, gmacs, top1 in [("lookwhere", 8, 0.40, [1, 0, 0, 0, 1, 1, 1, 1]),
                                   ("lookwhere", 16, 0.88, [1, 1, 1, 0, 1, 1, 1, 1]),
                                   ("apt", 6, 0.90, [1, 1, 0, 0, 1, 1, 1, 1]),
                                   ("saint", 1, 1.70, [1, 1, 1, 1, 1, 1, 1, 1])]:
        row = make_row(method=method, k=k, gmacs=gmacs, acc=100.0 * np.mean(top1), n_eval=8, regime="finetuned",
                       teacher_id="t0", bootstrap_resamples=200)
        store.write(row)
        store.write_per_image(row, {"top1": np.asarray(top1, np.uint8)})
    pairs = paired_rows(store, store.rows(task="traffic_signs"), reference="lookwhere", gmacs_within=0.10)
    assert [(p["method"], p["reference_budget"]) for p in pairs] == [("apt", "k=16")]
    assert pairs[0]["diff"] == pytest.approx(-12.5) and pairs[0]["gmacs_ratio"] == pytest.approx(0.88 / 0.90)
    write_report(store, "traffic_signs", tmp_path / "rep")
    text = (tmp_path / "rep" / "table.md").read_text()
    section = text.split("## Paired difference to `lookwhere` at matched GMACs (within 10%)")[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("| apt"))
    assert "| k=16 " in line and "-12.5 [" in line and "0.98x" in line
    assert "| saint" not in section.split("##")[0]
