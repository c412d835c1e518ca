"""DTEM: the soft top-r and the soft merge by hand (the paper's relaxation as the official code computes it), its hard
limit is ToMe's merge, the decoupled embedding set to the keys is ToMe exactly, the modular stage trains the
embeddings alone, prefix tokens are never merged, the assignment covers every cell, r=0 is the plain backbone."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import BACKBONE_CASES, check_no_op_budget, make, toy_ctx

from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.measure.flops import count_macs
from lwbench.methods.dtem import DTEM, EPS, DecoupledMerger, default_feat_dim, relaxed_size_bias, soft_top_r
from lwbench.methods.tome import BipartiteMatcher, ToMe
from lwbench.registry import get_method

torch.set_num_threads(1)


# -- the relaxation by hand -------------------------------------------------------------------------------------
def test_soft_top_r_one_round_is_a_softmax_over_all_edges():
    """r = 1, k2 = |B|: one softmax over every (A, B) edge at temperature tau1 * tau2."""
    s = torch.tensor([[[0.9, 0.1], [0.5, 0.7]]])
    got = soft_top_r(s, 1, k2=2, tau1=0.5, tau2=0.4)
    e = [math.exp(v / 0.2) for v in (0.9, 0.1, 0.5, 0.7)]
    want = torch.tensor([[[e[0], e[1]], [e[2], e[3]]]]) / sum(e)
    torch.testing.assert_close(got, want)


def test_soft_top_r_two_rounds_by_hand():
    """r = 2: the second softmax sees each row shifted by log(max(1 - its first-round mass, eps)); a row whose
    total exceeds 1 is divided by it. k2 = 1 keeps each A token's best B only."""
    s = torch.tensor([[[0.9, 0.2], [0.3, 0.8], [0.1, 0.6]]])
    t1, t2 = 0.5, 1.0
    z = (s / t1)[0]
    p1 = (z.flatten() / t2).softmax(0).reshape(3, 2)
    z2 = z + torch.log((1 - p1.sum(1, keepdim=True)).clamp(min=EPS))
    p2 = (z2.flatten() / t2).softmax(0).reshape(3, 2)
    khot = (p1 + p2) / (torch.clamp((p1 + p2).sum(1, keepdim=True) - 1, min=0) + 1)  # rows below 1 unchanged
    torch.testing.assert_close(soft_top_r(s, 2, k2=2, tau1=t1, tau2=t2)[0], khot)
    assert bool((soft_top_r(s, 2, k2=2, tau1=t1, tau2=t2).sum(-1) <= 1 + 1e-6).all())
    # k2 = 1: only the argmax column of each row carries mass
    one = soft_top_r(s, 2, k2=1, tau1=t1, tau2=t2)[0]
    assert one[0, 1] == 0 and one[1, 0] == 0 and one[2, 0] == 0 and bool((one.sum(1) > 0).all())


def _identity_merger(dim: int, a_offset: int = 0, tau2: float = 0.1) -> DecoupledMerger:
    m = DecoupledMerger(a_offset, 0, dim, dim, k2=3, tau1=0.1, tau2=tau2)
    with torch.no_grad():
        m.embed.weight.copy_(torch.eye(dim))
        m.embed.bias.zero_()
    return m


