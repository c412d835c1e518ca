"""The fast path of a first run: bfloat16 autocast (one setting for training, evaluation and timing, part of the
ids only when used) and the teachers lwbench ships (used only for their exact teacher id, checked by sha256,
replaced by ``--retrain-teacher``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lwbench import shipping
from lwbench.cli import main
from lwbench.config import TrainConfig, resolve_config
from lwbench.precision import Autocast, wrap
from lwbench.runner import Plan
from lwbench.training.loop import train_loop

TINY = ["--img-size", "64x96", "--set", "teacher.steps=4", "--set", "teacher.batch_size=8",
        "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "eval.limit=16",
        "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=4",
        "--set", "measure.warmup=1", "--set", "measure.flops_images=2", "--set", "measure.isolate=false",
        "--set", "task.n_train=64", "--set", "task.n_test=16", "--set", "task.n_val=8", "--quiet"]


def _rows(results: Path, method: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in (results / "traffic_signs" / method).glob("*.json")]


# -- autocast --------------------------------------------------------------------------------------------------
def test_autocast_none_is_the_model_itself_and_bfloat16_runs_in_bfloat16():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    assert wrap(lin, "none") is lin  # float32 runs are the code path without the option, bit for bit
    seen = {}
    lin.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None: output unchanged
    x = torch.randn(3, 8)
    out = wrap(lin, "bfloat16")(x)
    assert isinstance(wrap(lin, "bfloat16"), Autocast)
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32  # computed in bf16, handed back in fp32
    assert torch.allclose(out, lin(x), atol=0.05) and not torch.equal(out, lin(x))
    assert wrap(lin, "bfloat16").weight is lin.weight  # attributes fall through to the model


def test_training_under_autocast_keeps_float32_weights_and_learns():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    w = torch.randn(2, 4)
    xs = torch.randn(64, 4)
    ys = xs @ w.T
    batches = iter([(xs, ys)] * 60)
    before = ((model(xs) - ys) ** 2).mean().item()

    def loss(m, x, y):
        out = m(x)
        assert out.dtype == torch.bfloat16  # the forward ran under autocast
        return ((out.float() - y) ** 2).mean(), {}

    train_loop(model, loss, batches, TrainConfig(steps=60, lr=0.05, weight_decay=0.0, grad_clip=None), quiet=True,
               autocast="bfloat16")
    assert model.weight.dtype == torch.float32
    assert ((model(xs) - ys) ** 2).mean().item() < 0.2 * before


def test_autocast_enters_the_ids_only_when_used():
    cfg = resolve_config("lookwhere", "traffic_signs", None, profile="quick", sets=[])
    plain, bf16 = Plan(cfg), Plan(cfg.replace(autocast="bfloat16"))
    assert "autocast" not in plain.config and "autocast" not in plain.teacher_config["teacher"]  # old ids stay valid
    assert bf16.config["autocast"] == "bfloat16" and bf16.run_id != plain.run_id
    assert bf16.teacher_id == plain.teacher_id  # a bfloat16 run starts from the same (shipped) float32 teacher
    bf16_teacher = Plan(resolve_config("lookwhere", "traffic_signs", None, profile="quick",
                                       sets=["teacher.autocast=bfloat16"]))
    assert bf16_teacher.teacher_config["teacher"]["autocast"] == "bfloat16"
    assert bf16_teacher.teacher_id != plain.teacher_id
    assert Plan(cfg.replace(retrain_teacher=True)).run_id == plain.run_id  # how the teacher was obtained: not config


def test_bfloat16_run_records_its_autocast(tmp_path):
    results = Path(os.environ["LWBENCH_RESULTS"])
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--autocast", "bfloat16", *TINY]) == 0
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY]) == 0
    rows = {r["autocast"]: r for r in _rows(results, "full")}
    assert set(rows) == {"bfloat16", "none"}
    assert rows["bfloat16"]["teacher_id"] == rows["none"]["teacher_id"]
    assert rows["bfloat16"]["run_id"] != rows["none"]["run_id"]
    assert rows["bfloat16"]["gmacs"] == pytest.approx(rows["none"]["gmacs"])  # the same multiply-adds
    assert 0 <= rows["bfloat16"]["top1"] <= 100


# -- shipped teachers ------------------------------------------------------------------------------------------
def _fake_shipped(tmp_path, monkeypatch, teacher_id: str) -> Path:
    """Train a tiny teacher for ``teacher_id``'s config and ship it into a temporary SHIPPED_DIR."""
    monkeypatch.setattr(shipping, "SHIPPED_DIR", tmp_path / "shipped")
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY]) == 0
    tdir = Path(os.environ["LWBENCH_CACHE"]) / "teachers" / teacher_id
    return shipping.ship(tdir, "lwbench run ...", "test", "test")


