"""Selection diagnostics: processed cells, object recall, the where-target guard, the teacher's attention loss."""

from __future__ import annotations

import math

import pytest
import torch

from lwbench.diagnostics import object_recall, recall, selection_warning, where_target_recall
from lwbench.tokens import TokenOutput
from lwbench.training.teacher import attention_object_loss, cell_targets


def _out(positions, grid=(2, 3), assignment=None, mask=None):
    pos = torch.tensor(positions)
    b, m = pos.shape
    return TokenOutput(prefix=torch.zeros(b, 1, 4), patches=torch.zeros(b, m, 4), positions=pos, grid=grid,
                       assignment=None if assignment is None else torch.tensor(assignment),
                       mask=None if mask is None else torch.tensor(mask))


def test_processed_cells_kept_fused_padding_and_merged():
    out = _out([[0, 4, -1], [5, 5, 2]], mask=[[True, True, True], [True, False, True]])
    assert out.processed_cells().tolist() == [[True, False, False, False, True, False],
                                              [False, False, True, False, False, True]]
    # a merged token stands for every cell it absorbed
    merged = _out([[0, 3]], assignment=[[0, 0, -1, 1, 1, -1]])
    assert merged.processed_cells().tolist() == [[True, True, False, True, True, False]]


def test_recall_known_answer():
    chosen = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    objects = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    r = recall(chosen, objects)
    assert r[:2].tolist() == [0.5, 0.0] and math.isnan(r[2])


class _ObjectTask:
    """4x6 grid of 8 px patches; image i has one 16x16 object whose top-left cell is (i % 3, i % 5)."""

    name, kind, img_size, seed = "objects", "classification", (32, 48), 0

    def box(self, i):
        y, x = (i % 3) * 8, (i % 5) * 8
        return (x, y, x + 16, y + 16)

    def objects(self, split, i):
        return [{"box": self.box(i), "label": 1}]

    def dataset(self, split, train=False):
        g = torch.Generator().manual_seed(1)
        return torch.utils.data.TensorDataset(torch.randn(10, 3, *self.img_size, generator=g), torch.zeros(10).long())


class _PickCells(torch.nn.Module):
    """An "encoder" that processes exactly the object cells of image i (``hit=True``) or the first 4 cells."""

    def __init__(self, task, hit):
        super().__init__()
        self.task, self.hit, self.calls = task, hit, 0

    def forward(self, x):
        b = x.shape[0]
        idx = range(self.calls, self.calls + b)
        self.calls += b
        if self.hit:
            pos = torch.stack([cell_targets(self.task.objects("test", i), (4, 6), 8).nonzero()[:, 0] for i in idx])
        else:
            pos = torch.tensor([[0, 1, 6, 7]]).expand(b, -1)  # the top-left 2x2 block
        return TokenOutput(prefix=torch.zeros(b, 1, 2), patches=torch.zeros(b, 4, 2), positions=pos, grid=(4, 6))


def test_object_recall_of_a_model_against_chance():
    task = _ObjectTask()
    model = type("M", (torch.nn.Module,), {})()
    model.encoder = _PickCells(task, hit=True)
    got = object_recall(model, task, patch=8, batch_size=4)
    assert got["object_recall"] == 1.0 and got["object_recall_chance"] == pytest.approx(4 / 24)
    model.encoder = _PickCells(task, hit=False)
    got = object_recall(model, task, patch=8, batch_size=4)
    # images 0..9: the object starts at (i%3, i%5); overlap with the top-left 2x2 block, in cells of 4
    expect = []
    for i in range(10):
        r, c = i % 3, i % 5
        expect.append(max(0, 2 - r) * max(0, 2 - c) / 4)
    assert got["object_recall"] == pytest.approx(sum(expect) / 10)


def test_guard_fires_when_attention_misses_the_objects_and_not_when_it_covers_them(monkeypatch):
    from lwbench import diagnostics
    from lwbench.backbones import create_backbone

    task = _ObjectTask()
    torch.manual_seed(0)
    vit = create_backbone("lw_vit_test_p8", task.img_size).eval()
    images = {"n": 0}

    def fake_logits(on_object):
        def logits(self, n_prefix, queries="patch"):
            b = next(iter(self.x.values())).shape[0]
            rows = []
            for i in range(images["n"], images["n"] + b):
                obj = cell_targets(task.objects("val", i), (4, 6), 8).float() > 0
                rows.append(obj.float() if on_object else (~obj).float())
            images["n"] += b
            return {i: torch.stack(rows) for i in self.indices}
        return logits

    for on_object, warned in ((True, False), (False, True)):
        images["n"] = 0
        monkeypatch.setattr(diagnostics.BlockInputs, "logits", fake_logits(on_object))
        found = where_target_recall(vit, task, k=4, queries="cls", n=10)
        assert found["where_target_chance"] == pytest.approx(4 / 24)
        assert found["where_target_recall"] == (1.0 if on_object else 0.0)
        msg = selection_warning(found["where_target_recall"], found["where_target_chance"])
        assert bool(msg) is warned
        if warned:
            assert "does not cover the objects" in msg and "miss them" in msg


def test_guard_thresholds():
    assert selection_warning(0.09, 0.093)  # at chance: fires
    assert selection_warning(0.30, 0.093)  # above chance but not clearly (needs 0.093 + 0.25 * 0.907 = 0.32)
    assert not selection_warning(0.33, 0.093)
    assert not selection_warning(0.63, 0.5) and selection_warning(0.62, 0.5)  # large k: a quarter of the gap
    assert not selection_warning(math.nan, 0.1)  # no annotations: nothing to say


