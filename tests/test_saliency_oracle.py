"""The two reference selectors: ``saliency`` (no learning) and ``oracle`` (the annotated cells), known answers,
their cost counted, and the oracle's refusal on tasks without objects."""

from __future__ import annotations

import logging

import pytest
import torch
from _toy import make

from lwbench.errors import ConfigError
from lwbench.flops_report import random_model
from lwbench.measure.flops import OVERHEAD_ELEMENTWISE, count_macs
from lwbench.methods.oracle import Oracle, OracleEncoder, fingerprint, object_cells_by_fingerprint
from lwbench.methods.saliency import SaliencyEncoder, patch_edge_energy, patch_variance

TINY, SIZE = "lw_vit_test_p8", (32, 48)  # a 4 x 6 grid of 8 px patches


# -- saliency -----------------------------------------------------------------------------------------------
def test_patch_variance_known_answer():
    x = torch.zeros(1, 1, 2, 4)  # two 2x2 patches: flat, and a 0/1 checkerboard
    x[0, 0, :, 2:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert patch_variance(x, 2).tolist() == [[0.0, 0.25]]
    y = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    cells = torch.nn.functional.unfold(y, 8, stride=8).transpose(1, 2)  # (B, N, C*p*p)
    assert torch.allclose(patch_variance(y, 8), cells.var(-1, unbiased=False), atol=1e-6)


def test_patch_edge_energy_known_answer():
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, :, 3] = 1.0  # second patch: a vertical step between its columns; the first patch is flat
    # second patch: dx = [1, 1] (two rows), dy = [0, 0]: sum dx^2 / (p (p - 1)) = 2 / 2 = 1
    assert patch_edge_energy(x, 2).tolist() == [[0.0, 1.0]]
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, :, 2:] = 1.0  # a step exactly on the patch border: inside each patch nothing changes
    assert patch_edge_energy(x, 2).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("statistic", ["variance", "edges"])
def test_saliency_keeps_the_busy_cells(statistic):
    vit, spec = make(TINY, SIZE)
    x = torch.full((2, 3, *SIZE), 0.5)
    busy = [[1, 8, 23], [0, 5, 17]]  # cells (row-major on 4 x 6) that get texture, per image
    g = torch.Generator().manual_seed(0)
    for b, cells in enumerate(busy):
        for c in cells:
            r, col = divmod(c, 6)
            x[b, :, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] = torch.rand(3, 8, 8, generator=g)
    out = SaliencyEncoder(vit, 3, statistic).eval()(x)
    assert out.positions.tolist() == busy


def test_saliency_cost_is_counted_exactly_by_both_counters():
    model, _, _, hw = random_model("saliency", TINY, SIZE, "k=6", num_classes=3)
    plain, _, _, _ = random_model("random", TINY, SIZE, "k=6", num_classes=3)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    v = 3 * 32 * 48  # pixel values; variance = mean(v) + mul(v*v) + mean(v^2) + per-cell mul and sub (24 each)
    expect = 3 * v + 2 * 24
    for counter in ("fvcore", "torch"):
        rep, ref = count_macs(model, x, counter=counter), count_macs(plain, x, counter=counter)
        assert rep.parts["overhead"] == expect, counter
        assert rep.by_operator[OVERHEAD_ELEMENTWISE] == expect
        assert rep.macs == ref.macs + expect  # the same extractor at the same k, plus the statistic


def test_elementwise_stays_uncounted_outside_overhead():
    model, _, _, hw = random_model("full", TINY, SIZE, None, num_classes=3)
    rep = count_macs(model, torch.randn(1, 3, *hw))
    assert OVERHEAD_ELEMENTWISE not in rep.by_operator and "aten::layer_norm" in rep.uncounted_ops


# -- oracle -------------------------------------------------------------------------------------------------
class _ObjectTask:
    """Six random 32x48 test images; image i has one 16x16 object with its top-left cell at (i % 3, i % 5)."""

    name, kind, img_size, seed, source = "objects", "classification", SIZE, 0, "synthetic"

    def objects(self, split, i):
        y, x = (i % 3) * 8, (i % 5) * 8
        return [{"box": (x, y, x + 16, y + 16), "label": 1}]

    def dataset(self, split, train=False):
        g = torch.Generator().manual_seed(1)
        return torch.utils.data.TensorDataset(torch.randn(6, 3, *SIZE, generator=g), torch.zeros(6).long())


def _object_cells(i):
    r, c = i % 3, i % 5
    return sorted((r + dr) * 6 + c + dc for dr in (0, 1) for dc in (0, 1))