def _tiny_plan() -> Plan:
    from lwbench.cli import _config, build_parser

    args = build_parser().parse_args(["run", "--method", "full", "--task", "traffic_signs", *TINY])
    return Plan(_config(args, "full", "traffic_signs", None))


def test_a_shipped_teacher_is_installed_checked_and_retrained_on_request(tmp_path, monkeypatch):
    plan = _tiny_plan()
    shipped = _fake_shipped(tmp_path, monkeypatch, plan.teacher_id)
    trained = json.loads((shipped / "shipped.json").read_text())["weights_sha256"]
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "fresh-cache"))
    results = Path(os.environ["LWBENCH_RESULTS"])
    tdir = tmp_path / "fresh-cache" / "teachers" / plan.teacher_id

    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=6", *TINY]) == 0
    assert shipping.sha256(tdir / "model.safetensors") == trained
    assert _rows(results, "random")[0]["teacher_source"] == "shipped"
    (tdir / "methods" / "keep.txt").parent.mkdir(parents=True, exist_ok=True)
    (tdir / "methods" / "keep.txt").write_text("a stage built on the shipped weights")

    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=6", "--force",
                 "--retrain-teacher", *TINY]) == 0
    assert not (tdir / "shipped.json").exists() and not (tdir / "methods" / "keep.txt").exists()
    assert [r["teacher_source"] for r in _rows(results, "random")] == ["trained"]


def test_a_damaged_shipped_teacher_is_refused_and_trained_instead(tmp_path, monkeypatch, capsys):
    plan = _tiny_plan()
    shipped = _fake_shipped(tmp_path, monkeypatch, plan.teacher_id)
    blob = bytearray((shipped / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (shipped / "model.safetensors").write_bytes(bytes(blob))
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "fresh-cache"))
    assert not shipping.install(plan.teacher_id, tmp_path / "fresh-cache" / "t")
    assert "do not match the sha256" in capsys.readouterr().err
    assert main(["run", "--method", "full", "--task", "traffic_signs", "--force", *TINY]) == 0
    assert _rows(Path(os.environ["LWBENCH_RESULTS"]), "full")[0]["teacher_source"] == "trained"


def test_a_teacher_folder_without_its_state_file_is_refused_not_loaded_as_random_weights(tmp_path, capsys):
    """A finished teacher folder whose state.json is gone (a partial copy) once loaded nothing and left the
    backbone at its random initialisation, silently: every method then scored chance."""
    plan = _tiny_plan()
    assert main(["run", "--method", "full", "--task", "traffic_signs", *TINY]) == 0
    tdir = Path(os.environ["LWBENCH_CACHE"]) / "teachers" / plan.teacher_id
    (tdir / "state.json").unlink()
    capsys.readouterr()
    assert main(["run", "--method", "random", "--task", "traffic_signs", "--budget", "k=6", *TINY]) != 0
    err = capsys.readouterr().err
    assert "state.json" in err and "damaged" in err and "Traceback" not in err


def test_the_quick_profile_ships_its_current_teachers():
    """A config change that moves the quick teacher's id must ship the new teacher (benchmarks/shipped_teachers.py
    --write), or every newcomer silently trains for 25 minutes again."""
    # the two synthetic tasks of the quick sweep as the profile gives them, and their earlier scenes (the committed
    # references of the easy traffic signs and the small-number billiards)
    for task, sets in (("traffic_signs", []), ("billiards", []),
                       ("traffic_signs", ["task.scenes=easy", "teacher.steps=1000"]),
                       ("billiards", ["task.numbers=small", "teacher.steps=1000"])):
        plan = Plan(resolve_config("full", task, None, profile="quick", sets=sets))
        folder = shipping.shipped_folder(plan.teacher_id)
        assert folder is not None, f"no shipped teacher for {task} (id {plan.teacher_id})"
        meta = json.loads((folder / "shipped.json").read_text())
        assert meta["teacher_id"] == plan.teacher_id
        assert shipping.sha256(folder / "model.safetensors") == meta["weights_sha256"]
        assert json.loads((folder / "config.json").read_text())["teacher"] == plan.teacher_config["teacher"]


