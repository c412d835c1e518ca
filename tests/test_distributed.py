"""Training under ``torchrun --nproc-per-node 2`` (gloo, CPU): the teacher and a fine-tuning stage end where one
process ends at the same global batch (float tolerance), rank 0 alone writes the row, a batch that does not split
is one clear error, and a run killed and resumed on two ranks ends with the weights of an uninterrupted one.

Run as a script (``torchrun --nproc-per-node 2 tests/test_distributed.py OUT``) it is the two ranks of that last
test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

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


class _Killed(Exception):
    pass


class _RankNoisyLoss:
    """Random numbers that differ between the ranks, from every source a resumed rank must restore: a private
    generator seeded by rank (as LookWhere's k draws, ``seed + rank`` in its pre-training), a rank-dependent number
    of global draws (the ranks' global RNG streams part ways) and input noise and the model's dropout (global RNG).
    ``die_at``: the call that raises, on every rank (the kill, after the checkpoint of the step before)."""

    def __init__(self, rank: int, die_at: int | None = None):
        self.gen = torch.Generator().manual_seed(100 + rank)
        self.rank, self.calls, self.die_at = rank, 0, die_at

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def __call__(self, model, x, y):
        self.calls += 1
        if self.calls == self.die_at:
            raise _Killed
        torch.rand(self.rank + 1)
        w = 0.5 + torch.rand((), generator=self.gen)
        return w * nn.functional.cross_entropy(model(x + 0.3 * torch.randn_like(x)), y), {}


def _train_toy(ckpt: Path, loss: _RankNoisyLoss, seed: int = 0) -> nn.Module:
    from torch.utils.data import TensorDataset

    from lwbench.config import TrainConfig
    from lwbench.training.loop import EpochStream, train_loop

    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g)
    torch.manual_seed(seed)  # every rank builds the same model, as after seed_everything
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2))
    batches = EpochStream(TensorDataset(x, (x.sum(1) > 0).long()), 8, seed=3)  # the global batch of 8: 4 a rank
    return train_loop(model, loss, batches, TrainConfig(steps=8, lr=1e-2, grad_clip=None), ckpt_dir=ckpt,
                      ckpt_every_s=0, quiet=True)


def _ranks_kill_and_resume(out: Path) -> None:
    """One rank of the torchrun script: an uninterrupted run, a run killed at step 4 of 8, its resumption."""
    import shutil

    from lwbench.training.distributed import barrier, init_from_env, rank
    from lwbench.training.loop import load_checkpoint

    torch.set_num_threads(1)
    init_from_env("cpu")
    r = rank()
    reference = _train_toy(out / "ref", _RankNoisyLoss(r))
    try:
        _train_toy(out / "cut", _RankNoisyLoss(r, die_at=5))
    except _Killed:
        pass
    barrier()  # rank 0 has written the checkpoint it took before the kill
    step = load_checkpoint(nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2)), out / "cut")["step"]
    barrier()
    if r == 0:
        shutil.copytree(out / "cut", out / "cut-copy")  # resumed in one process by the test
    barrier()
    torch.manual_seed(999 + r)  # a fresh process: another global RNG state, another model init
    resumed = _train_toy(out / "cut", _RankNoisyLoss(r), seed=999)
    diff = max((a - b).abs().max().item()
               for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True))
    (out / f"rank{r}.json").write_text(json.dumps({"step": step, "diff": diff}))


def test_a_run_killed_and_resumed_on_two_ranks_ends_as_an_uninterrupted_one(tmp_path, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["step"] == 4  # killed in step 5 of 8, after the checkpoint of step 4
        # every rank's RNG and loss state restored: the same numbers, so exactly the same weights
        assert got["diff"] == 0.0, f"rank {r}: resumed weights differ from the uninterrupted run's by {got['diff']}"
    # Resumed with another number of processes: one warning line, rank 0's state, and it finishes.
    from lwbench.training.loop import is_done

    capsys.readouterr()
    _train_toy(tmp_path / "cut-copy", _RankNoisyLoss(0), seed=5)
    err = capsys.readouterr().err
    assert err.count("not be bit-identical") == 1, err
    assert is_done(tmp_path / "cut-copy")


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo on Windows is not supported")


if __name__ == "__main__":
    _ranks_kill_and_resume(Path(sys.argv[1]))
