"""Rows that must never be averaged or read as one comparison (lwbench.mixing): other test sets, teachers, recipes,
and fine-tuned methods beside an off-the-shelf-only `full`. Seeds of one config are still averaged."""

from __future__ import annotations

import math
import re
import warnings

import pandas as pd
import pytest
from test_results import make_row

from lwbench.cli import main
from lwbench.mixing import differences, regime_mismatch
from lwbench.plots import pareto_figure
from lwbench.results import ResultStore, rows_to_frame
from lwbench.schema import config_hash
from lwbench.tables import aggregate_seeds, format_results

RECIPE = "steps=100 lr=0.0005 batch=32 warmup=10"


def readme_and_api_rows() -> list[dict]:
    """The issue's store: the README's main job (lookwhere fine-tuned, timed against `full` off the shelf, 1000 test
    images, a 2000-step teacher), then docs/python_api.md's example: `full` with seed 1, a 50-step teacher and 64
    test images, written into the same folder."""
    base = dict(teacher_id="t2000", teacher_steps=2000, n_eval=1000, regime="off_the_shelf", finetune_recipe="-")
    full = make_row("full", None, 95.6, 0.365, metric_ci_low=94.3, metric_ci_high=96.8, **base)
    lw = make_row("lookwhere", 28, 91.5, 0.04, metric_ci_low=89.7, metric_ci_high=93.2,
                  **{**base, "regime": "finetuned", "finetune_recipe": RECIPE})
    api = make_row("full", None, 37.5, 0.365, seed=1, metric_ci_low=25.0, metric_ci_high=50.0,
                   **{**base, "teacher_id": "t50", "teacher_steps": 50, "n_eval": 64})
    api["config"] = {**api["config"], "teacher": {"steps": 50}, "eval": {"limit": 64}}
    api["run_id"] = api["config_hash"] = config_hash(api["config"])
    for r in (full, lw, api):
        r["replicate_id"] = config_hash({k: v for k, v in r["config"].items() if k != "seed"})
    return [full, lw, api]


def drawn_y(fig) -> list[float]:
    return [float(y) for c in fig.axes[0].collections if (c.get_gid() or "").startswith("points:")
            for _, y in c.get_offsets()]


def test_the_issue_full_reference_is_never_the_mean_of_unrelated_rows():
    """Before: `full (off the shelf): 66.5`, the mean of 95.6 and the API example's 37.5, with only a UserWarning."""
    df = rows_to_frame(readme_and_api_rows())
    with pytest.warns(UserWarning) as rec:
        fig = pareto_figure(df, "traffic_signs")
    said = [str(w.message) for w in rec]
    assert any("rows differ in test set size: 2 rows on 1000 eval images, 1 row on 64 eval images; never "
               "averaged, kept apart; select one with --where n_eval=1000" in s for s in said)
    assert any("rows differ in teacher: 2 rows with teacher 2000 steps, 1 row with teacher 50 steps" in s
               and "--where teacher_steps=2000" in s for s in said)
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts if t.get_gid() == "full_reference_label")
    assert labels == ["full (off the shelf): 95.6", "full (off the shelf, 64 eval images, teacher 50 steps): 37.5"]
    assert not any("66." in t for t in labels)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "full (off the shelf, 64 eval images, teacher 50 steps)" in legend and "full (off the shelf)" in legend
    # the 64-image point is drawn, named, but is no frontier point; the title says what the frontier is over
    rings = next(c for c in ax.collections if c.get_gid() == "pareto_frontier").get_offsets()
    assert 37.5 not in [float(y) for _, y in rings]
    title = re.sub(r"\s+", " ", fig._suptitle.get_text())
    assert "rows with 64 eval images; teacher 50 steps drawn as their own lines" in title
    assert "frontier over the rows with 1000 eval images, teacher 2000 steps only" in title
    # and the README's job itself: lookwhere fine-tuned, `full` only off the shelf
    assert "regimes differ: lookwhere is fine-tuned but `full` only off the shelf" in title


def test_the_issue_table_names_each_rows_test_set_and_teacher_and_says_how_to_pick():
    text = format_results(rows_to_frame(readme_and_api_rows()), "table")
    full_rows = [ln for ln in text.splitlines() if ln.startswith("full")]
    assert len(full_rows) == 2 and any(" 64 " in ln and "50 steps" in ln for ln in full_rows)
    head = next(ln for ln in text.splitlines() if ln.startswith("method"))
    assert "n_eval" in head and "teacher" in head
    notes = [ln for ln in text.splitlines() if ln.startswith(("note:", "  "))]
    joined = " ".join(n.strip() for n in notes)
    assert "rows differ in test set size: 2 rows on 1000 eval images, 1 row on 64 eval images" in joined
    assert "select one with --where n_eval=1000" in joined and "--where teacher_steps=2000" in joined
    # selected, the same store is one comparison again: no note, no extra column
    one = format_results(rows_to_frame([r for r in readme_and_api_rows() if r["n_eval"] == 1000]), "table")
    assert "rows differ" not in one and "n_eval" not in one


