"""Training under ``torchrun --nproc-per-node 2`` (gloo, CPU): the teacher and a fine-tuning stage end where one
process ends at the same global batch (float tolerance), rank 0 alone writes the row, a batch that does not split
is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["run", "--method", "full", "--task", "traffic_signs", "--regime", "finetuned", "--img-size", "64x96",
        "--set", "teacher.steps=6", "--set", "teacher.batch_size=8", "--set", "train.steps=4",
        "--set", "train.batch_size=8", "--set", "eval.limit=16", "--set", "measure.min_run_time=0.05",
        "--set", "measure.throughput_batch=4", "--set", "measure.warmup=1", "--set", "measure.flops_images=2",
        "--set", "measure.isolate=false", "--set", "task.n_train=64", "--set", "task.n_test=16",
        "--set", "task.n_val=8", "--set", "threads=1", "--quiet"]


def _lwbench(tmp: Path, name: str, nproc: int, extra=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, LWBENCH_CACHE=str(tmp / name / "cache"), LWBENCH_RESULTS=str(tmp / name / "results"),
               OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "lwbench"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lwbench"]
    return subprocess.run([*launch, *ARGS, *extra], env=env, capture_output=True, text=True, timeout=600)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    (file,) = folder.glob("model.safetensors")
    return load_file(file)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_what_one_process_trains(tmp_path):
    one, two = _lwbench(tmp_path, "one", 1), _lwbench(tmp_path, "two", 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    rows = {n: [json.loads(p.read_text()) for p in (tmp_path / n / "results").rglob("*.json")
                if not p.name.endswith(".per_image.json")] for n in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 1  # rank 0 alone wrote a row
    r1, r2 = rows["one"][0], rows["two"][0]
    assert r1["run_id"] == r2["run_id"]  # the launcher is not part of the config
    for stage in ("teachers", "runs"):
        (a,), (b,) = ((p for p in (tmp_path / n / "cache" / stage).glob("*/**") if (p / "model.safetensors").is_file())
                      for n in ("one", "two"))
        # the same steps on the same global batches: equal up to the order of float sums (measured: 3e-8, 7e-7)
        assert _max_diff(_weights(a), _weights(b)) < 1e-5, stage
    assert r1["metric_value"] == r2["metric_value"]


def test_a_batch_that_does_not_split_is_one_clear_error(tmp_path):
    bad = _lwbench(tmp_path, "bad", 2, ["--set", "teacher.batch_size=7"])
    assert bad.returncode != 0
    assert "does not split into 2 equal shares" in bad.stderr and "Traceback" not in bad.stderr.split("error")[0]
    assert not list((tmp_path / "bad" / "results").rglob("*.json"))


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo on Windows is not supported")