def test_soft_merge_by_hand():
    """Four tokens, A = {0, 2}, B = {1, 3}: x_b <- (s_b x_b + M^T s_a x_a) / (s_b + M^T s_a), s_a <- s_a (1 - rowsum M),
    x_a unchanged; the r = 1 least-size tokens move behind [surviving A, surviving B]."""
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0]]])
    pos = torch.tensor([[10, 11, 12, 13]])
    m = _identity_merger(2, tau2=0.5)
    mz = torch.nn.functional.normalize(z, dim=-1)
    M = soft_top_r(mz[:, 0::2] @ mz[:, 1::2].transpose(-1, -2), 1, 3, 0.1, 0.5)[0]  # (A, B) = (2, 2)
    sb = torch.tensor([2.0, 1.0]) + M.T @ torch.tensor([1.0, 1.0])
    xb = (torch.tensor([2.0 * 3.0, 1.0 * 7.0]) + M.T @ torch.tensor([1.0, 5.0])) / sb
    sa = 1.0 - M.sum(1)
    new_x, new_size, new_pos = m.soft(x, z, size, pos, 1)
    drop = int(torch.tensor([sa[0], sb[0], sa[1], sb[1]]).argmin())  # the token of least size
    assert drop in (0, 2)  # an A token: B tokens only gain size
    keep_a = 2 - drop  # the other A token
    want_x = [x[0, keep_a, 0], xb[0], xb[1], x[0, drop, 0]]
    want_s = [sa[keep_a // 2], sb[0], sb[1], sa[drop // 2]]
    torch.testing.assert_close(new_x.flatten(), torch.stack(want_x))
    torch.testing.assert_close(new_size.flatten(), torch.stack(want_s))
    assert new_pos.tolist() == [[10 + keep_a, 11, 13, 10 + drop]]
    torch.testing.assert_close(new_size.sum(), size.sum())  # cells are neither lost nor created


@pytest.mark.parametrize("a_offset", [0, 1])
def test_soft_merge_approaches_hard_tome_merge_as_the_temperature_goes_to_0(a_offset):
    torch.manual_seed(0)
    bsz, t, d, r = 2, 11, 8, 4
    z, x = torch.randn(bsz, t, d), torch.randn(bsz, t, 5)
    size = torch.randint(1, 4, (bsz, t, 1)).float()
    pos = torch.arange(t).expand(bsz, t).contiguous()
    hard_x, hard_s, hard_p, _ = BipartiteMatcher(a_offset)(x, z, size, pos, pos.clone(), r)
    errs = []
    for tau2 in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        sx, ss, sp = _identity_merger(d, a_offset, tau2).soft(x, z, size, pos, r)
        errs.append(float((sx[:, : t - r] - hard_x).abs().max().detach()))
        if tau2 <= 1e-3:
            assert torch.equal(sp[:, : t - r], hard_p)  # the same survivors, in ToMe's order
            torch.testing.assert_close(ss[:, : t - r], hard_s)
            assert float(ss[:, t - r:].max().detach()) < 1e-5  # the merged-away tokens have (almost) no size left
    assert errs[-1] < 1e-5 and errs[0] > 1e-2, errs
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:], strict=False)), errs


def test_relaxed_size_bias_keeps_the_official_gradient():
    """d/ds of softmax(l + log s) equals d/ds of the official exp(l) s / sum exp(l) s, also at s = 0 (to O(1e-6))."""
    logits = torch.tensor([0.3, -0.2, 0.5, 0.1])
    size = torch.tensor([[[1.5], [0.0], [0.7]]], requires_grad=True)
    ours = (logits + relaxed_size_bias(size, 1).flatten()).softmax(0)
    ref_size = size.detach().clone().requires_grad_(True)
    w = torch.cat([torch.ones(1), ref_size.flatten()]) * logits.exp()
    ref = w / w.sum()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.isfinite(size.grad).all()
    torch.testing.assert_close(size.grad, ref_size.grad, atol=1e-4, rtol=1e-4)