def test_attention_object_loss_known_answers():
    cells = torch.tensor([[0, 2, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    uniform = torch.zeros(2, 6)
    # uniform attention over 6 cells, object = 2 cells: KL(m || u) = log(6 / 2); the empty image is skipped
    assert attention_object_loss(uniform, cells).item() == pytest.approx(math.log(3), rel=1e-6)
    peaked = torch.tensor([[0.0, 20.0, 20.0, 0.0, 0.0, 0.0], [0.0] * 6])
    assert attention_object_loss(peaked, cells).item() < 1e-6
    empty = attention_object_loss(uniform.requires_grad_(), torch.zeros(2, 6).long())
    assert empty.item() == 0.0 and empty.requires_grad


def test_teacher_attention_loss_moves_attention_onto_the_objects():
    """A few steps of the teacher's loss with attention supervision raise the attention mass on the object."""
    from lwbench.attention import LastBlockInput
    from lwbench.backbones import create_backbone
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.methods.full import FullEncoder
    from lwbench.training.teacher import DenseTrainer
    from lwbench.vit import num_prefix

    task = _ObjectTask()
    torch.manual_seed(0)
    vit = create_backbone("lw_vit_test_p8", task.img_size)
    trainer = DenseTrainer(TaskModel(FullEncoder(vit), ClassifierHead(vit.embed_dim, 2, "max")), 2,
                           attn_weight=1.0, attn_queries="cls")
    x = task.dataset("train")[:][0][:6]
    cells = torch.stack([cell_targets(task.objects("train", i), (4, 6), 8) for i in range(6)])
    targets = {"label": torch.zeros(6).long(), "cells": cells}

    def mass():
        with torch.no_grad(), LastBlockInput(vit) as last:
            vit.forward_features(x)
            p = last.logits(num_prefix(vit), "cls").softmax(1)
        return float((p * (cells > 0)).sum(1).mean())

    before = mass()
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
    for _ in range(25):
        loss, stats = trainer.loss(x, targets, weight=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "attn" in stats and "dense" not in stats
    assert mass() > before + 0.3, (before, mass())


def test_object_smaller_than_a_cell_gets_the_cell_of_its_centre():
    from lwbench.diagnostics import object_mask

    class Small(_ObjectTask):
        def objects(self, split, i):  # 6x6 px at x 13..19: no cell centre (x = 4, 12, 20, ...) inside
            return [{"box": (13.0, 1.0, 19.0, 7.0), "label": 1}]

    assert not cell_targets(Small().objects("test", 0), (4, 6), 8).any()
    mask = object_mask(Small(), "test", 0, (4, 6), 8)
    assert mask.nonzero().flatten().tolist() == [2]  # row 0, column 2 holds the box centre (16, 4)


def test_run_warns_when_the_processed_patches_miss_the_objects():
    from lwbench.runner import missed_objects

    assert "misses the objects" in missed_objects({"object_recall": 0.1, "object_recall_chance": 0.09})
    assert missed_objects({"object_recall": 0.9, "object_recall_chance": 0.09}) == ""
    assert missed_objects({"object_recall": 1.0, "object_recall_chance": 1.0}) == ""  # full: nothing selected
    assert missed_objects({"object_recall": math.nan, "object_recall_chance": math.nan}) == ""


def test_teacher_attention_loss_on_every_block_trains_the_first_block_too():
    """``attn_blocks="all"`` puts the first block's CLS attention on the object (what EViT / top-k / ATS prune
    by); ``"last"`` leaves it where it was. ``attention_recall`` reports every block."""
    from lwbench.attention import BlockInputs
    from lwbench.backbones import create_backbone
    from lwbench.diagnostics import attention_recall
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.methods.full import FullEncoder
    from lwbench.training.teacher import DenseTrainer
    from lwbench.vit import num_prefix

    task = _ObjectTask()
    x = task.dataset("train")[:][0][:6]
    cells = torch.stack([cell_targets(task.objects("train", i), (4, 6), 8) for i in range(6)])
    targets = {"label": torch.zeros(6).long(), "cells": cells}
    gained = {}
    for blocks in ("last", "all"):
        torch.manual_seed(0)
        vit = create_backbone("lw_vit_test_p8", task.img_size)
        trainer = DenseTrainer(TaskModel(FullEncoder(vit), ClassifierHead(vit.embed_dim, 2, "max")), 2,
                               attn_weight=1.0, attn_queries="cls", attn_blocks=blocks)

        def first_block_mass(vit=vit):
            with torch.no_grad(), BlockInputs(vit, [0]) as captured:
                vit.forward_features(x)
                p = captured.logits(num_prefix(vit), "cls")[0].softmax(1)
            return float((p * (cells > 0)).sum(1).mean())

        before = first_block_mass()
        opt = torch.optim.AdamW(trainer.parameters(), lr=3e-3)
        for _ in range(25):
            loss, _ = trainer.loss(x, targets, weight=0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gained[blocks] = first_block_mass() - before
        per_block = attention_recall(vit, task, k=4, queries="cls", split="train", n=6)
        assert sorted(per_block) == list(range(len(vit.blocks)))
        assert all(0.0 <= r <= 1.0 for r in per_block.values())
    assert gained["all"] > 0.3 and gained["all"] > gained["last"] + 0.2, gained
