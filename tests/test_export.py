"""``lwbench report --format latex|hf``: a paper-ready LaTeX table and Hugging Face ``.eval_results`` files, checked
against golden files built from a small fixed store (regenerate them with ``LWBENCH_REGEN_GOLDEN=1``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_results import make_row

from lwbench.cli import main
from lwbench.errors import ConfigError
from lwbench.export import HF_DATASET_KEYS, HF_ENTRY_KEYS, check_hf_entries, model_name, tex
from lwbench.report import write_report
from lwbench.results import ResultStore
from lwbench.row_filter import RowFilter
from lwbench.schema import config_hash

GOLDEN = Path(__file__).parent / "golden" / "export"
RECIPE = "steps=100 lr=0.0005 batch=32 warmup=10"
# (method, budget value, regime, per-image top-1 on 8 test images, GMACs, speed-up [low, high] or None)
POINTS = (
    ("full", None, "finetuned", [1, 1, 1, 0, 1, 1, 1, 1], 0.365, None),
    ("full", None, "off_the_shelf", [1, 1, 1, 1, 1, 1, 0, 1], 0.365, None),
    ("lookwhere", 28, "finetuned", [1, 1, 0, 0, 1, 1, 1, 1], 0.0399, (1.72, 1.55, 1.83)),
    ("topk_random", 8, "finetuned", [1, 0, 0, 0, 1, 0, 1, 1], 0.261, (1.0, 0.7, 1.4)),
    ("tome", 4, "off_the_shelf", [1, 1, 1, 1, 1, 0, 0, 1], 0.271, (0.79, 0.75, 0.9)),
)


def fixed_store(root: Path) -> ResultStore:
    store = ResultStore(root)
    for method, k, regime, top1, gmacs, speed in POINTS:
        row = make_row(method, k, 100.0 * float(np.mean(top1)), gmacs, n_eval=len(top1), regime=regime,
                       teacher_id="t2000", teacher_steps=2000, bootstrap_resamples=200, bootstrap_seed=0,
                       finetune_recipe=RECIPE if regime == "finetuned" else "-", created_at="2026-12-07T01:44:21Z",
                       device_name="Test CPU", threads=2, img_size="240x320", gmac_ratio=0.365 / gmacs)
        row["config"] = {**row["config"], "regime": regime}
        row["run_id"] = row["config_hash"] = config_hash(row["config"])
        row["replicate_id"] = config_hash({**row["config"], "seed": None})
        if method == "topk_random":
            row.update(budget="keep_rate=0.7", budget_key="keep_rate", budget_value=0.7)
        if method == "tome":
            row.update(budget="r=4", budget_key="r")
        if speed:
            row.update(speedup=speed[0], speedup_ci_low=speed[1], speedup_ci_high=speed[2],
                       speedup_reliable=speed[2] / speed[1] <= 1.25)
        lo, hi = (100.0 * max(0.0, np.mean(top1) - 0.25), 100.0 * min(1.0, np.mean(top1) + 0.2))
        row.update(metric_ci_low=lo, metric_ci_high=hi)
        store.write(row)
        store.write_per_image(row, {"top1": np.asarray(top1, np.uint8)})
    return store


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LWBENCH_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file (LWBENCH_REGEN_GOLDEN=1 rewrites it)"


def test_latex_table_matches_its_golden_file(tmp_path):
    store = fixed_store(tmp_path / "store")
    written = write_report(store, "traffic_signs", tmp_path / "tex", fmt="latex", command="lwbench sweep x.yaml")
    assert [p.name for p in written] == ["table.tex"]
    text = written[0].read_text()
    _golden("table.tex", text)
    for bit in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{llrrrr}", r"topk\_random",
                r"keep\_rate=0.7", r"\textit{Fine-tuned}", r"\textit{Off the shelf}", r"1.72$\times$",
                r"0.0399", r"$\Delta$ vs.\ \texttt{full}", r"$^\dagger$"):
        assert bit in text, bit
    body = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("lookwhere")]
    assert body == [r"lookwhere & k=28 & 75.0 [50.0, 95.0] & 0.0399 & 1.72$\times$ & $-12.5$ [$-37.5$, $+0.0$] \\"]
    # rewriting its own file is the normal way to regenerate; a stranger's table.tex is refused
    write_report(store, "traffic_signs", tmp_path / "tex", fmt="latex")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "table.tex").write_text("my paper\n")
    with pytest.raises(ConfigError, match="was not written by lwbench report"):
        write_report(store, "traffic_signs", tmp_path / "mine", fmt="latex")


def test_hf_eval_results_match_their_golden_files_and_the_hub_format(tmp_path):
    store = fixed_store(tmp_path / "store")
    written = write_report(store, "traffic_signs", tmp_path / "hf", fmt="hf", hf_dataset="lwbench/traffic-signs")
    names = sorted(str(p.relative_to(tmp_path / "hf")) for p in written)
    assert names == sorted(f"{m}/.eval_results/traffic_signs.yaml" for m in
                           ("full-finetuned", "full-off_the_shelf", "lookwhere-k28-finetuned",
                            "topk_random-keep_rate0.7-finetuned", "tome-r4-off_the_shelf"))
    for p in written:
        text = p.read_text()
        _golden(str(p.relative_to(tmp_path / "hf")).replace("/.eval_results/", "__"), text)
        entries = yaml.safe_load(text)
        assert isinstance(entries, list) and len(entries) == 1
        e = entries[0]
        # the documented fields only (https://huggingface.co/docs/hub/eval-results), the required ones present
        assert set(e) <= set(HF_ENTRY_KEYS) and set(e["dataset"]) <= set(HF_DATASET_KEYS)
        assert {k for k, req in HF_ENTRY_KEYS.items() if req} <= set(e)
        assert e["dataset"] == {"id": "lwbench/traffic-signs", "task_id": "traffic_signs"}
        assert isinstance(e["value"], float) and e["date"] == "2026-12-07T01:44:21Z"
    lw = yaml.safe_load((tmp_path / "hf" / "lookwhere-k28-finetuned/.eval_results/traffic_signs.yaml").read_text())[0]
    assert lw["value"] == 75.0 and "fine-tuned (steps=100" in lw["notes"] and "1.72x speed-up over full" in lw["notes"]


def test_hf_entries_read_back_by_huggingface_hub(tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    store = fixed_store(tmp_path / "store")
    for p in write_report(store, "traffic_signs", tmp_path / "hf", fmt="hf"):
        data = yaml.safe_load(p.read_text())
        entries = hub.parse_eval_result_entries(data)
        assert entries[0].dataset_id == "traffic_signs" and entries[0].task_id == "traffic_signs"
        assert hub.eval_result_entries_to_yaml(entries) == data
    with pytest.raises(ValueError, match="unknown"):
        check_hf_entries([{"dataset": {"id": "a/b", "task_id": "t"}, "value": 1.0, "metric": "top1"}])
    with pytest.raises(ValueError, match="missing"):
        check_hf_entries([{"dataset": {"id": "a/b"}, "value": 1.0}])


def test_exports_refuse_rows_that_are_not_one_comparison(tmp_path, capsys):
    store = fixed_store(tmp_path / "store")
    api = make_row("full", None, 37.5, 0.365, seed=1, n_eval=64, regime="off_the_shelf", teacher_id="t50",
                   teacher_steps=50)
    store.write(api)
    for fmt in ("latex", "hf"):
        with pytest.raises(ConfigError, match=rf"--format {fmt}: rows differ in test set size: 5 rows on 8 eval "
                                              r"images, 1 row on 64 eval images; select one with --where n_eval=8"):
            write_report(store, "traffic_signs", tmp_path / fmt, fmt=fmt)
        assert not (tmp_path / fmt).exists()  # refused before anything is written
    # selected, it is one comparison again
    write_report(store, "traffic_signs", tmp_path / "ok", fmt="latex", select=RowFilter.parse(["n_eval=8"]))
    assert "& 37.5" not in (tmp_path / "ok" / "table.tex").read_text()
    assert main(["report", "--task", "traffic_signs", "--results", str(store.root), "--out", str(tmp_path / "c"),
                 "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lwbench: error: --format hf: rows differ in test set size")
    assert main(["report", "--task", "traffic_signs", "--results", str(store.root), "--out", str(tmp_path / "c"),
                 "--format", "hf", "--where", "seed=0"]) == 0
    err = capsys.readouterr().err
    assert "dataset.id is 'traffic_signs', a placeholder" in err


def test_the_default_report_format_is_unchanged(tmp_path):
    store = fixed_store(tmp_path / "store")
    names = {p.name for p in write_report(store, "traffic_signs", tmp_path / "md")}
    assert {"rows.csv", "table.md", "pareto_gmacs.png"} <= names and not any(n.endswith((".tex", ".yaml"))
                                                                                for n in names)


def test_names_and_escapes():
    assert model_name("lookwhere", "k=28", "finetuned") == "lookwhere-k28-finetuned"
    assert model_name("full", "-", "off_the_shelf") == "full-off_the_shelf"
    assert tex("topk_random 50% & $x") == r"topk\_random 50\% \& \$x"
