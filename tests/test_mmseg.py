"""mmsegmentation decoders (``decoder=uper``, lwbench/mmseg_compat.py).

The tests marked by the ``mmseg`` fixture need ``pip install 'lwbench[seg]'`` and skip cleanly without it; the
others (one-line errors, version checks, classification refusal) run everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures import make_ade20k

from lwbench import mmseg_compat
from lwbench.cli import main
from lwbench.config import HeadConfig
from lwbench.errors import ConfigError, LwbenchError
from lwbench.heads import make_head
from lwbench.tasks.ade20k import ADE20K
from lwbench.tokens import TokenOutput

GOOD = {"mmseg": "1.2.2", "mmcv": "2.1.0", "mmengine": "0.10.7", "ftfy": "6.3.1", "regex": "2024.1.1"}
TINY = ["--img-size", "32", "--backbone", "lw_vit_test_p8", "--set", "teacher.steps=2", "--set",
        "teacher.batch_size=4", "--set", "train.steps=1", "--set", "train.batch_size=4",
        "--set", "measure.min_run_time=0.05", "--set", "measure.throughput_batch=2", "--set", "measure.warmup=1",
        "--set", "measure.flops_images=1", "--set", "measure.isolate=false", "--set", "eval.bootstrap=0", "--quiet"]
HEAD_DECODER = "decoder" in {f.name for f in dataclasses.fields(HeadConfig)}
needs_head_decoder = pytest.mark.skipif(not HEAD_DECODER, reason="HeadConfig has no decoder field yet")


@pytest.fixture
def mmseg():
    return pytest.importorskip("mmseg")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return make_ade20k(tmp_path_factory.mktemp("data") / "ADEChallengeData2016", train=4, val=2)


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def _tokens(b=2, h=4, w=6, d=32, keep=None) -> TokenOutput:
    n = h * w
    pos = torch.arange(n).expand(b, -1) if keep is None else torch.tensor(keep).expand(b, -1)
    return TokenOutput(prefix=torch.randn(b, 1, d), patches=torch.randn(b, pos.shape[1], d, requires_grad=True),
                       positions=pos.clone(), grid=(h, w))


# -- without mmseg --------------------------------------------------------------------------------------------
def test_version_problem_names_the_supported_versions_and_the_install():
    assert mmseg_compat.version_problem(GOOD) is None
    for change, culprit in (({"mmseg": None}, "mmsegmentation missing"), ({"mmcv": "2.2.0"}, "mmcv 2.2.0"),
                            ({"mmengine": "1.0.0"}, "mmengine 1.0.0"), ({"ftfy": None}, "ftfy missing"),
                            ({"mmseg": "1.1.0"}, "mmsegmentation 1.1.0")):
        msg = mmseg_compat.version_problem({**GOOD, **change})
        assert msg and "\n" not in msg and culprit in msg, msg
        assert "mmsegmentation 1.2.2" in msg and "mmcv-lite 2.1.0" in msg and "mmengine 0.10" in msg
        assert "pip install 'lwbench[seg]'" in msg and "decoder=linear" in msg


def test_uper_without_mmseg_is_one_line(ade_root, monkeypatch, capsys):
    """Simulated: the import check sees no mmsegmentation (whether or not it is installed here)."""
    monkeypatch.setattr(mmseg_compat, "versions", lambda: {**GOOD, "mmseg": None})
    with pytest.raises(mmseg_compat.MmsegUnavailableError) as exc:
        ADE20K(data_root=ade_root, decoder="uper")
    assert isinstance(exc.value, LwbenchError)
    assert "pip install 'lwbench[seg]'" in _one_line(exc) and "mmsegmentation missing" in str(exc.value)
    with pytest.raises(mmseg_compat.MmsegUnavailableError):
        mmseg_compat.UperSegHead(32, 150)  # the head checks too, before importing anything
    argv = ["run", "--method", "full", "--task", "ade20k", "--data-root", str(ade_root), *TINY,
            "--set", "task.decoder=uper"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lwbench: error:") and "lwbench[seg]" in err[0], err
    assert not list(Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json"))
    if HEAD_DECODER:
        argv[-1] = "head.decoder=uper"
        assert main(argv) == 2
        assert "lwbench[seg]" in capsys.readouterr().err


def test_decoder_names_and_kinds():
    with pytest.raises(ConfigError) as exc:
        make_head("classification", 8, 3, decoder="uper")
    assert "segmentation decoder" in _one_line(exc)
    with pytest.raises(ConfigError) as exc:
        make_head("segmentation", 8, 3, decoder="segformer")
    assert "known: linear, uper" in _one_line(exc)
    assert make_head("segmentation", 8, 3).fc.out_channels == 3  # linear stays the default, no mmseg needed


def test_task_and_head_decoder_agree_or_fail(ade_root, monkeypatch):
    monkeypatch.setattr(mmseg_compat, "check_versions", lambda: None)
    plain, uper = ADE20K(data_root=ade_root), ADE20K(data_root=ade_root, decoder="uper")
    assert plain.decoder() == plain.decoder("linear") == "linear" and plain.decoder("uper") == "uper"
    assert uper.decoder() == uper.decoder("linear") == uper.decoder("uper") == "uper"
    with pytest.raises(ConfigError) as exc:
        ADE20K(data_root=ade_root, decoder="fcn")
    assert "known: linear, uper" in _one_line(exc)


@needs_head_decoder
def test_head_decoder_config_and_ids(ade_root):
    from lwbench.config import resolve_config
    from lwbench.runner import Plan

    with pytest.raises(ConfigError):
        resolve_config("full", "ade20k", sets=["head.decoder=segformer"], data_root=str(ade_root))
    plans = {d: Plan(resolve_config("full", "ade20k", sets=[f"head.decoder={d}"], data_root=str(ade_root)))
             for d in ("linear", "uper")}
    assert plans["linear"].run_id != plans["uper"].run_id
    assert plans["linear"].teacher_id != plans["uper"].teacher_id  # the decoder is trained with the teacher
    plain = Plan(resolve_config("full", "ade20k", sets=[], data_root=str(ade_root)))
    assert plain.run_id == plans["linear"].run_id
    with pytest.raises(ConfigError) as exc:
        Plan(resolve_config("full", "traffic_signs", sets=["head.decoder=uper"]))
    assert "segmentation" in _one_line(exc)


# -- with mmseg -----------------------------------------------------------------------------------------------
def test_shim_exposes_point_sample_and_refuses_compiled_ops(mmseg):
    kind = mmseg_compat.ensure_mmcv_ops()
    assert kind in ("stub", "compiled") and mmseg_compat.ensure_mmcv_ops() == kind == mmseg_compat.ops_kind()
    mmseg_compat.import_mmseg()
    from mmcv.ops import point_sample
    from mmseg.models.decode_heads import UPerHead

    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    pts = torch.tensor([[[0.125, 0.125], [0.875, 0.625]]])  # cell centres (x, y) in [0, 1]
    assert torch.allclose(point_sample(fmap, pts, align_corners=False)[0, 0], torch.tensor([0.0, 11.0]))
    head = mmseg_compat.UperSegHead(32, 150)
    assert isinstance(head.decode, UPerHead)  # mmseg's own class, not a copy
    if kind == "stub":
        ops = sys.modules["mmcv.ops"]
        with pytest.raises(ModuleNotFoundError):
            from mmcv.ops import CrissCrossAttention  # noqa: F401
        with pytest.raises(mmseg_compat.MmsegUnavailableError):
            ops.sigmoid_focal_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
        from mmseg.models.decode_heads import cc_head

        assert cc_head.CrissCrossAttention is None  # mmseg's optional import took the fallback


def test_stub_only_when_the_compiled_ops_do_not_import(mmseg, monkeypatch):
    fake = types.ModuleType("mmcv.ops")  # as if full mmcv's compiled ops were already imported
    monkeypatch.setitem(sys.modules, "mmcv.ops", fake)
    assert mmseg_compat.ensure_mmcv_ops() == "compiled" and sys.modules["mmcv.ops"] is fake
    monkeypatch.delitem(sys.modules, "mmcv.ops")
    monkeypatch.setattr(mmseg_compat, "_compiled_ops_importable", lambda: True)  # importable: left alone
    assert mmseg_compat.ensure_mmcv_ops() == "compiled" and "mmcv.ops" not in sys.modules
    monkeypatch.undo()
    code = ("import sys; from lwbench import mmseg_compat as m; k = m.ensure_mmcv_ops(); "
            "print(k, [n for n in sys.modules if n.startswith('mmcv.ops')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kind, mods = out.stdout.split(" ", 1)
    if kind == "stub":  # mmcv-lite: no half-imported mmcv.ops.* modules left beside the stand-in
        assert mods.strip() == "['mmcv.ops']", mods
    else:
        assert kind == "compiled"


def test_installed_versions_are_supported(mmseg):
    assert mmseg_compat.version_problem() is None, mmseg_compat.versions()


@pytest.mark.parametrize("grid,keep", [((4, 6), None), ((5, 7), [0, 3, 7, 12, 20, 34])], ids=["dense", "sparse-odd"])
def test_uper_forward_backward(mmseg, grid, keep):
    """Random tokens, all kept on an even grid or a few on an odd one (densify fills the rest; the pyramid's
    max-pool floors 5x7 to 2x3)."""
    torch.manual_seed(0)
    head = mmseg_compat.UperSegHead(32, 150)
    out = _tokens(h=grid[0], w=grid[1], keep=keep)
    logits = head(out, size=(32, 48))
    assert logits.shape == (2, 150, 32, 48) and torch.isfinite(logits).all()
    target = torch.randint(0, 150, (2, 32, 48))
    target[:, :4] = 255
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    loss.backward()
    assert torch.isfinite(out.patches.grad).all() and out.patches.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    head.eval()
    with torch.no_grad():
        a, b = head(out, size=(32, 48)), head(out, size=(32, 48))
    assert torch.equal(a, b)
    with pytest.raises(LwbenchError):
        head(_tokens(h=1, w=6))


def test_uper_macs_in_the_head_part(mmseg):
    from lwbench.backbones import create_backbone
    from lwbench.heads import TaskModel, make_seg_head
    from lwbench.measure.flops import count_macs
    from lwbench.vit import FullEncoder

    torch.manual_seed(0)
    vit = create_backbone("lw_vit_test_p8", (32, 48))
    x = torch.randn(1, 3, 32, 48)
    linear = TaskModel(FullEncoder(vit), make_seg_head(vit.embed_dim, 150, "linear")).eval()
    uper = TaskModel(FullEncoder(vit), make_seg_head(vit.embed_dim, 150, "uper")).eval()
    reps = {c: count_macs(uper, x, counter=c) for c in ("fvcore", "torch")}
    lin = count_macs(linear, x)
    for c, rep in reps.items():
        assert rep.counter == c and rep.unsupported_ops == [], (c, rep.unsupported_ops)
        assert rep.parts["backbone"] == lin.parts["backbone"]  # the decoder's work is all in the head part
        assert rep.parts["head"] > 10 * lin.parts["head"] > 0
    assert reps["fvcore"].macs == reps["torch"].macs


def _rows(results: Path, task: str = "ade20k") -> list[dict]:
    return [r for r in (json.loads(p.read_text()) for p in results.rglob("*.json") if p.parent.name != "per_image")
            if isinstance(r, dict) and r.get("task") == task]


def test_full_with_uper_end_to_end(mmseg, ade_root, capsys):
    """``full`` on the tiny ADE20K fixture with both decoders through the CLI: finite mIoU, the uper row apart
    (own run id, own teacher) and costlier in its head part."""
    results = Path(os.environ["LWBENCH_RESULTS"])
    base = ["run", "--method", "full", "--task", "ade20k", "--data-root", str(ade_root), *TINY]
    assert main(base) == 0, capsys.readouterr().err
    how = "head.decoder=uper" if HEAD_DECODER else "task.decoder=uper"
    assert main([*base, "--set", how]) == 0, capsys.readouterr().err
    rows = _rows(results)
    assert len(rows) == 2, [r.get("run_id") for r in rows]
    by = {("uper" if "uper" in json.dumps(r.get("config", r)) else "linear"): r for r in rows}
    assert set(by) == {"linear", "uper"}
    lin, up = by["linear"], by["uper"]
    for r in (lin, up):
        assert r["metric"] == "miou" and math.isfinite(r["metric_value"]) and 0.0 <= r["metric_value"] / 100 <= 1.0
        assert r["n_eval"] == 2 and r["flops_unsupported_ops"] == ""
    assert up["run_id"] != lin["run_id"] and up["teacher_id"] != lin["teacher_id"]
    assert up["gmacs_backbone"] == pytest.approx(lin["gmacs_backbone"])
    assert up["gmacs_head"] > 10 * lin["gmacs_head"] > 0
    assert main([*base, "--set", how]) == 0  # the same config again: its row is found, not rerun
    assert len(_rows(results)) == 2
