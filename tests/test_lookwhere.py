"""LookWhere: selector/extractor shapes and exactness, the what-where loss, checkpoints, fit, DDP pretraining."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lwbench.backbones import create_backbone
from lwbench.config import TrainConfig
from lwbench.errors import BudgetError, CheckpointError, ConfigError, TrainingError
from lwbench.method import BackboneSpec
from lwbench.methods.lookwhere.checkpoint import encoder_from_official, encoder_from_pretrain_dir, export_official
from lwbench.methods.lookwhere.distill import (
    DistillStudent,
    WhatWhereLoss,
    k_range,
    teacher_targets,
    where_kl,
)
from lwbench.methods.lookwhere.method import LookWhere, default_selector_size
from lwbench.methods.lookwhere.model import Selector, build_encoder, where_ratio
from lwbench.registry import get_method
from lwbench.tokens import TokenOutput
from lwbench.training.loop import train_loop
from lwbench.vit import all_positions, prefix_tokens


def _vit(name="lw_vit_test_p8", size=(64, 96), seed=0):
    torch.manual_seed(seed)
    vit = create_backbone(name, size).eval()
    for blk in vit.blocks:  # LayerScale 1e-5 would make every block ~identity; use real-sized residuals
        blk.ls1.gamma.data.fill_(0.5)
        blk.ls2.gamma.data.fill_(0.5)
    return vit


def _method(vit, name, size, budget=None, **opts):
    """As the quick profile builds it: a 0.3 x high-res selector (the paper's 11-patch default would cover
    these tiny grids whole)."""
    opts.setdefault("selector_size", 0.3)
    return LookWhere(BackboneSpec.of(vit, name, size), budget, **opts)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# -- model ---------------------------------------------------------------------------------------------
def test_registered_and_budgets():
    assert get_method("lookwhere") is LookWhere
    spec = BackboneSpec("vit_base_patch14_reg4_dinov2", (518, 518), 14, 12, 768, 12, 5)
    assert LookWhere.budget_grid(spec) == [86, 128, 342]  # ~1/16, the paper's 128/1369, 1/4
    assert LookWhere(spec).budget == 128 and LookWhere(spec).selector_depth() == 3
    quick = BackboneSpec("lw_vit_nano_p16", (240, 320), 16, 4, 128, 4, 5)
    assert LookWhere(quick).budget == 28 and LookWhere(quick).selector_depth() == 1
    assert LookWhere(quick, selector_size=0.3).selector_size() == (64, 96)  # the quick profile's setting
    assert LookWhere(quick).selector_size() == (176, 240)  # the paper's 11 patches on the short side
    assert default_selector_size((518, 518), 14) == (154, 154)  # the paper's selector ...
    assert default_selector_size((224, 224), 14) == (154, 154)  # ... also at 224 (Table 1's 14.8 GMACs)
    assert default_selector_size((64, 64), 16) == (64, 64)  # never more than the high-res grid
    tiny = BackboneSpec("lw_vit_test_p8", (32, 32), 8, 2, 32, 2, 5)
    assert len(LookWhere.budget_grid(tiny)) == 3  # 16 patches: still three budgets


def test_shapes_and_selection_non_square():
    vit = _vit()
    m = _method(vit, "lw_vit_test_p8", (64, 96), budget=20)
    enc = m.build(vit).eval()
    assert enc.selector.low_size == (16, 32) and enc.selector.low_grid == (2, 4)
    assert enc.selector.r == (4, 3) == where_ratio((8, 12), (2, 4))
    assert enc.selector.head.w2.out_features == 12 and enc.selector.head.w1.out_features == 4 * 32
    x = torch.randn(3, 3, 64, 96)
    out = enc(x)
    assert isinstance(out, TokenOutput)
    assert out.prefix.shape == (3, 5, 32) and out.patches.shape == (3, 20, 32) and out.grid == (8, 12)
    assert out.aux["where_map"].shape == (3, 96)
    sel = out.aux["selected"]
    assert torch.equal(out.positions, sel)
    assert torch.equal(sel, sel.sort(1).values) and all(len(set(r.tolist())) == 20 for r in sel)
    # top-k picks exactly the highest cells of the map
    for b in range(3):
        assert set(sel[b].tolist()) == set(out.aux["where_map"][b].topk(20).indices.tolist())
    assert enc(x, k=7).patches.shape == (3, 7, 32)


class _FixedHead(nn.Module):
    """Where-head whose logit for (low token t, sub-cell s) is 100 t + s."""

    def __init__(self, n_sub):
        super().__init__()
        self.n_sub = n_sub

    def forward(self, tok):
        b, n, _ = tok.shape
        t = torch.arange(n).view(1, n, 1).float() * 100
        return (t + torch.arange(self.n_sub).view(1, 1, -1)).expand(b, -1, -1)


def test_map_tiling_exact_and_resized():
    vit = _vit()
    sel = Selector(vit, 1, (16, 32), (8, 12))  # low grid 2x4, r = (4, 3): tiles are exactly 8x12
    sel.head = _FixedHead(12)
    m = sel.where_map(torch.zeros(1, 8, 32), (8, 12)).reshape(8, 12)
    for row in range(8):
        for col in range(12):
            t = (row // 4) * 4 + col // 3
            s = (row % 4) * 3 + col % 3
            assert m[row, col].item() == 100 * t + s
    # non-square, not a multiple: low 3x4 -> r (3, 3) -> 9x12 tiles, bilinearly resized to 7x10
    sel2 = Selector(vit, 1, (24, 32), (7, 10))
    assert sel2.low_grid == (3, 4) and sel2.r == (3, 3)
    sel2.head = _FixedHead(9)
    m2 = sel2.where_map(torch.zeros(2, 12, 32), (7, 10))
    tiles = torch.stack([_FixedHead(9)(torch.zeros(1, 12, 1))[0]]).reshape(1, 3, 4, 3, 3).permute(0, 1, 3, 2, 4)
    # the tiles are downsized: antialiased by default (the JAX pretraining), plainly as the PyTorch release
    for antialias in (True, False):
        sel2.antialias = antialias
        m2 = sel2.where_map(torch.zeros(2, 12, 32), (7, 10))
        ref = F.interpolate(tiles.reshape(1, 1, 9, 12), size=(7, 10), mode="bilinear", align_corners=False,
                            antialias=antialias).flatten(1)
        assert m2.shape == (2, 70) and torch.allclose(m2[0], ref[0])


def test_extractor_is_exact_plain_backbone():
    """k = all patches with the extractor's own prefix tokens reproduces timm's forward exactly."""
    for name, size in (("lw_vit_test_p8", (64, 96)), ("lw_vit_test_p14", (56, 56))):
        vit = _vit(name, size)
        enc = _method(vit, name, size).build(vit).eval()
        x = torch.randn(2, 3, *size)
        grid = (size[0] // vit.patch_embed.patch_size[0], size[1] // vit.patch_embed.patch_size[0])
        out = enc.extractor(x, all_positions(2, grid, x.device), prefix_tokens(enc.extractor.vit, 2))
        with torch.no_grad():
            ref = vit.forward_features(x)
        assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
        # ... and a subset of patches equals the plain model run on that subset (embedding only those pixels)
        idx = torch.tensor([[0, 3, 5, 9], [1, 2, 7, 8]])
        sub = enc.extractor(x, idx, prefix_tokens(enc.extractor.vit, 2))
        emb = vit.patch_embed(x).reshape(2, -1, vit.embed_dim) + vit.pos_embed
        emb = torch.gather(emb, 1, idx.unsqueeze(-1).expand(-1, -1, vit.embed_dim))
        ref_sub = vit.norm(vit.blocks(torch.cat([prefix_tokens(vit, 2), emb], 1)))
        assert torch.allclose(torch.cat([sub.prefix, sub.patches], 1), ref_sub, atol=1e-5)


def test_selector_runs_teacher_blocks_at_low_res():
    vit = _vit()
    sel = Selector(vit, 1, (16, 32), (8, 12))
    x = torch.randn(2, 3, 64, 96)
    low = F.interpolate(x, size=(16, 32), mode="bilinear", align_corners=False, antialias=True)  # the default
    ref = copy.deepcopy(vit)
    ref.blocks = ref.blocks[:1]
    ref.set_input_size(img_size=(16, 32))
    prefix, where = sel(x, (8, 12))
    assert torch.equal(prefix, ref.forward_features(low)[:, :5])
    sel.antialias = False  # the released PyTorch inference: a plain bilinear resize, another input
    plain = F.interpolate(x, size=(16, 32), mode="bilinear", align_corners=False)
    assert torch.equal(sel(x, (8, 12))[0], ref.forward_features(plain)[:, :5])
    assert (plain - low).abs().max() > 0.1  # noise is high-frequency: antialiasing changes it
    assert len(vit.blocks) == 2  # the teacher was not modified


# -- distillation -----------------------------------------------------------------------------------
def test_kl_zero_when_maps_equal():
    a = torch.randn(4, 30)
    assert where_kl(a, a.clone()).abs().item() < 1e-6
    assert where_kl(a, a + 3.0).abs().item() < 1e-6  # softmax is shift-invariant
    assert where_kl(a, torch.randn(4, 30)).item() > 1e-3


@pytest.mark.parametrize("queries", ["patch", "cls"])
def test_attention_side_computation_matches_explicit(queries):
    vit = _vit("lw_vit_test_p14", (56, 56))
    x = torch.randn(2, 3, 56, 56)
    t_cls, t_patch, a_side = teacher_targets(vit, x, queries)
    with torch.no_grad():
        ref = vit.forward_features(x)
    assert torch.equal(t_cls, ref[:, 0]) and torch.equal(t_patch, ref[:, 5:])  # post final norm
    # explicit logits: the full N x N matrix from the last block's qkv, then the means
    captured = {}
    last = vit.blocks[-1]
    h = last.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        vit.forward_features(x)
    h.remove()
    attn = last.attn
    with torch.no_grad():
        z = last.norm1(captured["x"])
        b, n, _ = z.shape
        q, k, _v = attn.qkv(z).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
    rows = slice(5, None) if queries == "patch" else slice(0, 1)
    explicit = logits[:, :, rows, 5:].mean(dim=(1, 2))
    assert a_side.shape == (2, 16)
    assert torch.allclose(a_side, explicit, atol=1e-5)
    # independent check against timm's own non-fused attention (its softmax probabilities):
    # mean log-probs differ from mean logits by a per-image constant, so their softmax over keys agree
    slow = copy.deepcopy(vit)
    slow.blocks[-1].attn.fused_attn = False
    probs = {}
    hook = slow.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, a, o: probs.__setitem__("p", a[0]))
    with torch.no_grad():
        slow.forward_features(x)
    hook.remove()
    mean_logp = probs["p"].log()[:, :, rows, 5:].mean(dim=(1, 2))
    assert torch.allclose(torch.softmax(mean_logp, 1), torch.softmax(a_side, 1), atol=1e-5)
    assert vit.blocks[-1].attn.fused_attn  # the teacher keeps fused attention


def test_distill_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    teacher = _vit("lw_vit_test_p8", (32, 32), seed=1)
    for p in teacher.parameters():
        p.requires_grad_(False)
    enc = _method(teacher, "lw_vit_test_p8", (32, 32), budget=4, selector_size=16).build(teacher)
    enc.set_trainable(True, True)
    assert k_range(16, 16, 128) == (16, 16) and k_range(16, 4, 128) == (4, 16)
    loss = WhatWhereLoss(teacher, DistillStudent(enc), min_k=6, max_k=6)
    x = torch.randn(4, 3, 32, 32)
    first, logs = loss(enc, x, torch.zeros(4))
    assert set(logs) == {"cls", "patch", "kl", "k"} and logs["k"] == 6
    batches = iter([(x, torch.zeros(4))] * 30)
    train_loop(enc, loss, batches, TrainConfig(steps=30, lr=3e-3, weight_decay=0.0, grad_clip=None), quiet=True)
    enc.train()
    last, _ = loss(enc, x, torch.zeros(4))
    assert last.item() < 0.5 * first.item()
    assert not any(p.requires_grad for p in teacher.parameters())


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_budgets_and_options_fail_before_work():
    vit = _vit("lw_vit_test_p8", (32, 32))
    for k in (0, 17):
        with pytest.raises(BudgetError) as e:
            _method(vit, "lw_vit_test_p8", (32, 32), budget=k)
        assert "k=1..16" in _one_line(e)
    with pytest.raises(BudgetError) as e:
        _method(vit, "lw_vit_test_p8", (32, 32), selector_size=20)
    assert "not divisible by the patch size 8" in _one_line(e)
    for size in ("big", 1.5, "16.5", -0.3):
        with pytest.raises((ConfigError, BudgetError)) as e:
            _method(vit, "lw_vit_test_p8", (32, 32), selector_size=size)
        assert "selector" in _one_line(e)
    assert _method(vit, "lw_vit_test_p8", (64, 96), selector_size=0.3).selector_size() == (16, 32)
    with pytest.raises(ConfigError) as e:
        _method(vit, "lw_vit_test_p8", (32, 32), selector_depth=3)
    assert "1..2" in _one_line(e)
    with pytest.raises(ConfigError):
        _method(vit, "lw_vit_test_p8", (32, 32), attn_queries="all")
    with pytest.raises(ConfigError):
        _method(vit, "lw_vit_test_p8", (32, 32), distill_min_k=64, distill_max_k=16)
    with pytest.raises(CheckpointError) as e:
        _method(vit, "lw_vit_test_p8", (32, 32), weights="/nonexistent/lookwhere_dinov2.pt")
    assert "not found" in _one_line(e)


# -- checkpoints ---------------------------------------------------------------------------------------
def _official_model(size=(112, 112)):
    vit = _vit("lw_vit_test_p14", size, seed=3)
    enc = build_encoder(vit, 12, 2, 42, size)  # selector 42 px -> 3x3 grid; r = ceil(8/3) = 3
    torch.manual_seed(5)
    for p in enc.parameters():
        p.data.normal_(0, 0.2)
    return enc.eval()


def test_official_checkpoint_round_trip(tmp_path):
    enc = _official_model()
    sd = export_official(enc)
    assert set(sd) == {"selector", "extractor"} and set(sd["selector"]) == {"backbone", "head"}
    assert set(sd["selector"]["head"]) == {"w1.weight", "w1.bias", "w2.weight", "w2.bias"}
    assert sd["selector"]["backbone"]["pos_embed"].shape == (1, 9, 48)  # 42 px / 14 = 3x3
    assert "blocks.2.norm1.weight" in sd["extractor"] and "blocks.2.norm1.weight" not in sd["selector"]["backbone"]
    path = tmp_path / "lookwhere_dinov2.pt"
    torch.save(sd, path)
    fresh_teacher = _vit("lw_vit_test_p14", (112, 112), seed=9)  # other weights: all must come from the file
    loaded = encoder_from_official(path, fresh_teacher, (112, 112), k=12).eval()
    assert loaded.selector.r == (3, 3) and loaded.selector.depth == 2 and loaded.selector.low_size == (42, 42)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert torch.equal(a.aux["selected"], b.aux["selected"])
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.patches, b.patches)
    # another task size: position embeddings resampled, map resized to the new grid
    other = encoder_from_official(path, fresh_teacher, (140, 98), k=12)
    with torch.no_grad():
        o = other(torch.randn(1, 3, 140, 98))
    assert o.grid == (10, 7) and o.aux["where_map"].shape == (1, 70)


def test_checkpoint_errors_name_the_problem():
    sd = export_official(_official_model())
    teacher = _vit("lw_vit_test_p14", (112, 112))
    broken = copy.deepcopy(sd)
    del broken["extractor"]["blocks.1.attn.qkv.weight"]
    with pytest.raises(CheckpointError) as e:
        encoder_from_official(broken, teacher, (112, 112), k=12)
    assert "extractor" in _one_line(e) and "blocks.1.attn.qkv.weight" in str(e.value)
    broken = copy.deepcopy(sd)
    del broken["selector"]["head"]["w2.bias"]
    with pytest.raises(CheckpointError) as e:
        encoder_from_official(broken, teacher, (112, 112), k=12)
    assert "selector.head.w2.bias" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        encoder_from_official({"extractor": sd["extractor"]}, teacher, (112, 112), k=12)
    assert "missing selector" in _one_line(e)
    other_arch = _vit("lw_vit_test_p8", (112, 112))
    with pytest.raises(CheckpointError) as e:
        encoder_from_official(sd, other_arch, (112, 112), k=12)
    msg = _one_line(e)
    assert "does not match" in msg and "dim 32" in msg and "dim 48" in msg


# -- training: NaN guard, fit, pretrain ---------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    teacher = _vit("lw_vit_test_p8", (32, 32))
    enc = _method(teacher, "lw_vit_test_p8", (32, 32), budget=4).build(teacher)
    enc.set_trainable(True, True)
    loss = WhatWhereLoss(teacher, DistillStudent(enc), 4, 8)
    x = torch.randn(2, 3, 32, 32)
    ckpt = tmp_path / "distill"
    train_loop(enc, loss, iter([(x, x[:, 0, 0, 0])] * 3), TrainConfig(steps=3, lr=1e-3, grad_clip=None), ckpt_dir=ckpt,
               quiet=True)
    saved = (ckpt / "model.safetensors").read_bytes()
    calls = {"n": 0}

    def poisoned(model, images, targets):
        calls["n"] += 1
        value, logs = loss(model, images, targets)
        return (value * float("nan") if calls["n"] >= 2 else value), logs

    with pytest.raises(TrainingError) as e:
        train_loop(enc, poisoned, iter([(x, x[:, 0, 0, 0])] * 10), TrainConfig(steps=8, lr=1e-3, grad_clip=None),
                   ckpt_dir=ckpt, quiet=True)
    assert "nan" in _one_line(e) and str(ckpt) in str(e.value)
    assert (ckpt / "model.safetensors").read_bytes() == saved
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3


class _TinyTask:
    """Just what FitContext uses: a training loader of random images."""

    name = "tiny"
    kind = "classification"

    def __init__(self, size):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, *size, generator=g)
        self.y = torch.randint(0, 3, (16,), generator=g)

    def loader(self, split, batch_size, train=False, num_workers=0, limit=None):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train)


def test_fit_distills_once_and_finetunes_each_k(tmp_path):
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.methods.full import FullEncoder
    from lwbench.training.context import FitContext

    size = (32, 48)
    teacher_vit = _vit("lw_vit_test_p8", size)
    teacher = TaskModel(FullEncoder(teacher_vit), ClassifierHead(32, 3)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    defaults = TrainConfig(steps=3, batch_size=4, lr=1e-3, weight_decay=0.05, warmup_steps=0)

    def ctx(k):
        return FitContext(task=_TinyTask(size), teacher=teacher, defaults=defaults, work_dir=tmp_path / f"k{k}",
                          shared_dir=tmp_path / "shared", quiet=True)

    m1 = _method(teacher_vit, "lw_vit_test_p8", size, budget=6, distill={"steps": 4})
    c6 = ctx(6)
    model = m1.fit(c6)
    tag = m1.distill_tag(c6.stage(m1.opts.distill))
    # stage times come from this run's own stages, not from other folders of the shared teacher
    assert set(c6.stage_times) == {tag, "finetune"} and all(t > 0 for t in c6.stage_times.values())
    assert tag.startswith("distill-d1-s8x16-k16-128-patch-")
    done = tmp_path / "shared" / tag / "done.json"
    assert json.loads(done.read_text())["steps"] == 4
    assert (tmp_path / "k6" / "finetune" / "done.json").is_file()
    # high-res grid 4x6 from a 1x2 selector grid
    assert json.loads((tmp_path / "shared" / tag / "lookwhere.json").read_text())["r"] == [4, 3]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    assert not any(p.requires_grad for p in model.encoder.selector.parameters())
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 3)
    # the fine-tuned selector is exactly the distilled one (frozen); the extractor moved
    distilled = encoder_from_pretrain_dir(tmp_path / "shared" / tag, teacher_vit, size, k=6)
    tuned, ref = model.encoder.selector.state_dict(), distilled.selector.state_dict()
    assert tuned.keys() == ref.keys() and all(torch.equal(tuned[n], ref[n]) for n in ref)
    assert not torch.equal(model.encoder.extractor.vit.blocks[0].attn.qkv.weight,
                           distilled.extractor.vit.blocks[0].attn.qkv.weight)
    # a second k reuses the distillation without touching it
    stamp = done.stat().st_mtime_ns, (done.parent / "model.safetensors").stat().st_mtime_ns
    other = _method(teacher_vit, "lw_vit_test_p8", size, budget=12, distill={"steps": 5})  # another variant
    assert other.distill_tag(c6.stage(other.opts.distill)) != tag
    c12 = ctx(12)
    model2 = _method(teacher_vit, "lw_vit_test_p8", size, budget=12, distill={"steps": 4}).fit(c12)
    assert c12.stage_times[tag] == c6.stage_times[tag]  # the cached distillation counts what it took once
    assert stamp == (done.stat().st_mtime_ns, (done.parent / "model.safetensors").stat().st_mtime_ns)
    assert model2.encoder(x).patches.shape == (2, 12, 32)


def _image_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _teacher_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    vit = _vit("lw_vit_test_p8", (32, 32))
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_pretrain_single_process_and_resume(tmp_path):
    from lwbench.methods.lookwhere.pretrain import main

    data, teacher = _image_folder(tmp_path / "imgs"), _teacher_file(tmp_path)
    out = tmp_path / "out"
    args = ["--teacher", "lw_vit_test_p8", "--teacher-weights", str(teacher), "--data", str(data), "--img-size", "32",
            "--batch-size", "2", "--out", str(out), "--quiet", "--selector-size", "16"]
    assert main(args + ["--steps", "2"]) == 0
    assert json.loads((out / "done.json").read_text())["steps"] == 2
    assert main(args + ["--steps", "4"]) == 0  # resumes from step 2
    assert json.loads((out / "state.json").read_text())["step"] == 4
    meta = json.loads((out / "lookwhere.json").read_text())
    assert meta["selector_size"] == [16, 16] and meta["r"] == [2, 2] and meta["world_size"] == 1
    enc = encoder_from_pretrain_dir(out, _vit("lw_vit_test_p8", (32, 32), seed=4), (48, 48), k=5)
    assert enc(torch.randn(1, 3, 48, 48)).grid == (6, 6)  # loaded at another size: position embeddings resampled
    assert main(args[:-2] + ["--selector-size", "20", "--steps", "1"]) == 2  # bad size: one-line error, exit 2


@pytest.mark.slow
def test_pretrain_ddp_two_processes_gloo(tmp_path):
    data, teacher = _image_folder(tmp_path / "imgs", n=8), _teacher_file(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lwbench.methods.lookwhere.pretrain", "--teacher", "lw_vit_test_p8", "--teacher-weights", str(teacher),
           "--data", str(data), "--img-size", "32", "--batch-size", "2", "--steps", "3", "--out", str(out),
           "--selector-size", "16", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "done.json").read_text())["steps"] == 3
    assert json.loads((out / "lookwhere.json").read_text())["world_size"] == 2
    assert not list(out.glob("*.tmp"))
    enc = encoder_from_pretrain_dir(out, _vit("lw_vit_test_p8", (32, 32)), (32, 32), k=4)
    assert enc(torch.randn(1, 3, 32, 32)).patches.shape == (1, 4, 32)


def test_figure(tmp_path):
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.methods.lookwhere.figure import selection, show

    vit = _vit("lw_vit_test_p8", (32, 48))
    model = TaskModel(_method(vit, "lw_vit_test_p8", (32, 48), budget=5).build(vit), ClassifierHead(32, 3))
    x = torch.randn(3, 3, 32, 48)
    where, keep, grid = selection(model, x)
    assert grid == (4, 6) and where.shape == (3, 4, 6) and keep.sum().item() == 15
    png = show(model, x, tmp_path / "fig" / "lw.png")
    img = Image.open(png)
    assert img.size[0] > 300 and img.size[1] > 300
