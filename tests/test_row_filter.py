"""Which rows a table, plot or report reads: ``--where``, ``--run-ids`` and ``--sweep`` (lwbench.row_filter)."""

from __future__ import annotations

import math

import pytest
from test_results import make_row

from lwbench.cli import main
from lwbench.errors import ConfigError
from lwbench.results import ResultStore
from lwbench.row_filter import RowFilter, columns, matches, select_rows, sweep_run_ids
from lwbench.schema import config_hash


def _row(method="lookwhere", k=16, seed=0, lr=5e-4, steps=10, n_eval=100, acc=75.0, **extra):
    row = make_row(method, k, acc, 1.0 if k else 4.0, seed=seed, n_eval=n_eval, **extra)
    row["config"] = {**row["config"], "finetune": {"steps": steps, "lr": lr}, "eval": {"limit": None}}
    row["run_id"] = row["config_hash"] = config_hash(row["config"])
    return row


@pytest.fixture()
def rows(tmp_path):
    store = ResultStore(tmp_path / "store")
    for r in (_row(), _row(seed=1, acc=77.0), _row(lr=1e-3), _row(steps=500, n_eval=64, acc=60.0),
              _row("full", None, acc=80.0, git_dirty=True), _row("tome", 8, acc=70.0)):
        store.write(r)
    return store


def test_where_reads_columns_and_config_keys_and_compares_sensibly(rows):
    all_ = rows.rows()
    assert len(all_) == 6
    assert {r["seed"] for r in select_rows(all_, ["seed=1"])} == {1}
    assert len(select_rows(all_, ["seed=0"])) == 5
    # a config key, dotted; numbers compare as numbers (5e-4 finds 0.0005; "10.0" finds 10)
    assert len(select_rows(all_, ["finetune.steps=500"])) == 1
    assert len(select_rows(all_, ["finetune.lr=5e-4", "finetune.steps=10.0"])) == 4
    assert len(select_rows(all_, ["config.finetune.lr=0.001"])) == 1
    # lists, flags, missing values, text case
    assert len(select_rows(all_, ["config.img_size=64,64"])) == 6 and len(select_rows(all_, ["img_size=64x64"])) == 6
    assert [r["method"] for r in select_rows(all_, ["git_dirty=true"])] == ["full"]
    assert len(select_rows(all_, ["eval.limit=none"])) == 6
    assert len(select_rows(all_, ["method=TOME"])) == 1
    # the same key twice: either value; different keys: all; != excludes
    assert {r["method"] for r in select_rows(all_, ["method=full", "method=tome"])} == {"full", "tome"}
    assert select_rows(all_, ["method=full", "seed=1"]) == []
    assert {r["method"] for r in select_rows(all_, ["method!=lookwhere"])} == {"full", "tome"}
    assert select_rows(all_) == all_  # an empty filter keeps every row
    assert matches(math.nan, "none") and not matches(3, "three") and matches("k=16", "k=16")


def test_a_key_that_is_no_column_is_one_line_with_the_close_names(rows):
    with pytest.raises(ConfigError, match=r"--where nevals=64: no column 'nevals' in these rows; did you mean "
                                          r"n_eval\?"):
        select_rows(rows.rows(), ["nevals=64"])
    with pytest.raises(ConfigError, match="did you mean finetune.steps") as err:
        select_rows(rows.rows(), ["steps=500"])  # the last part of a config key finds it
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--where needs KEY=VALUE"):
        select_rows(rows.rows(), ["seed"])
    assert "finetune.lr" in columns(rows.rows()) and "n_eval" in columns(rows.rows())


def test_an_empty_selection_says_which_condition_emptied_it(rows):
    flt = RowFilter.parse(["method=lookwhere", "seed=3"])
    assert flt.apply(rows.rows()) == []
    assert flt.no_match(rows.rows()) == "no row has seed=3 once method=lookwhere is applied (seed there: 0, 1)"
    assert RowFilter.parse(["n_eval=5"]).no_match(rows.rows()) == "no row has n_eval=5 (n_eval there: 64, 100)"


