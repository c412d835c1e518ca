"""Faults: concurrent writers, a second process on one stage, kill and resume, damaged caches, a killed parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from lwbench import cache
from lwbench.config import MeasureConfig, TrainConfig
from lwbench.errors import CheckpointError, ConfigError, TrainingError
from lwbench.locks import is_held, stage_lock
from lwbench.paths import cache_dir
from lwbench.training.loop import (
    EpochStream,
    _atomic_checkpoint,
    is_done,
    load_checkpoint,
    train_loop,
)

REPO = Path(__file__).resolve().parents[1]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y), {}


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, (x.sum(1) > 0).long()


def _steps(n: int) -> TrainConfig:
    """``n`` steps at lr 0.01 with no gradient clip: what these tests trained with before train_loop took a config."""
    return TrainConfig(steps=n, lr=1e-2, grad_clip=None)


def _python(script: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, text=True, **kw)


# -- 1. two writers of one checkpoint folder -----------------------------------------------------------------------
def test_concurrent_checkpoints_into_one_folder_never_collide(tmp_path):
    errors = []

    def writer(seed):
        torch.manual_seed(seed)
        model = nn.Linear(64, 64)
        opt = torch.optim.AdamW(model.parameters())
        try:
            for step in range(60):
                _atomic_checkpoint(model, opt, {"step": step, "writer": seed}, tmp_path, resume={"step": step})
        except Exception as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 59
    assert load_checkpoint(nn.Linear(64, 64), tmp_path)["step"] == 59  # complete weights
    torch.load(tmp_path / "optim.pt", weights_only=True)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_failed_checkpoint_leaves_no_temporary_files(tmp_path, monkeypatch):
    import lwbench.training.loop as loop

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(loop.torch, "save", boom)
    with pytest.raises(OSError):
        _atomic_checkpoint(nn.Linear(4, 2), torch.optim.AdamW(nn.Linear(4, 2).parameters()), {"step": 1}, tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- 2. one process at a time per stage folder ----------------------------------------------------------------------
def test_second_process_waits_for_the_stage_lock_then_reuses_the_result(tmp_path, capfd):
    folder = tmp_path / "stage"
    holder = _python(f"""
        import json, time, torch
        from pathlib import Path
        from torch import nn
        from lwbench.locks import stage_lock
        from lwbench.training.loop import _atomic_checkpoint
        folder = Path({str(folder)!r})
        with stage_lock(folder, "x"):
            print("locked", flush=True)
            time.sleep(1.0)
            torch.manual_seed(123)
            _atomic_checkpoint(nn.Linear(4, 2), None, {{"step": 5, "elapsed_s": 1.0}}, folder)
            (folder / "done.json").write_text(json.dumps({{"steps": 5, "elapsed_s": 1.0}}))
    """, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls = []

        def counting(m, x, y):
            calls.append(1)
            return _loss(m, x, y)

        model = nn.Linear(4, 2)
        train_loop(model, counting, _batches(), _steps(5), ckpt_dir=folder, desc="stage x", quiet=False)
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert calls == []  # no training step ran: the finished result was reused
    torch.manual_seed(123)
    assert torch.equal(model.weight, nn.Linear(4, 2).weight)
    assert f"lwbench: waiting for another process training stage x in {folder}" in capfd.readouterr().err


def test_stage_lock_is_released_and_reported(tmp_path):
    with stage_lock(tmp_path / "a" / "b", "t", quiet=True) as lock:
        assert lock == tmp_path / "a" / "b" / ".lock" and is_held(tmp_path / "a" / "b")
    assert not is_held(tmp_path / "a" / "b")


# -- 3. exact resume -------------------------------------------------------------------------------------------------
class _Noisy(Dataset):
    """Augmentation that draws on the global RNG, as the tasks' do."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(10, 4, generator=g), torch.randint(0, 2, (10,), generator=g)

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class _OwnRngLoss:
    """A loss with a private generator (as LookWhere's k draws) and dropout in the model (global RNG)."""

    def __init__(self, die_at: int | None = None):
        self.gen = torch.Generator().manual_seed(7)
        self.calls, self.die_at = 0, die_at

    def state_dict(self):
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])

    def __call__(self, model, x, y):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt  # the kill
        w = 0.5 + torch.rand((), generator=self.gen)
        return w * nn.functional.cross_entropy(model(x), y), {}


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 2))