def test_oracle_takes_the_object_cells_first_then_random():
    vit, spec = make(TINY, SIZE)
    task = _ObjectTask()
    enc = OracleEncoder(vit, 6).eval()
    enc.object_cells = object_cells_by_fingerprint(task, spec.grid, spec.patch)
    images = task.dataset("test").tensors[0]
    out = enc(images)
    for i in range(6):
        kept = out.positions[i].tolist()
        assert set(_object_cells(i)) <= set(kept) and len(set(kept)) == 6 and kept == sorted(kept)
    small = OracleEncoder(vit, 3).eval()
    small.object_cells = enc.object_cells
    for i, kept in enumerate(small(images).positions.tolist()):  # k below the object's 4 cells: object cells only
        assert set(kept) <= set(_object_cells(i))


def test_oracle_input_it_does_not_know_is_random_and_warned(caplog):
    vit, spec = make(TINY, SIZE)
    enc = OracleEncoder(vit, 4).eval()
    enc.object_cells = object_cells_by_fingerprint(_ObjectTask(), spec.grid, spec.patch)
    with caplog.at_level(logging.WARNING, logger="lwbench"):
        out = enc(torch.randn(2, 3, *SIZE))
    assert out.positions.shape == (2, 4)
    assert "not test images" in caplog.text


def test_fingerprint_tells_images_apart_and_ignores_the_copy():
    a = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 0, 0] += 1e-3  # one value changed somewhere: most likely not a fingerprinted one, so change many
    c = a + 1e-3
    assert fingerprint(a) == fingerprint(a.clone()) and fingerprint(a) != fingerprint(c)
    assert fingerprint(a[None][0]) == fingerprint(a)


def test_oracle_refuses_a_task_without_objects():
    class NoObjects(_ObjectTask):
        name = "plain"

        def objects(self, split, i):
            return None

    _, spec = make(TINY, SIZE)
    with pytest.raises(ConfigError, match="annotates no object boxes"):
        Oracle(spec, 4).check_task(NoObjects())
    Oracle(spec, 4).check_task(_ObjectTask())  # and passes where there are boxes


def test_cli_runs_both_and_the_oracle_sees_the_objects(tmp_path, monkeypatch, capsys):
    """End to end on tiny traffic signs: the oracle's object recall is (near) perfect and above ``saliency``'s
    random-level floor's chance; ``oracle`` on a task without boxes is one line before any work."""
    import json
    from pathlib import Path

    from test_cli import TINY as TINY_ARGS

    from lwbench.cli import main

    monkeypatch.setenv("LWBENCH_RESULTS", str(tmp_path / "results"))
    for method in ("oracle", "saliency"):
        assert main(["run", "--method", method, "--task", "traffic_signs", "--budget", "k=8", *TINY_ARGS]) == 0
    rows = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in Path(tmp_path / "results").rglob("*.json") if not p.name.startswith("per_image")}
    oracle, sal = rows["oracle"], rows["saliency"]
    assert oracle["object_recall"] >= 0.9 > oracle["object_recall_chance"]
    assert oracle["object_recall"] >= sal["object_recall"]
    assert sal["gmacs_overhead"] > 0 == oracle["gmacs_overhead"]


def test_oracle_finetunes_on_the_annotated_cells_of_unaugmented_training_images():
    """In the finetuned regime the training batches are un-augmented training images, and each one's object
    cells are among the processed ones (version 1 trained on augmented images, so on random cells)."""
    from types import SimpleNamespace

    vit, spec = make(TINY, SIZE)
    task = _ObjectTask()
    seen: dict = {}

    def finetune(model, tag, batches=None, **kw):
        x, _ = next(iter(batches))
        model.train()
        kept = model.encoder(x).positions
        images = task.dataset("train").tensors[0]
        index = [next(j for j in range(6) if torch.equal(images[j], x[i])) for i in range(x.shape[0])]
        seen["ok"] = all(set(_object_cells(j)) <= set(kept[i].tolist()) for i, j in enumerate(index))
        seen["tag"] = tag
        return model

    ctx = SimpleNamespace(teacher=SimpleNamespace(encoder=SimpleNamespace(vit=vit), head=torch.nn.Linear(32, 3)),
                          regime="finetuned", task=task, finetune=finetune, device="cpu",
                          stage=lambda s: SimpleNamespace(batch_size=4, workers=0))
    model = Oracle(spec, 6).fit(ctx)
    assert seen == {"ok": True, "tag": "oracle-k=6-finetune"}
    assert len(model.encoder.object_cells) == 6  # then the test images' table, for evaluation