def test_run_ids_select_those_rows_and_a_unique_prefix_will_do(rows):
    all_ = rows.rows()
    ids = sorted(r["run_id"] for r in all_)
    assert {r["run_id"] for r in select_rows(all_, run_ids=f"{ids[0]},{ids[1]}")} == set(ids[:2])
    assert [r["run_id"] for r in select_rows(all_, run_ids=ids[2][:8])] == [ids[2]]
    with pytest.raises(ConfigError, match="no row has run id 'ffffffffffff'"):
        select_rows(all_, run_ids="ffffffffffff")
    fake = [{"run_id": "abcd1111"}, {"run_id": "abcd2222"}, {"run_id": "abce3333"}]
    with pytest.raises(ConfigError, match=r"'abcd' is the start of 2 run ids \(abcd1111, abcd2222\); give more of it"):
        select_rows(fake, run_ids="abcd")
    with pytest.raises(ConfigError, match="no row has run id 'abc'"):  # too short to be a prefix
        select_rows(fake, run_ids="abc")
    assert select_rows(fake, run_ids="abce") == [fake[2]]
    combined = select_rows(all_, ["method=lookwhere"], run_ids=",".join(ids))
    assert {r["method"] for r in combined} == {"lookwhere"}


SWEEP = """profile: quick
source: synthetic
tasks: [traffic_signs]
seeds: [0]
methods:
  full: null
  random: [k=8]
"""


def test_sweep_selects_the_rows_its_points_produce(tmp_path, capsys):
    """--sweep reuses the sweep wing (expand, the points' run ids): the rows of its points, and only those."""
    from lwbench.sweeps.points import plan_of
    from lwbench.sweeps.spec import expand, load_spec

    path = tmp_path / "traffic_signs_test.yaml"
    path.write_text(SWEEP)
    points = expand(load_spec(str(path)))
    assert sweep_run_ids(str(path)) == [plan_of(p).run_id for p in points]
    store = ResultStore(tmp_path / "store")
    plans = [plan_of(p) for p in points]
    for plan, acc in zip(plans[:1], (80.0,), strict=True):  # only `full` was run
        row = make_row(plan.config["method"], None, acc, 4.0)
        row.update(config=plan.config, run_id=plan.run_id, config_hash=plan.run_id)
        store.write(row)
    store.write(make_row("full", None, 37.5, 4.0, seed=1))  # another full row, not the sweep's
    kept = select_rows(store.rows(), sweep=str(path))
    assert [r["run_id"] for r in kept] == [plans[0].run_id]
    assert "--sweep" in capsys.readouterr().err  # 1 of its 2 points has a row: said on stderr
    assert main(["results", "--results", str(store.root), "--sweep", str(path), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert plans[0].run_id in out and "37.5" not in out


def test_results_plot_and_report_take_the_filter(rows, tmp_path, capsys):
    root = str(rows.root)
    assert main(["results", "--results", root, "--where", "seed=1", "--format", "csv"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and ",77.0," in out[1]
    assert main(["results", "--results", root, "--where", "n_eval=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lwbench: error: no row has n_eval=7 (n_eval there: 64, 100): none of the 6 rows in {root} is "
                   f"left")
    assert main(["results", "--results", root, "--where", "neval=7"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    png = tmp_path / "p.png"
    assert main(["plot", "pareto", "--task", "traffic_signs", "--results", root, "--out", str(png),
                 "--where", "n_eval=100", "--where", "finetune.lr=5e-4"]) == 0
    assert png.stat().st_size > 10_000
    assert main(["report", "--task", "traffic_signs", "--results", root, "--out", str(tmp_path / "rep"),
                 "--where", "method=full", "--where", "method=tome"]) == 0
    csv = (tmp_path / "rep" / "rows.csv").read_text()
    assert csv.count("\n") == 3 and "lookwhere" not in csv
