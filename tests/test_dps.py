"""DPS: perturbed top-k (forward, gradient, sigma -> 0), scorer, sigma schedule, hard top-k at test, fit smoke test."""

from __future__ import annotations

import pytest
import torch
from _toy import BACKBONE_CASES, check_no_op_budget, make, toy_ctx

from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.method import BackboneSpec
from lwbench.methods.dps import DPS, hard_topk_indicators, make_dps_loss, perturbed_topk, zero_one
from lwbench.registry import get_method
from lwbench.tokens import densify
from lwbench.vit import assemble, embed_patches, to_output

torch.set_num_threads(1)


def test_registered_and_budget_grid():
    cls = get_method("dps")
    assert cls is DPS and cls.budget_key == "k" and cls.training == "finetune" and cls.kind == "selection"
    _, spec = make()  # 4 x 6 = 24 patches
    assert DPS.budget_grid(spec) == [2, 3, 6]
    vit_spec = BackboneSpec("vit_base_patch14_reg4_dinov2", (224, 224), 14, 12, 768, 12, 5)
    assert DPS.budget_grid(vit_spec) == [16, 32, 64]  # 256 patches / 16, / 8, / 4
    assert DPS(spec).budget == 3


@pytest.mark.parametrize("k", [0, 25, -3])
def test_bad_k_fails_before_work(k):
    _, spec = make()
    with pytest.raises(BudgetError, match="valid: k=1..24"):
        DPS(spec, k)


def test_bad_options():
    _, spec = make()
    with pytest.raises(ConfigError, match="scorer_size"):
        DPS(spec, 4, scorer_size=0)
    with pytest.raises(ConfigError, match="num_samples"):
        DPS(spec, 4, num_samples=0)


def test_perturbed_topk_with_vanishing_sigma_is_hard_topk():
    torch.manual_seed(0)
    scores = torch.randperm(40).float().view(2, 20) / 40  # distinct, gaps of 1/40
    hard = hard_topk_indicators(scores, 5)
    assert hard.shape == (2, 5, 20) and torch.equal(hard.sum(-1), torch.ones(2, 5))
    rows = hard.argmax(-1)
    assert torch.equal(rows, scores.topk(5).indices.sort().values)  # rows sorted by position
    assert torch.equal(perturbed_topk(scores, 5, sigma=1e-7, num_samples=50), hard)
    assert torch.equal(perturbed_topk(scores, 5, sigma=0.0), hard)


def test_perturbed_topk_forward_is_a_mean_of_indicators():
    torch.manual_seed(0)
    scores = torch.rand(3, 30)
    ind = perturbed_topk(scores, 4, sigma=0.5, num_samples=64)
    assert ind.shape == (3, 4, 30) and bool((ind >= 0).all()) and bool((ind <= 1).all())
    torch.testing.assert_close(ind.sum(-1), torch.ones(3, 4))  # each selected slot is a distribution
    assert bool(((ind * 64).round() - ind * 64).abs().max() < 1e-4)  # counts over 64 samples
    assert ind.max() < 1.0  # sigma = 0.5 on [0, 1] scores: the selection is really soft