def _run(ckpt, loss, seed=0):
    model = _model(seed)
    return train_loop(model, loss, EpochStream(_Noisy(), 4, seed=3), _steps(8), ckpt_dir=ckpt,
                      ckpt_every_s=0, quiet=True)


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path):
    reference = _run(tmp_path / "ref", _OwnRngLoss())
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", _OwnRngLoss(die_at=5))  # 2.5 epochs of 2 batches; steps 0-3 checkpointed
    assert load_checkpoint(_model(0), tmp_path / "cut")["step"] == 4 and not is_done(tmp_path / "cut")
    torch.manual_seed(999)  # a fresh process: another global RNG state and another model init
    resumed = _run(tmp_path / "cut", _OwnRngLoss(), seed=999)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert is_done(tmp_path / "cut") and not (tmp_path / "cut" / "resume.pt").exists()


def test_checkpoint_without_resume_state_still_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, _OwnRngLoss(die_at=3))
    (tmp_path / "resume.pt").unlink()  # as written before RNG and stream state were saved
    loss = _OwnRngLoss()
    _run(tmp_path, loss)
    assert loss.calls == 6 and is_done(tmp_path)


def test_epoch_stream_positions_and_the_global_rng():
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    a = EpochStream(ds, 4, seed=1)
    rng = torch.get_rng_state()
    first = [next(a)[1].tolist() for _ in range(5)]
    assert torch.equal(rng, torch.get_rng_state())  # the order never draws on the global RNG
    assert a.batches_per_epoch == 2 and sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))
    assert first[0] + first[1] != first[2] + first[3]  # re-shuffled each epoch
    b = EpochStream(ds, 4, seed=1)
    b.skip_to(3)
    assert next(b)[1].tolist() == first[3]
    c = EpochStream(ds, 4, seed=1)
    c.load_state_dict({"epoch": 1, "batch": 2})  # the end of epoch 1: the next batch starts epoch 2
    assert next(c)[1].tolist() == first[4] and c.state_dict() == {"epoch": 2, "batch": 1}
    small = EpochStream(TensorDataset(torch.arange(3.0)), 8)  # fewer items than a batch: one partial batch
    assert next(small)[0].shape == (3,)


def test_fit_context_batches_are_an_epoch_stream():
    from _toy import ToyTask

    from lwbench.training.context import FitContext

    batches = FitContext(task=ToyTask(source="synthetic"), teacher=None).train_batches(4)
    assert isinstance(batches, EpochStream) and batches.batch_size == 4
    x, y = next(batches)
    assert x.shape == (4, 3, 32, 48) and y.shape == (4,)


def test_lookwhere_loss_state_round_trips():
    from lwbench.methods.lookwhere.distill import WhatWhereLoss

    loss = WhatWhereLoss(None, None, 4, 64, seed=3)
    loss.draw_k(64)
    state = loss.state_dict()
    ahead = [loss.draw_k(64) for _ in range(5)]
    other = WhatWhereLoss(None, None, 4, 64, seed=0)
    other.load_state_dict(state)
    assert [other.draw_k(64) for _ in range(5)] == ahead


# -- 4. damaged caches, cache ls/drop, the NaN message --------------------------------------------------------------
def _stage(kind="runs", entry="r1", tag="finetune", done=True):
    folder = cache_dir() / kind / entry / tag if tag else cache_dir() / kind / entry
    train_loop(nn.Linear(4, 2), _loss, _batches(), _steps(1 if done else 0), ckpt_dir=folder, quiet=True)
    if not done:
        (folder / "done.json").unlink()
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "state.json"])
def test_truncated_checkpoint_file_is_one_line_naming_it_and_cache_drop(name):
    folder = _stage()
    f = folder / name
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(nn.Linear(4, 2), folder)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and f"lwbench cache drop {folder}" in msg
    with pytest.raises(CheckpointError, match="lwbench cache drop"):  # the loop resumes through it too
        train_loop(nn.Linear(4, 2), _loss, _batches(), _steps(3), ckpt_dir=folder, quiet=True)


