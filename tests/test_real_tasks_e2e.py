"""`lwbench run` end to end on tiny datasets in the exact on-disk layouts of ImageNet, CUB and ADE20K:
teacher training step(s) + method training + evaluation + measurement for full, lookwhere and tome."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures import make_ade20k, make_cub, make_imagenet

from lwbench.cli import main

TINY = ["--img-size", "32", "--backbone", "lw_vit_test_p8", "--set", "teacher.steps=2", "--set",
        "teacher.batch_size=4", "--set", "train.steps=1", "--set", "train.batch_size=4",
        "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=2", "--set", "measure.warmup=1",
        "--set", "measure.flops_images=1", "--set", "measure.isolate=false",
        "--set", "methods.lookwhere.distill.steps=1", "--set", "methods.lookwhere.distill.batch_size=4",
        "--set", "methods.lookwhere.finetune.steps=1", "--quiet"]
METHODS = [("full", None), ("lookwhere", "k=4"), ("tome", "r=2")]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"imagenet": make_imagenet(base / "imagenet"), "cub": make_cub(base / "cub"),
            "ade20k": make_ade20k(base / "ade")}


@pytest.mark.parametrize("task", ["imagenet", "cub", "ade20k"])
@pytest.mark.parametrize("method,budget", METHODS, ids=[m for m, _ in METHODS])
def test_run_on_fixture(roots, task, method, budget, capsys):
    argv = ["run", "--method", method, "--task", task, "--data-root", str(roots[task]), *TINY]
    if method == "lookwhere":
        argv += ["--set", "method.selector_size=16"]  # a 2x2 selector grid on the 4x4 high-res grid
    if budget:
        argv += ["--budget", budget]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(p.read_text()) for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json")]
    row = next(r for r in rows if r["task"] == task and r["method"] == method)
    assert row["source"] == "real"
    metric = "miou" if task == "ade20k" else "top1"
    assert row["metric"] == metric and 0.0 <= row["metric_value"] <= 100.0
    assert row["gmacs"] > 0 and row["n_eval"] > 0


@pytest.mark.parametrize("task", ["imagenet", "cub", "ade20k"])
def test_missing_data_one_line(task, tmp_path, capsys):
    assert main(["run", "--method", "full", "--task", task, "--data-root", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lwbench: error:")]
    assert len(err) == 1 and "--data-root" in err[0]