def test_diagonal_estimator_by_hand_on_two_candidates(monkeypatch):
    """N = 2 cells, k = 1, two samples, sigma = 1, scores (0.5, 0.4), noise Z1 = (0, 1) -> cell 1 wins,
    Z2 = (0.3, -0.2) -> cell 0 wins; g = (2, 3). Official (diagonal): grad_j = sum_s g[j] Y_s[j] Z_s[j] / S =
    (2 * 0.3 / 2, 3 * 1 / 2) = (0.3, 1.5). Full (Berthet): sum_s <g, Y_s> Z_s / S = (3 (0, 1) + 2 (0.3, -0.2)) / 2
    = (0.3, 1.3)."""
    fixed = torch.tensor([[[0.0, 1.0], [0.3, -0.2]]], dtype=torch.float64)
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: fixed.clone())
    g = torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)
    grads = {}
    for gradient in ("official", "full"):
        x = torch.tensor([[0.5, 0.4]], dtype=torch.float64, requires_grad=True)
        ind = perturbed_topk(x, 1, 1.0, 2, gradient=gradient)
        torch.testing.assert_close(ind, torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
        ind.backward(g)
        grads[gradient] = x.grad[0].tolist()
    assert grads["official"] == pytest.approx([0.3, 1.5]) and grads["full"] == pytest.approx([0.3, 1.3])


def test_official_gradient_is_the_pytorch_ports_einsum():
    """expected_gradient = E[Y[k, d] Z[d]] / sigma (einsum bskd,bsd->bkd), grad = sum_k g * it (bkd,bkd->bd)."""
    b, n, k, s, sigma = 2, 12, 3, 40, 0.3
    scores = torch.rand(b, n, dtype=torch.float64)
    g = torch.randn(b, k, n, dtype=torch.float64)
    x = scores.clone().requires_grad_()
    torch.manual_seed(7)
    perturbed_topk(x, k, sigma, s).backward(g)  # the default is the official estimator
    torch.manual_seed(7)
    noise = torch.randn(b, s, n, dtype=torch.float64)
    idx = (scores[:, None, :] + sigma * noise).topk(k, dim=-1).indices.sort(dim=-1).values
    one_hot = torch.nn.functional.one_hot(idx, n).to(torch.float64)  # (b, s, k, n)
    expected = torch.einsum("bskd,bsd->bkd", one_hot, noise) / s / sigma
    torch.testing.assert_close(x.grad, torch.einsum("bkd,bkd->bd", g, expected))


def test_full_gradient_option_is_berthets_dense_estimator():
    """gradient=full: J^T g with J = E[Y Z^T] / sigma, the whole vector-Jacobian product (lwbench version 1)."""
    b, n, k, s, sigma = 2, 12, 3, 40, 0.3
    scores = torch.rand(b, n, dtype=torch.float64)
    g = torch.randn(b, k, n, dtype=torch.float64)
    x = scores.clone().requires_grad_()
    torch.manual_seed(7)
    ind = perturbed_topk(x, k, sigma, s, gradient="full")
    ind.backward(g)
    torch.manual_seed(7)
    noise = torch.randn(b, s, n, dtype=torch.float64)  # the same draw as inside the op
    idx = (scores[:, None, :] + sigma * noise).topk(k, dim=-1).indices.sort(dim=-1).values
    one_hot = torch.nn.functional.one_hot(idx, n).to(torch.float64)  # (b, s, k, n)
    torch.testing.assert_close(ind.detach(), one_hot.mean(1))
    expected = torch.einsum("bskd,bse->bkde", one_hot, noise) / s / sigma
    torch.testing.assert_close(x.grad, torch.einsum("bkd,bkde->be", g, expected))
    assert x.grad.abs().max() > 0


def test_scorer_input_is_a_multiple_of_the_grid_so_pooling_windows_are_disjoint_and_untied():
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 8 x 12 grid
    enc = DPS(spec, 5, scorer_size=0.3).build(vit).eval()
    size = enc.scorer.input_size((64, 96), (8, 12))
    assert size == (24, 36)  # 0.3 x (64, 96) = (19, 29), rounded up to multiples of (8, 12)
    assert enc.scorer.input_size((240, 320), (15, 20)) == (75, 100)  # 72x96 -> 75x100: 5x5 windows
    torch.manual_seed(0)
    with torch.no_grad():
        raw = enc.scorer(torch.randn(4, 3, 64, 96), (8, 12))
        fmap = enc.scorer.net(torch.nn.functional.interpolate(torch.randn(1, 3, 64, 96), size=size))
    assert raw.shape == (4, 96)
    assert all(row.unique().numel() == 96 for row in raw)  # no two cells share a maximum
    # each cell's score is the max of its own 3x3 window of the scorer map, nothing from its neighbours
    windows = fmap[0, 0].unfold(0, 3, 3).unfold(1, 3, 3)  # (8, 12, 3, 3)
    torch.testing.assert_close(windows.amax((-1, -2)).flatten(),
                               torch.nn.functional.max_pool2d(fmap, 3, 3).flatten())


def test_zero_one_normalisation():
    s = torch.tensor([[2.0, 4.0, 3.0]])
    torch.testing.assert_close(zero_one(s), torch.tensor([[0.0, 2.0, 1.0]]) / (2.0 + 1e-5))


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_k_equal_to_grid_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: DPS(spec, spec.num_patches), name, size)