# -- against ToMe ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_embedding_set_to_the_keys_is_tome_exactly(name, size):
    vit, spec = make(name, size)
    r = max(1, spec.num_patches // (3 * spec.depth))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = DTEM(spec, r, init="keys").build(vit).eval()(x)
        tome = ToMe(spec, r).build(vit).eval()(x)
    assert torch.equal(ours.assignment, tome.assignment) and torch.equal(ours.positions, tome.positions)
    assert torch.equal(ours.sizes, tome.sizes)
    torch.testing.assert_close(ours.patches, tome.patches, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.prefix, tome.prefix, atol=1e-5, rtol=0)


def test_random_embedding_merges_differently_from_tome():
    vit, spec = make("lw_vit_test_p8", (64, 96))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = DTEM(spec, 8).build(vit).eval()(x)
        tome = ToMe(spec, 8).build(vit).eval()(x)
    assert ours.patches.shape == tome.patches.shape and not torch.equal(ours.assignment, tome.assignment)


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_relaxed_forward_approaches_the_inference_model(name, size):
    """The whole training forward at tau2 -> 0: its active tokens are the hard (inference) model's, to O(1e-6)
    (merged-away keys keep a weight of 1e-6 in the relaxed proportional attention)."""
    vit, spec = make(name, size)
    r = max(1, spec.num_patches // (3 * spec.depth))
    enc = DTEM(spec, r, init="keys", tau2=1e-4).build(vit)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        hard = enc.eval()(x)
        soft = enc.train()(x)
    n = hard.patches.shape[1]
    assert soft.mask[:, :n].all() and not soft.mask[:, n:].any()
    assert torch.equal(soft.positions[:, :n], hard.positions)
    torch.testing.assert_close(soft.sizes[:, :n], hard.sizes.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(soft.patches[:, :n], hard.patches, atol=1e-3, rtol=0)
    torch.testing.assert_close(soft.prefix, hard.prefix, atol=1e-3, rtol=0)
    assert soft.aux["tokens_per_layer"].tolist() == hard.aux["tokens_per_layer"].tolist()


# -- invariants --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_r0_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: DTEM(spec, 0), name, size)
    vit, spec = make(name, size)
    x = torch.randn(2, 3, *size)
    enc = DTEM(spec, 0).build(vit)
    with torch.no_grad():
        ref = vit.forward_features(x)
        for mode in (False, True):  # the inference and the relaxed training forward
            out = enc.train(mode)(x)
            assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_prefix_never_merged_and_every_cell_is_accounted_for(name, size, training):
    """CLS and registers: never embedded, matched or merged, so they are the first P tokens, and the patch tokens
    alone hold every cell (sizes add up to the grid; in training, soft sizes do)."""
    vit, spec = make(name, size)
    r = spec.num_patches // (2 * spec.depth)
    enc = DTEM(spec, r, tau2=1.0).build(vit).train(training)
    with torch.no_grad():
        out = enc(torch.randn(2, 3, *size))
    assert out.prefix.shape[1] == spec.num_prefix
    n = spec.num_patches
    torch.testing.assert_close(out.sizes.float().sum(1), torch.full((2,), float(n)))
    if training:
        assert out.patches.shape[1] == n and sorted(out.positions[0].tolist()) == list(range(n))
    else:
        assert out.patches.shape[1] == n - r * spec.depth


def test_the_modules_embed_patch_tokens_only():
    """A prefix token is never a merge candidate: each block's module sees that block's patch tokens, never the
    CLS and register rows (5 on the tiny model)."""
    vit, spec = make()
    enc = DTEM(spec, 3).build(vit).eval()
    seen = []
    for m in enc.matchers:
        m.embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        enc(torch.randn(1, 3, 32, 48))
    n = spec.num_patches
    assert seen == [n, n - 3]  # the patch tokens of each block, never the 5 prefix tokens


def test_assignment_covers_every_cell():
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 96 patches
    with torch.no_grad():
        out = DTEM(spec, 12).build(vit).eval()(torch.randn(2, 3, 64, 96))
    m = out.patches.shape[1]
    assert m == 96 - 12 * spec.depth
    a = out.assignment
    assert a.shape == (2, 96) and int(a.min()) >= 0 and int(a.max()) < m
    for b in range(2):
        assert set(a[b].tolist()) == set(range(m))  # every token covers at least one cell, every cell a token
        assert torch.equal(a[b].gather(0, out.positions[b]), torch.arange(m))  # a token's own cell is its own
    assert torch.equal(out.sizes, torch.stack([torch.bincount(a[b], minlength=m) for b in range(2)]))


# -- training ----------------------------------------------------------------------------------------------------
def test_embedding_stage_changes_only_the_embedding_modules(tmp_path):
    vit, spec = make()
    ctx = toy_ctx(vit, tmp_path, steps=3)
    method = DTEM(spec, 4, finetune={"steps": 0}, embed={"lr": 1e-2})
    torch.manual_seed(7)
    before = method.build(vit)
    torch.manual_seed(7)
    model = method.fit(ctx)
    assert not model.training and (tmp_path / "dtem-embed-r=4" / "done.json").is_file()
    for k, v in vit.state_dict().items():
        assert torch.equal(model.encoder.vit.state_dict()[k], v), k  # the backbone is bit-identical
    for k, v in ctx.teacher.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[k], v), k  # and the head
    moved = [not torch.equal(a, b) for a, b in zip(model.encoder.embeddings(), before.embeddings(), strict=True)]
    # block 0's weight and bias trained; the last block merges after its attention, so a CLS head (the toy task's)
    # cannot feel it: its bias gets a zero gradient, as officially, and only weight decay touches its weight
    assert moved == [True, True, True, False]
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        logits = model(x)
        again = method.fit(ctx)(x)  # a rerun resumes from the finished stage
    torch.testing.assert_close(again, logits)


def test_finetuned_regime_then_trains_everything(tmp_path):
    vit, spec = make()
    ctx = toy_ctx(vit, tmp_path, steps=2)
    model = DTEM(spec, 4).fit(ctx)
    assert (tmp_path / "dtem-embed-r=4" / "done.json").is_file()
    assert (tmp_path / "dtem-r=4-finetune" / "done.json").is_file()
    assert not torch.equal(model.encoder.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_relaxed_training_gradient_reaches_the_modules_through_the_soft_merge():
    """The module's input is detached (official), so its gradient comes through the soft merge alone; the last
    block merges after its attention, where a CLS output cannot feel it (zero gradient, as officially)."""
    vit, spec = make()
    enc = DTEM(spec, 4).build(vit).train()
    enc.requires_grad_(False)
    for q in enc.embeddings():
        q.requires_grad_(True)
    out = enc(torch.randn(2, 3, 32, 48))
    (out.prefix[:, 0] * torch.randn(out.prefix.shape[-1])).sum().backward()  # a plain sum of a LayerNorm is constant
    first, last = enc.matchers[0].embed, enc.matchers[-1].embed
    assert all(torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0 for q in first.parameters())
    assert all(q.grad is None or not q.grad.any() for q in last.parameters())
    assert all(q.grad is None for q in enc.vit.parameters())


# -- metadata, budgets, cost -------------------------------------------------------------------------------------
def test_registered_with_tomes_budget_and_official_defaults():
    cls = get_method("dtem")
    _, spec = make()
    assert cls is DTEM and cls.budget_key == "r" and cls.training == "pretrain+finetune"
    assert DTEM.budget_grid(spec) == ToMe.budget_grid(spec)
    o = DTEM(spec, 2).opts
    assert (o.k2, o.tau1, o.tau2, o.init) == (3, 0.1, 0.1, "random")
    assert default_feat_dim(384, 6) == 64 and default_feat_dim(1024, 16) == 128  # head dim, 2x from 1024 on
    assert DTEM.stage_names() == ["embed", "finetune"]


def test_bad_budgets_fail_before_any_work():
    _, spec = make()  # 24 patches
    with pytest.raises(BudgetError, match=r"r=0\.\.12"):
        DTEM(spec, 13)
    with pytest.raises(BudgetError, match="train_r"):
        DTEM(spec, 4, train_r=13)
    with pytest.raises(ConfigError, match="head dimension"):
        DTEM(spec, 4, init="keys", feat_dim=7)


def test_embedding_and_matching_are_counted_as_overhead():
    """Overhead = per merging block, the module on every patch token (T D F) plus the A x B scores (Ta Tb F)."""
    vit, spec = make("lw_vit_test_p8", (64, 96))  # 96 patches, 2 blocks, 32 wide
    r, f = 8, default_feat_dim(spec.embed_dim, spec.num_heads)
    model = TaskModel(DTEM(spec, r).build(vit), ClassifierHead(spec.embed_dim, 2)).eval()
    macs = count_macs(model, torch.randn(1, 3, 64, 96))
    assert macs.counter == "fvcore" and macs.parts == pytest.approx(count_macs(model, torch.randn(1, 3, 64, 96),
                                                                               counter="torch").parts, rel=1e-9)
    want, t = 0, spec.num_patches
    for _ in range(spec.depth):
        want += t * spec.embed_dim * f + (t // 2) * (t - t // 2) * f
        t -= r
    assert macs.parts["overhead"] == pytest.approx(want, rel=1e-9)