def test_truncated_teacher_weights_are_one_line(tmp_path):
    from lwbench.training.teacher import load_teacher

    folder = _stage("teachers", "t1", tag=None)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"truncated.*lwbench cache drop"):
        load_teacher(nn.Linear(4, 2), folder)


def test_damaged_checkpoint_outside_the_cache_says_delete_the_folder(tmp_path):
    folder = tmp_path / "pretrain-out"
    train_loop(nn.Linear(4, 2), _loss, _batches(), _steps(1), ckpt_dir=folder, quiet=True)
    (folder / "state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match=f"delete the folder {folder}"):
        load_checkpoint(nn.Linear(4, 2), folder)


def test_cache_lists_and_drops_entries(tmp_path):
    teacher = _stage("teachers", "abc123", tag=None)
    (teacher / "config.json").write_text(json.dumps({"backbone": "lw_vit_test_p8", "task": "toy", "seed": 0}))
    _stage("runs", "def456", "finetune", done=False)
    entries = {e.id: e for e in cache.list_entries()}
    assert entries["abc123"].kind == "teacher" and entries["abc123"].status == "done"
    assert entries["abc123"].summary == "task=toy backbone=lw_vit_test_p8 seed=0"
    assert entries["def456"].kind == "run" and entries["def456"].status == "partial"
    assert entries["def456"].stages == ("finetune",) and entries["def456"].size_bytes > 0
    assert cache.drop("abc") == teacher and not teacher.exists()  # a unique prefix of the id
    stage = cache_dir() / "runs" / "def456" / "finetune"
    assert cache.drop(str(stage)) == stage and not stage.exists() and stage.parent.exists()
    assert [e.id for e in cache.list_entries()] == ["def456"]


def test_cache_commands_list_and_drop(capsys):
    from lwbench.cli import main

    teacher = _stage("teachers", "abc123", tag=None)
    (teacher / "config.json").write_text(json.dumps({"backbone": "lw_vit_test_p8", "task": "toy", "seed": 0}))
    _stage("runs", "def456", "finetune", done=False)
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "abc123" in out and "teacher" in out and "task=toy" in out and "def456" in out and "partial" in out
    assert main(["cache", "drop", "abc123"]) == 0
    assert f"removed {teacher}" in capsys.readouterr().out and not teacher.exists()
    assert main(["cache", "drop", "nope"]) == 2


def test_cache_drop_refuses_what_is_not_one_entry(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for bad in (outside, cache_dir(), cache_dir() / "runs", "nope"):
        (cache_dir() / "runs").mkdir(parents=True, exist_ok=True)
        with pytest.raises(ConfigError):
            cache.drop(bad)
    assert outside.exists() and (cache_dir() / "runs").exists()
    (cache_dir() / "runs" / "aa1").mkdir()
    (cache_dir() / "runs" / "aa2").mkdir()
    with pytest.raises(ConfigError, match="matches 2"):
        cache.drop("aa")
    with stage_lock(cache_dir() / "runs" / "aa1" / "finetune", "x", quiet=True):
        with pytest.raises(ConfigError, match="being trained"):
            cache.drop("aa1")
    cache.drop("aa1")


@pytest.mark.parametrize("empty", ["", " ", "\t"])
def test_cache_rm_of_an_empty_id_is_refused_and_deletes_nothing(empty, capsys):
    """`lwbench cache rm "$ID"` with ``ID`` unset once removed the whole teachers folder, exit 0."""
    from lwbench.cli import main

    teacher = _stage("teachers", "abc123", tag=None)
    assert main(["cache", "rm", empty]) == 2
    assert "empty cache id" in capsys.readouterr().err and teacher.is_dir()
    with pytest.raises(ConfigError, match="empty cache id"):
        cache.drop(empty)
    assert teacher.is_dir() and [e.id for e in cache.list_entries()] == ["abc123"]


def _nan(m, x, y):
    return m(x).sum() * float("nan"), {}


def test_nan_message_names_the_lr_key_and_only_a_real_checkpoint(tmp_path):
    with pytest.raises(TrainingError) as e:
        train_loop(nn.Linear(4, 2), _nan, _batches(), _steps(3), ckpt_dir=tmp_path / "a", quiet=True,
                   lr_key="teacher.lr")
    msg = str(e.value)
    assert "--set teacher.lr=..." in msg and "checkpoint" not in msg  # none was written before step 0
    with pytest.raises(TrainingError, match="lower the learning rate of this stage"):
        train_loop(nn.Linear(4, 2), _nan, _batches(), _steps(3), quiet=True)
    calls = []

    def late_nan(m, x, y):
        calls.append(1)
        return _nan(m, x, y) if len(calls) > 1 else _loss(m, x, y)

    with pytest.raises(TrainingError, match=f"last good checkpoint is kept in {tmp_path / 'b'}"):
        train_loop(nn.Linear(4, 2), late_nan, _batches(), _steps(3), ckpt_dir=tmp_path / "b", quiet=True,
                   ckpt_every_s=0)


# -- 5. kill -9 during measurement -----------------------------------------------------------------------------------
def _wait_for(fn, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    return fn()


def _worker_of(parent: int):
    """The measurement worker started by process ``parent`` (psutil), or None."""
    import psutil

    try:
        kids = psutil.Process(parent).children()
    except psutil.Error:
        return None
    for kid in kids:
        try:
            if "lwbench.measure.worker" in kid.cmdline():
                return kid.pid
        except psutil.Error:
            continue
    return None


def test_a_parent_killed_mid_measurement_takes_its_worker_and_leaves_nothing(tmp_path):
    """kill -9 of the measuring process while its worker times the model: the worker dies with it, and nothing of
    the measurement (the pickled model and images) is left in $TMPDIR."""
    from lwbench.measure.worker import pid_alive

    tmp, mark = tmp_path / "tmp", tmp_path / "measuring"
    tmp.mkdir()
    (tmp_path / "marked.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from torch import nn

        class Marked(nn.Sequential):  # says when the worker's forwards have begun
            def forward(self, x):
                Path({str(mark)!r}).touch()
                return super().forward(x)
    """))
    parent = _python("""
        import torch
        from torch import nn
        from marked import Marked
        from lwbench.measure.worker import measure_in_subprocess
        from lwbench.config import MeasureConfig
        measure_in_subprocess(Marked(nn.Flatten(), nn.Linear(48, 2)), torch.rand(2, 3, 4, 4),
                              MeasureConfig(throughput_batch=2, warmup=1, min_run_time=120, min_runs=1), threads=1)
    """, env={"TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(mark.exists, 90), "the worker never began measuring"
        child = _worker_of(parent.pid)
        assert child and pid_alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_for(lambda: not pid_alive(child), 3), f"worker {child} outlived its parent by 3 s"
    left = [p.relative_to(tmp) for p in tmp.rglob("*") if p.name.startswith("lwbench-measure-") or p.suffix == ".pt"]
    assert left == []  # was: lwbench-measure-*/{model.pt, images.pt, options.json, owner.pid, worker.pid}


def test_stale_measure_folders_of_dead_owners_are_removed(tmp_path, monkeypatch):
    from lwbench.measure.worker import measure_in_subprocess

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = time.time() - 120

    def folder(name, owner, mtime=None):
        d = tmp_path / f"lwbench-measure-{name}"
        d.mkdir()
        (d / "owner.pid").write_text(str(owner))
        (d / "model.pt").write_bytes(b"x")
        if mtime:
            os.utime(d, (mtime, mtime))
        return d

    stale, young, alive = folder("stale", dead.pid, old), folder("young", dead.pid), folder("alive", os.getppid(), old)
    (tmp_path / "lwbench-measure-unowned").mkdir()  # being created: its owner.pid is not written yet
    r = measure_in_subprocess(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), torch.rand(2, 3, 4, 4),
                              MeasureConfig(throughput_batch=2, warmup=1, min_run_time=0.05, min_runs=2), threads=1)
    assert r["isolated"] is True and r["throughput_batch"] == 2 and r["threads"] == 1
    assert not stale.exists() and not young.exists() and alive.exists()  # a dead owner's folder goes at any age
    assert sorted(p.name for p in tmp_path.glob("lwbench-measure-*")) == ["lwbench-measure-alive",
                                                                         "lwbench-measure-unowned"]