def test_seeds_are_averaged_but_never_across_test_sets_teachers_or_recipes():
    base = dict(replicate_id="rep", n_eval=1000, teacher_steps=2000, regime="finetuned", finetune_recipe=RECIPE)
    seeds = [make_row(seed=s, acc=a, **base) for s, a in ((0, 90.0), (1, 92.0))]
    agg = aggregate_seeds(rows_to_frame(seeds))
    assert len(agg) == 1 and agg.loc[0, "metric_value"] == pytest.approx(91.0) and agg.loc[0, "n_seeds"] == 2
    # the same replicate id (a hand-made or edited frame) but another test set / teacher / recipe: kept apart
    for change in ({"n_eval": 64}, {"teacher_steps": 50}, {"finetune_recipe": RECIPE.replace("100", "500")}):
        other = make_row(seed=1, acc=40.0, **{**base, **change})
        agg = aggregate_seeds(rows_to_frame([seeds[0], other]))
        assert sorted(agg["metric_value"]) == [40.0, 90.0], change


def test_recipes_split_the_lines_of_a_figure_and_seed_teachers_are_one_side():
    rows = []
    for seed in (0, 1):  # two seeds: two teacher ids, one teacher setting -> no teacher difference
        for steps, acc in ((100, 90.0 + seed), (500, 93.0 + seed)):
            r = make_row(k=28, acc=acc, seed=seed, regime="finetuned", teacher_id=f"t{seed}", teacher_steps=2000,
                         n_eval=1000, finetune_recipe=RECIPE.replace("100", str(steps)),
                         replicate_id=f"lw{steps}")
            rows.append(r)
    rows.append(make_row(k=28, acc=92.0, seed=0, regime="finetuned", teacher_id="t0", teacher_steps=2000,
                         n_eval=1000, finetune_recipe=RECIPE, replicate_id="lw100b", method="random"))
    df = rows_to_frame(rows)
    diffs = differences(df)
    assert [d.what for d in diffs] == ["fine-tuning recipe"]
    assert diffs[0].where == "--where train.steps=100"  # the config key: off-the-shelf rows carry the profile's
    with pytest.warns(UserWarning, match="rows differ in fine-tuning recipe: 3 rows on ft steps=100, 2 rows on "
                                         "ft steps=500"):
        fig = pareto_figure(df, "traffic_signs")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "lookwhere (k)" in legend and "lookwhere (ft steps=500) (k)" in legend
    assert "mean of 1-2 seeds per point" in fig._suptitle.get_text()  # each recipe's seeds are still averaged
    assert sorted(round(y, 1) for y in drawn_y(fig)) == [90.5, 92.0, 93.5]


def test_finetuned_methods_beside_an_off_the_shelf_only_full_are_said():
    rows = [make_row("full", None, 95.0, 4.0, regime="off_the_shelf"),
            make_row("lookwhere", 28, 91.0, 0.4, regime="finetuned"),
            make_row("tome", 8, 93.0, 2.0, regime="off_the_shelf")]
    df = rows_to_frame(rows)
    line = regime_mismatch(df)
    assert line.startswith("regimes differ: lookwhere is fine-tuned but `full` only off the shelf")
    assert "--where regime=off_the_shelf" in line and "lwbench run --method full --regime finetuned" in line
    with pytest.warns(UserWarning, match="regimes differ: lookwhere is fine-tuned but `full` only off the shelf"):
        fig = pareto_figure(df, "traffic_signs")
    assert "lookwhere is fine-tuned but `full` only off the shelf" in fig._suptitle.get_text().replace("\n", " ")
    assert "note: regimes differ: lookwhere is fine-tuned" in format_results(df, "table")
    both = rows_to_frame([*rows, make_row("full", None, 95.5, 4.0, regime="finetuned", seed=1)])
    assert regime_mismatch(both) == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pareto_figure(both.assign(seed=0), "traffic_signs")  # like for like: nothing to say


def test_plot_prints_each_notice_as_one_line(tmp_path, capsys):
    store = ResultStore(tmp_path / "store")
    for r in readme_and_api_rows():
        store.write(r)
    out = tmp_path / "p.png"
    assert main(["plot", "pareto", "--task", "traffic_signs", "--results", str(store.root), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "lwbench: traffic_signs: rows differ in test set size: 2 rows on 1000 eval images, 1 row on 64 eval " \
           "images; never averaged, kept apart; select one with --where n_eval=1000" in err
    assert all(ln.startswith("lwbench: ") for ln in err) and not any("UserWarning" in ln for ln in err)
    assert main(["plot", "pareto", "--task", "traffic_signs", "--results", str(store.root), "--out", str(out),
                 "--where", "n_eval=1000"]) == 0
    assert "rows differ" not in capsys.readouterr().err


def test_differences_ignore_rows_without_the_columns():
    old = pd.DataFrame([{"method": "full", "metric_value": 1.0}, {"method": "tome", "metric_value": 2.0}])
    assert differences(old) == [] and regime_mismatch(old) == ""
    nan = rows_to_frame([make_row(n_eval=math.nan), make_row(k=8, n_eval=100)])
    assert differences(nan) == []