def test_inference_is_hard_topk_of_the_scorer_on_selected_patches_only():
    vit, spec = make()
    enc = DPS(spec, 5).build(vit).eval()
    x = torch.randn(2, 3, 32, 48)
    assert enc.scorer.input_size((32, 48), (4, 6)) == (8, 12)  # 1/4 of the high-res size
    with torch.no_grad():
        out = enc(x)
        raw = enc.scorer(x, (4, 6))
        idx = raw.topk(5).indices.sort().values
        ref = to_output(enc.vit, enc.vit.blocks(assemble(enc.vit, embed_patches(enc.vit, x, idx))), idx, (4, 6))
    assert out.patches.shape == (2, 5, 32) and torch.equal(out.positions, idx)
    torch.testing.assert_close(out.patches, ref.patches)
    torch.testing.assert_close(out.prefix, ref.prefix)
    dense = densify(out)
    torch.testing.assert_close(dense.gather(1, idx.unsqueeze(-1).expand(-1, -1, 32)), out.patches)


def test_training_is_soft_and_trains_the_scorer():
    vit, spec = make()
    enc = DPS(spec, 5, sigma=0.2).build(vit).train()
    x = torch.randn(2, 3, 32, 48)
    out = enc(x)
    ind = out.aux["indicators"]
    assert ind.shape == (2, 5, 24) and torch.equal(out.positions, ind.argmax(-1))
    out.cls.pow(2).sum().backward()
    grads = [p.grad for p in enc.scorer.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_sigma_decays_linearly_to_zero_and_is_checkpointed():
    vit, spec = make()
    enc = DPS(spec, 5).build(vit).train()  # sigma 0.05
    enc.total_steps = 4
    x = torch.randn(1, 3, 32, 48)
    sigmas = [enc(x).aux["sigma"] for _ in range(5)]
    assert sigmas == pytest.approx([0.05, 0.0375, 0.025, 0.0125, 0.0])
    assert int(enc.state_dict()["step"]) == 5


def test_loss_adds_the_entropy_regulariser():
    vit, spec = make()
    head = ClassifierHead(32, 2)
    model = TaskModel(DPS(spec, 5).build(vit), head).train()
    x, y = torch.randn(2, 3, 32, 48), torch.tensor([0, 1])
    torch.manual_seed(3)
    loss, logs = make_dps_loss(-0.01)(model, x, y)
    ce, ent = float(logs["ce"]), float(logs["entropy"])  # loss parts: 0-dim tensors (train_loop reads them)
    assert float(loss.detach()) == pytest.approx(ce - 0.01 * ent, rel=1e-6)
    assert 0 < ent <= torch.log(torch.tensor(24.0)).item() + 1e-6


def test_fit_smoke_trains_and_checkpoints(tmp_path):
    vit, spec = make()
    ctx = toy_ctx(vit, tmp_path, steps=2)
    method = DPS(spec, 5)
    model = method.fit(ctx)
    assert isinstance(model, TaskModel) and not model.training
    assert (tmp_path / "dps-5" / "done.json").is_file()
    assert model.encoder.total_steps == 2 and int(model.encoder.step) == 2
    assert not torch.equal(model.encoder.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        logits = model(x)
        again = method.fit(ctx)(x)  # resumes from the finished checkpoint
    assert logits.shape == (2, 2)
    torch.testing.assert_close(again, logits)