def test_the_shipped_traffic_signs_teacher_is_the_accurate_one():
    """Real forward passes of the shipped weights on the first 128 synthetic test images of the default (hard)
    scenes (the full test set gave 95.8%, benchmarks/reference/traffic_signs)."""
    from lwbench.runner import build_teacher, evaluate

    cfg = resolve_config("full", "traffic_signs", None, profile="quick", sets=["eval.limit=128", "eval.bootstrap=0"])
    plan = Plan(cfg)
    assert plan.task.version == 3  # the hard scenes
    model, _, tdir = build_teacher(plan)
    assert shipping.is_shipped_copy(tdir)
    assert evaluate(plan, model)["top1"] >= 90.0


# -- the scene cache -------------------------------------------------------------------------------------------
def test_cached_scenes_are_the_drawn_scenes_bit_for_bit(tmp_path):
    import pickle

    from lwbench.task import normalize
    from lwbench.tasks import _imageio
    from lwbench.tasks._synth import traffic_scene
    from lwbench.tasks.traffic_signs import TrafficSigns

    task = TrafficSigns(source="synthetic", img_size=(64, 96), seed=3, n_train=12, n_val=4, n_test=6)
    ds = task.dataset("test")
    first = [ds[i][0] for i in range(6)]
    files = list((Path(os.environ["LWBENCH_CACHE"]) / "scenes").glob("*.npy"))
    assert len(files) == 1
    again = task.dataset("test")  # a new dataset object: read from the file, nothing drawn
    for i in range(6):
        drawn = _imageio.to_tensor(traffic_scene.render(task._scene_config(), 3, "test", i))
        assert torch.equal(first[i], again[i][0])
        assert torch.equal(first[i], normalize(drawn))  # what the dataset gave before the cache existed
    assert pickle.loads(pickle.dumps(again))._pixels is None  # workers map the file, never get a copy
    files[0].write_bytes(b"damaged")
    assert torch.equal(task.dataset("test")[2][0], first[2])  # a damaged file is drawn again
    assert TrafficSigns(source="synthetic", img_size=(64, 96), seed=4, n_test=6).dataset("test")[0][0].shape == \
        first[0].shape
    assert len(list(files[0].parent.glob("*.npy"))) == 2  # another seed: another file


def test_lookwhere_at_the_quick_geometry_runs_under_bfloat16():
    """The quick selector downsizes its map (16x24 tiles -> 15x20 cells, antialiased), which has no bfloat16
    kernel: the where-map stays float32, and the selection is the float32 one up to near-ties."""
    from lwbench.backbones import create_backbone
    from lwbench.precision import autocast

    plan = Plan(resolve_config("lookwhere", "traffic_signs", None, profile="quick", sets=[]))
    torch.manual_seed(0)
    enc = plan.method.build(create_backbone(plan.backbone_name, plan.task.img_size)).eval()
    x = torch.randn(2, 3, *plan.task.img_size)
    with torch.no_grad():
        ref = enc(x)
        with autocast("cpu", "bfloat16"):
            got = enc(x)
    assert got.aux["where_map"].dtype == torch.float32
    same = (got.aux["selected"].unsqueeze(-1) == ref.aux["selected"].unsqueeze(-2)).any(-1).float().mean()
    assert same > 0.8


def test_lookwhere_profile_times_at_the_thread_count_it_was_given():
    """``torch.utils.benchmark.Timer`` runs at 1 thread unless told otherwise: benchmarks/lookwhere_profile.py once
    printed "2 threads" over 1-thread timings. Its timer must run the stage at the process's thread count."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lookwhere_profile.py"
    spec = importlib.util.spec_from_file_location("lookwhere_profile_under_test", path)
    profile = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = profile
    spec.loader.exec_module(profile)
    seen, old = [], torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        profile.median_ms(lambda: seen.append(torch.get_num_threads()), min_run_time=0.01)
    finally:
        torch.set_num_threads(old)
        del sys.modules[spec.name]
    assert seen and set(seen) == {2}
