"""``lwbench compare`` plans a fair comparison, ``lwbench recommend`` answers from stored rows, and every ``run``
ends with the next step a fair picture needs (issue: from the first command to an answer)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_results import make_row

from lwbench.compare import comparison_spec, default_regimes, plan_table, planned_points
from lwbench.errors import ConfigError, LwbenchError
from lwbench.estimates import Estimate, duration, point_estimate
from lwbench.next_step import next_step
from lwbench.recommend import format_recommendation, recommend
from lwbench.results import ResultStore

TINY = ["teacher.steps=2", "train.steps=2", "eval.limit=8", "measure.min_run_time=0.01", "measure.warmup=1"]


# -- compare: the plan ------------------------------------------------------------------------------------------
def test_the_plan_adds_full_and_matches_budgets_by_key():
    spec = comparison_spec("traffic_signs", "lookwhere,tome,saliency", budgets=["k=28,k=75", "r=8"])
    assert spec["methods"] == {"full": None, "lookwhere": ["k=28", "k=75"], "tome": ["r=8"],
                               "saliency": ["k=28", "k=75"]}  # both selectors meet at the same k
    assert spec["regimes"] == ["finetuned"]  # LookWhere trains: every method gets the same recipe


def test_selectors_without_budgets_meet_at_the_first_ones_default_k():
    spec = comparison_spec("traffic_signs", "lookwhere,saliency,tome")
    assert spec["methods"]["lookwhere"] == spec["methods"]["saliency"] == ["k=28"]  # saliency's own default: k=38
    assert spec["methods"]["tome"] is None  # alone with its key: its own default


def test_training_free_methods_alone_compare_off_the_shelf():
    assert default_regimes(["tome", "evit"]) == ["off_the_shelf"]
    assert comparison_spec("billiards", "tome,evit")["methods"] == {"full": None, "tome": None, "evit": None}


@pytest.mark.parametrize("budgets, says", [(["k28"], "key=value"), (["size=40"], "matches none")])
def test_bad_budgets_are_one_line(budgets, says):
    with pytest.raises(ConfigError, match=says):
        comparison_spec("traffic_signs", "lookwhere,tome", budgets=budgets)


def test_unknown_method_is_refused_before_any_work():
    with pytest.raises(LwbenchError, match="Did you mean: lookwhere"):
        comparison_spec("traffic_signs", "lookwher,tome")


def test_dry_run_plan_lists_points_with_estimates_and_a_total(tmp_path, monkeypatch):
    spec = comparison_spec("traffic_signs", "lookwhere,tome")
    points = planned_points(spec, {"results": str(tmp_path / "res")}, TINY)
    assert [p.cfg.method for p in points] == ["full", "lookwhere", "tome"]
    assert all(not p.done and p.estimate.seconds > 0 for p in points)
    text = plan_table(points)
    assert "3 points, 3 to run" in text and "in all" in text and "about" in text
    # a stored row is skipped and costs nothing
    stored = points[0].plan.run_id
    monkeypatch.setattr(ResultStore, "has", lambda self, run_id: run_id == stored)
    again = planned_points(spec, {"results": str(tmp_path / "res")}, TINY)
    assert again[0].done and again[0].estimate.seconds == 0
    assert "stored (skipped)" in plan_table(again)


def test_estimates_come_from_stored_rows_and_skip_cached_work():
    class _Plan:  # what point_estimate reads: the teacher and stage states, the effort, the method
        class cfg:
            method = "tome"

            class teacher:
                steps, probe_steps = 10, 0
            retrain_teacher = False
        teacher_id = "t-never-cached"
        run_id = "r-never-cached"

        def effort(self):
            return {"pretrain_steps": 0, "finetune_steps": 100}

    history = pd.DataFrame([{"method": "tome", "regime": "finetuned", "method_train_time_s": 200.0,
                             "wall_time_s": 40.0, "pretrain_steps": 0, "finetune_steps": 100,
                             "teacher_train_time_s": 30.0, "teacher_steps": 10}])
    est = point_estimate(_Plan(), [(history, "rows")])
    assert est == Estimate(30.0 + 200.0 + 40.0, "rows")  # teacher 10 x 3 s, 100 steps x 2 s, one measurement
    assert point_estimate(_Plan(), [(history, "rows")], done=True).seconds == 0
    # one row of another method on this machine does not stand in for tome when the reference has tome
    mine = history.assign(method="lookwhere", method_train_time_s=5000.0)
    assert point_estimate(_Plan(), [(mine, "yours"), (history, "reference")]).source == "reference"
    assert point_estimate(_Plan(), [(mine, "yours")]).seconds > 5000
    assert duration(45) == "about 40 s" and duration(240) == "about 4 min" and duration(0) == "nothing to run"


def test_compare_runs_the_plan_and_shows_only_its_rows(tmp_path, capsys):
    from lwbench.compare import compare

    res = tmp_path / "res"
    ResultStore(res).write(make_row(method="full", k=None, acc=12.3, regime="off_the_shelf"))  # unrelated row
    sets = TINY + ["task.n_train=32", "task.n_test=8", "task.n_val=8", "measure.isolate=false", "threads=1",
                   "measure.max_run_time=0.2", "measure.min_runs=2", "measure.throughput_batch=2",
                   "measure.flops_images=1", "teacher.batch_size=4", "train.batch_size=4"]
    failed = compare("traffic_signs", "tome", flags={"results": str(res), "img_size": (96, 128)}, sets=sets,
                     plot_out=tmp_path / "cmp.png")
    out = capsys.readouterr().out
    assert failed == 0 and (tmp_path / "cmp.png").is_file()
    assert "points vs full, paired over 8 images" in out and "12.3" not in out
    assert out.count("top1 % [95% CI]") == 1  # one table: the sweep's own closing table is left out


# -- recommend ---------------------------------------------------------------------------------------------------
def _store(tmp_path, outcomes):
    store = ResultStore(tmp_path / "res")
    for (method, k, gmacs, speed), top1 in outcomes.items():
        row = make_row(method=method, k=k, acc=100.0 * np.mean(top1), gmacs=gmacs, n_eval=len(top1),
                       regime="finetuned", teacher_id="t0", bootstrap_resamples=200, speedup=speed,
                       speedup_ci_low=speed * 0.95, speedup_ci_high=speed * 1.05, metric_ci_low=0, metric_ci_high=100)
        store.write(row)
        store.write_per_image(row, {"top1": np.asarray(top1, np.uint8)})
    return store


RNG = np.random.default_rng(0)
N = 400
GOOD = (RNG.random(N) < 0.95).astype(int)
OUTCOMES = {
    ("full", None, 1.0, 1.0): GOOD,
    ("lookwhere", 28, 0.10, 3.0): np.where(RNG.random(N) < 0.9, GOOD, 0),          # ~86%
    ("saliency", 28, 0.09, 3.2): np.where(RNG.random(N) < 0.6, GOOD, 0),           # ~57%
    ("tome", 8, 0.70, 1.3): np.where(RNG.random(N) < 0.98, GOOD, 0),               # ~93%
    ("oracle", 28, 0.09, 3.1): GOOD,                                               # reads the annotations
}


def test_recommend_under_a_gmac_ceiling_pairs_the_winner_with_the_runner_up(tmp_path):
    store = _store(tmp_path, OUTCOMES)
    rec = recommend(store, store.frame(task="traffic_signs"), "max_gmacs", 0.2)
    assert rec.winner["method"] == "lookwhere" and rec.runner_up["method"] == "saliency"  # oracle left out
    assert not rec.tied and "paired over 400 images" in rec.comparison
    text = format_recommendation(rec)
    assert "left out oracle" in text and "ahead of the runner-up" in text


def test_recommend_above_an_accuracy_floor_picks_the_fastest_and_says_tied(tmp_path):
    store = _store(tmp_path, OUTCOMES)
    rec = recommend(store, store.frame(task="traffic_signs"), "min_accuracy", 80)
    assert rec.winner["method"] == "lookwhere" and rec.runner_up["method"] == "tome" and not rec.tied
    close = {**OUTCOMES, ("tome", 8, 0.70, 2.9): OUTCOMES[("tome", 8, 0.70, 1.3)]}
    del close[("tome", 8, 0.70, 1.3)]
    store2 = _store(tmp_path / "b", close)
    rec2 = recommend(store2, store2.frame(task="traffic_signs"), "min_accuracy", 80)
    assert rec2.tied and "tied" in format_recommendation(rec2)  # 3.0x [2.85, 3.15] vs 2.9x [2.76, 3.05]


def test_recommend_with_nothing_under_the_constraint_says_what_is_stored(tmp_path):
    store = _store(tmp_path, OUTCOMES)
    rec = recommend(store, store.frame(task="traffic_signs"), "max_gmacs", 0.01)
    assert rec.winner is None and "no stored row has at most 0.01 GMACs" in format_recommendation(rec)


def test_recommend_never_pairs_rows_of_another_teacher(tmp_path):
    store = _store(tmp_path, OUTCOMES)
    store.write(make_row(method="evit", k=None, acc=99.0, gmacs=0.05, n_eval=50, teacher_id="other"))
    rec = recommend(store, store.frame(task="traffic_signs"), "max_gmacs", 0.2)
    assert rec.winner["method"] == "lookwhere" and "1 row(s) on another teacher or test set left out" in rec.note


# -- the next step -----------------------------------------------------------------------------------------------
def test_a_single_row_asks_for_full_in_its_regime_then_for_a_second_method_then_for_the_floor(tmp_path):
    lw = make_row(method="lookwhere", k=28, regime="finetuned", teacher_id="t0")
    full = make_row(method="full", k=None, regime="finetuned", teacher_id="t0")
    tome = make_row(method="tome", k=8, regime="finetuned", teacher_id="t0")
    sal = make_row(method="saliency", k=28, regime="finetuned", teacher_id="t0")
    res = str(tmp_path / "res")
    step = next_step(pd.DataFrame([lw]), "traffic_signs", res)
    assert "no `full` fine-tuned row" in step and "lwbench run --method full --task traffic_signs --regime " \
                                                   "finetuned" in step and "about" in step
    assert "lwbench compare --task traffic_signs --methods lookwhere,saliency" in next_step(
        pd.DataFrame([lw, full]), "traffic_signs", res)
    assert "lwbench run --method saliency --task traffic_signs --budget k=28" in next_step(
        pd.DataFrame([lw, full, tome]), "traffic_signs", res)
    assert "lwbench recommend --task traffic_signs" in next_step(pd.DataFrame([lw, full, tome, sal]),
                                                                 "traffic_signs", res)


# -- show --compare ----------------------------------------------------------------------------------------------
def test_disagreeing_images_are_those_where_stored_outcomes_differ():
    from lwbench.show_compare import disagreeing

    a = {0: 1, 1: 1, 2: 0, 3: 1}
    b = {0: 1, 1: 0, 2: 0, 3: 0, 9: 1}  # image 9 was not evaluated by a: never drawn as a disagreement
    assert disagreeing([a, b]) == [1, 3]
    assert disagreeing([a, a]) == []


def test_show_compare_disagree_needs_stored_rows_and_says_which_command_makes_them(tmp_path):
    from lwbench.show_compare import choose_images

    class _Task:
        name = "traffic_signs"

        @staticmethod
        def dataset(split):
            return range(10)

    class _Plan:
        def __init__(self, name, run_id):
            self.task, self.run_id = _Task(), run_id
            self.method = type("M", (), {"name": name})()

    store = _store(tmp_path, {k: v for k, v in OUTCOMES.items() if k[0] in ("full", "lookwhere")})
    rows = {r["method"]: r["run_id"] for r in store.rows(task="traffic_signs")}
    plans = [_Plan("lookwhere", rows["lookwhere"]), _Plan("full", rows["full"])]
    idx, how = choose_images(plans, store, 3, disagree=True)
    want = [i for i in range(N) if OUTCOMES[("full", None, 1.0, 1.0)][i] != OUTCOMES[("lookwhere", 28, 0.10, 3.0)][i]]
    assert idx == want[:3] and f"of the {len(want)} test images where the methods disagree" in how
    assert choose_images(plans, store, 3, disagree=False) == ([0, 1, 2], "the first 3 test images")
    with pytest.raises(ConfigError, match="tome has no row .* run `lwbench compare --task traffic_signs --methods "
                                          "lookwhere,tome` first"):
        choose_images([*plans, _Plan("tome", "nope")], store, 3, disagree=True)


def test_the_synthetic_source_notice_is_said_once_per_process(caplog, tmp_path):
    """compare plans each point (and the next step plans one more): the newcomer saw the same notice seven times."""
    import logging

    from lwbench import task as task_module

    task_module._SYNTHETIC_NOTICES.clear()
    with caplog.at_level(logging.INFO, logger="lwbench"):
        planned_points(comparison_spec("traffic_signs", "tome,evit"), {"results": str(tmp_path)}, TINY)
    assert sum("no real data found" in r.getMessage() for r in caplog.records) == 1
