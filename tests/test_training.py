"""The one training loop: resume after a kill, NaN guard keeps the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwbench.config import TrainConfig
from lwbench.errors import TrainingError
from lwbench.training.loop import is_done, load_checkpoint, lr_at, param_groups, train_loop


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, (x.sum(1) > 0).long()


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y), {}


def _steps(n: int) -> TrainConfig:
    """``n`` steps at lr 0.01 with no gradient clip: what these tests trained with before train_loop took a config."""
    return TrainConfig(steps=n, lr=1e-2, grad_clip=None)


class Killed(Exception):
    pass


def test_resume_after_kill(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    calls = {"n": 0}

    def dying_loss(m, x, y):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return _loss(m, x, y)

    with pytest.raises(Killed):
        train_loop(model, dying_loss, _batches(), _steps(6), ckpt_dir=tmp_path, ckpt_every_s=0, quiet=True)
    assert not is_done(tmp_path)
    fresh = nn.Linear(4, 2)
    state = load_checkpoint(fresh, tmp_path)
    assert state["step"] == 3  # three finished steps were saved
    assert torch.equal(fresh.weight, model.weight)
    seen = []

    def counting_loss(m, x, y):
        seen.append(len(seen))
        return _loss(m, x, y)

    train_loop(fresh, counting_loss, _batches(), _steps(6), ckpt_dir=tmp_path, ckpt_every_s=0, quiet=True)
    assert len(seen) == 3 and is_done(tmp_path)  # steps 3, 4, 5 only


def test_nan_keeps_last_good_checkpoint(tmp_path):
    model = nn.Linear(4, 2)
    train_loop(model, _loss, _batches(), _steps(2), ckpt_dir=tmp_path / "a", quiet=True)
    good = model.weight.detach().clone()

    def nan_loss(m, x, y):
        return m(x).sum() * float("nan"), {}

    with pytest.raises(TrainingError, match="NaN|nan") as e:
        train_loop(nn.Linear(4, 2), nan_loss, _batches(), _steps(3), ckpt_dir=tmp_path / "b", quiet=True,
                   ckpt_every_s=0)
    assert "lower the learning rate" in str(e.value)
    again = nn.Linear(4, 2)
    load_checkpoint(again, tmp_path / "a")
    assert torch.equal(again.weight, good)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    groups = param_groups(model.parameters(), 0.05)
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == 1 and decayed[0] is model[0].weight


def test_warmup_then_cosine():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) < 0.05


def test_a_stage_says_what_it_trains_and_how_long_it_will_take(capfd):
    """Before the bulk of a stage: its steps and lr, then a time estimate measured on the first steps (the first
    one, which carries set-up, left out)."""
    import torch
    from torch import nn

    from lwbench.training.loop import ESTIMATE_AFTER, train_loop

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(8, 4, generator=g)
            yield x, (x.sum(1) > 0).long()

    def loss(model, x, y):
        return nn.functional.cross_entropy(model(x), y), {}

    train_loop(nn.Linear(4, 2), loss, batches(), _steps(10), desc="stage e", quiet=False)
    text = capfd.readouterr().err
    assert "stage e: training 10 steps (lr 0.01, 0 warm-up)" in text
    assert f"s/step over steps 2-{ESTIMATE_AFTER + 1}, so about" in text
    assert f"for the remaining {10 - ESTIMATE_AFTER - 1} steps" in text
    train_loop(nn.Linear(4, 2), loss, batches(), _steps(10), desc="stage q", quiet=True)
    assert "stage q" not in capfd.readouterr().err


def _estimates(text: str) -> list[tuple[int, float]]:
    """``(steps done, estimated seconds left)`` of every progress line of a stage."""
    import re

    unit = {"s": 1, "min": 60, "h": 3600}
    out = []
    for line in text.splitlines():
        m = re.search(r"step (\d+)/\d+ loss \S+ eta ([\d.]+) min", line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)) * 60))
        m = re.search(r"over steps \d+-(\d+), so about ([\d.]+) (s|min|h) for", line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)) * unit[m.group(3)]))
    return out


def test_the_time_estimate_leaves_out_one_off_work_of_the_first_steps(monkeypatch, capfd):
    """A first run draws the synthetic scene cache during its first steps (here 40 s, then 10 s, then 1 s a step):
    every printed estimate is close to the time really left, none extrapolates the one-off work (a user saw 253.9
    min, then 9 min, then 16.4 min within 30 s)."""
    import types

    from lwbench.training import loop

    durations = [40.0, 10.0] + [1.0] * 98
    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow_first_steps(model, x, y):
        clock[0] += durations[len(calls)]
        calls.append(1)
        return _loss(model, x, y)

    calls: list[int] = []
    train_loop(nn.Linear(4, 2), slow_first_steps, _batches(), _steps(100), desc="stage t", quiet=False)
    seen = _estimates(capfd.readouterr().err)
    assert len(seen) >= 3, seen
    for done, left in seen:
        truth = sum(durations[done:])
        assert truth / 1.5 <= left <= truth * 1.5, (done, left, truth, seen)


def test_a_warm_up_longer_than_the_stage_is_one_warning_naming_the_setting(monkeypatch, capfd):
    """``train.steps=5`` with the profile's 10 warm-up steps: the learning rate never reaches its target. The stage
    trains as configured (its config, so its run id, is what was asked) and says so once, even --quiet."""
    from lwbench.training import loop

    monkeypatch.setattr(loop, "_WARNED_WARMUP", set())
    stage = TrainConfig(steps=5, lr=2e-5, warmup_steps=10, grad_clip=None)
    for part in ("a", "b"):  # DynamicViT trains one stage in two parts, both with its warm-up: one line
        train_loop(nn.Linear(4, 2), _loss, _batches(), stage, desc=f"stage {part}", quiet=True, lr_key="train.lr")
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warm-up" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("lwbench: warning: stage a: ")
    assert "never reaches 2e-05" in warnings[0] and "--set train.warmup_steps=5" in warnings[0]
    train_loop(nn.Linear(4, 2), _loss, _batches(), TrainConfig(steps=10, lr=2e-5, warmup_steps=10, grad_clip=None),
               desc="stage c", quiet=True, lr_key="train.lr")
    assert "warm-up" not in capfd.readouterr().err


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_reference_configs_warm_up_within_every_stage(profile):
    """No spurious warning on the reference configs: every stage of every method, DynamicViT's predictor part
    (17 of 100 quick steps) and the teacher's probe included, is at least as long as its warm-up."""
    from lwbench.config import resolve_config
    from lwbench.registry import METHODS
    from lwbench.runner import Plan
    from lwbench.training.loop import warmup_warning

    for method in METHODS.names():
        plan = Plan(resolve_config(method, "traffic_signs", None, profile=profile, quiet=True))
        cfg, opts = plan.cfg, plan.method.opts
        parts = [(cfg.teacher.steps, cfg.teacher.warmup_steps),
                 (cfg.teacher.probe_steps, max(1, cfg.teacher.probe_steps // 10))]
        for name in plan.method.stage_names(opts):
            stage = getattr(opts, name).resolved(cfg.train)
            parts.append((stage.steps, stage.warmup_steps))
            if method == "dynamicvit":
                warm = int(round(stage.steps * opts.predictor_warmup))
                parts += [(warm, stage.warmup_steps), (stage.steps - warm, stage.warmup_steps)]
        for steps, warmup in parts:
            if steps:
                assert warmup_warning(method, steps, warmup, 1e-3, "train.warmup_steps") == "", (method, steps, warmup)
