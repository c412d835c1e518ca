"""ATS: inverse transform sampling on hand-made distributions, the significance score, exactness at
keep_rate=1, padding and masks for variable token counts, batch independence and budgets."""

from __future__ import annotations

import copy

import pytest
import torch

from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError, ConfigError
from lwbench.method import BackboneSpec
from lwbench.methods._reduction import embed, split_qkv
from lwbench.methods.ats import (
    ATS,
    SOFTMAX_EPS,
    TokenSampler,
    inverse_transform_sample,
    samples_per_image,
    smoothed_cls_attention,
)
from lwbench.registry import get_method
from lwbench.tokens import densify


def _picked(scores, k, valid=None):
    scores = torch.tensor([scores])
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else torch.tensor([valid])
    chosen = inverse_transform_sample(scores, valid, torch.tensor([k]))
    return chosen[0].nonzero().flatten().tolist()


def test_inverse_transform_sampling_hand_made():
    # Sorted ascending: t1 (0.1), t3 (0.1), t2 (0.2), t0 (0.6): CDF 0.1 0.2 0.4 1.0, normalised 0 .111 .333 1.
    s = [0.6, 0.1, 0.2, 0.1]
    # K=4: y = .111 .407 .704 1 -> t3, t2, t0, t0 (a duplicate, kept once); t1 (lowest CDF) is never drawn.
    assert _picked(s, 4) == [0, 2, 3]
    assert _picked(s, 2) == [0, 3]  # y = .111, 1
    assert _picked(s, 1) == [0]  # y = 1: the most significant token
    assert _picked(s, 100) == [0, 2, 3]  # more samples cannot add a token below the first y


def test_sampling_ignores_padding():
    s = [0.6, 0.1, 0.9, 0.2, 0.1]  # token 2 is padding: whatever its score, never drawn, never counted
    valid = [True, True, False, True, True]
    assert _picked(s, 4, valid) == [0, 3, 4]
    assert _picked(s, 2, valid) == [0, 4]


def test_peaked_distribution_keeps_fewer_tokens_than_samples():
    s = [0.01] * 9 + [0.91]  # one token carries most of the mass
    picked = _picked(s, 10)
    assert 9 in picked and len(picked) < 10


def test_samples_per_image():
    assert samples_per_image(0.5, torch.tensor([35, 10, 1])).tolist() == [18, 5, 1]
    assert samples_per_image(0.01, torch.tensor([35])).tolist() == [1]


def test_significance_score(case):
    """S_j = a_cls,j * ||v_j|| / sum, a summed over heads, v over all heads, patch tokens only."""
    vit, spec, size = case
    blk, p = vit.blocks[0], spec.num_prefix
    with torch.no_grad():
        h = embed(vit, torch.randn(2, 3, *size))
        q, k, v = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(h)))
        logits = q @ k.transpose(-1, -2) * blk.attn.scale
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        full = (e + SOFTMAX_EPS / e.shape[-1]) / (e.sum(-1, keepdim=True) + SOFTMAX_EPS)  # official eps softmax
        a = full[:, :, 0].sum(1)[:, p:]
        vn = torch.stack([v[:, :, j].flatten(1).norm(dim=1) for j in range(v.shape[2])], 1)[:, p:]
        expect = a * vn / (a * vn).sum(1, keepdim=True)
        valid = torch.ones(2, spec.num_patches, dtype=torch.bool)
        got = TokenSampler(blk.attn.scale, p, 0.5).significance(q, k, v, valid, None)
    assert torch.allclose(got, expect, atol=1e-6)


def test_eps_smoothed_softmax_by_hand():
    """One head, keys with logits (0, ln 2, -60) and eps = 1e-6, N = 3: e = (1/2, 1, e^-60.69), so the row is
    ((1/2 + eps/3) / (3/2 + eps), (1 + eps/3) / (3/2 + eps), (~0 + eps/3) / (3/2 + eps)): the near-zero key is
    lifted to ~2.2e-7 instead of 1e-26. A padded key (bias -inf) is not counted in N."""
    import math

    q = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.tensor([0.0, math.log(2), -60.0], dtype=torch.float64).view(1, 1, 3, 1)
    got = smoothed_cls_attention(q, k, 1.0, None)[0, 0]
    eps, z = SOFTMAX_EPS, 1.5 + SOFTMAX_EPS
    e3 = math.exp(-60.0 - math.log(2))
    expected = torch.tensor([(0.5 + eps / 3) / z, (1 + eps / 3) / z, (e3 + eps / 3) / z], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert got[2] > 2e-7 and (k.view(3).softmax(0)[2] < 1e-25)
    bias = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64)  # third key is padding
    padded = smoothed_cls_attention(q, k, 1.0, bias)[0, 0]
    torch.testing.assert_close(padded[:2], torch.tensor([(0.5 + eps / 2) / z, (1 + eps / 2) / z],
                                                        dtype=torch.float64))


def _reference_inverse_cdf(scores: list[float], n_samples: int) -> list[int]:
    """Inverse transform sampling written plainly, as in the ATS paper: sort ascending, normalised CDF F,
    n_samples evenly spaced y from the smallest positive F to 1, each y takes the token of the nearest F (the
    first on ties), duplicates once."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    cdf, acc = [], 0.0
    for i in order:
        acc += scores[i]
        cdf.append(acc)
    lo, hi = min(cdf), max(cdf)
    f = [(c - lo) / (hi - lo) for c in cdf]
    y0 = min(v for v in f if v > 0)
    ys = [y0 + (1 - y0) * j / (n_samples - 1) for j in range(n_samples)]
    picked = {order[min(range(len(f)), key=lambda t: (abs(f[t] - y), t))] for y in ys}
    return sorted(picked)


def test_published_setting_draws_as_many_samples_as_initial_patches(monkeypatch):
    """samples=initial: at a later stage with 6 tokens left of N0 = 10, K = 10 samples (not ceil(rate * 6)),
    and the kept tokens are those of the reference inverse-CDF sampling with 10 samples."""
    scores = [0.30, 0.02, 0.05, 0.25, 0.01, 0.37]
    sampler = TokenSampler(1.0, 1, 1.0, samples="initial")
    monkeypatch.setattr(sampler, "significance", lambda *a: torch.tensor([scores]))
    x = torch.randn(1, 6, 4)
    positions = torch.tensor([[3, 5, 8, 9, 12, 14]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    _, pos, new_valid = sampler(x, None, None, None, positions, valid, None, n0=10)
    ref = _reference_inverse_cdf(scores, 10)
    assert pos[new_valid].tolist() == positions[0, ref].tolist()
    assert len(ref) < 6  # duplicates dropped: the count adapts, it is not a budget
    # lwbench's generalisation at keep_rate=1 keeps them all (K = ceil(1 x 6) >= 6): the plain model
    current = TokenSampler(1.0, 1, 1.0, samples="current")
    monkeypatch.setattr(current, "significance", lambda *a: torch.tensor([scores]))
    assert current(x, None, None, None, positions, valid, None, n0=10)[2].all()


def test_published_stages_and_sampling_on_a_peaked_model():
    vit = _peaked(create_backbone("lw_vit_test_p14", (70, 98)).eval())
    spec = BackboneSpec.of(vit, "lw_vit_test_p14", (70, 98))
    m = get_method("ats")(spec, 1.0, stages="published", samples="initial")
    assert m.sampling_stages() == list(range(round(spec.depth / 4), spec.depth))
    with torch.no_grad():
        out = m.build(vit).eval()(torch.randn(2, 3, 70, 98))
    kept = out.aux["tokens_per_layer"]
    assert int(kept[:, -1].max()) < spec.num_patches  # ATS as published samples even at keep_rate 1
    d12 = BackboneSpec("deit_small_patch16_224", (224, 224), patch=16, depth=12, embed_dim=384, num_heads=6,
                       num_prefix=1)
    published = get_method("ats")(d12, 1.0, stages="published")
    assert published.sampling_stages() == list(range(3, 12))  # official DeiT-S 3-11


def test_keep_rate_1_is_the_plain_backbone(case):
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = get_method("ats")(spec, 1.0).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert out.mask.all() and out.aux["tokens_per_layer"].tolist() == [[spec.num_patches] * spec.depth] * 2


def _peaked(vit):
    """A copy whose CLS attention is sharp (a non-zero CLS token, q and k scaled up), so sampling draws
    duplicates as with a trained ViT; at random init the CLS query is ~0 and attention is uniform."""
    vit = copy.deepcopy(vit)
    d = vit.embed_dim
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vit.cls_token.copy_(torch.randn(vit.cls_token.shape, generator=gen))
        for blk in vit.blocks:
            blk.attn.qkv.weight[: 2 * d] *= 10.0
    return vit


def test_variable_counts_masks_and_positions():
    vit = _peaked(create_backbone("lw_vit_test_p14", (70, 98)).eval())  # 3 blocks: stages 1, 2
    spec = BackboneSpec.of(vit, "lw_vit_test_p14", (70, 98))
    torch.manual_seed(3)
    x = torch.randn(4, 3, 70, 98)
    with torch.no_grad():
        out = ATS(spec, 0.7).build(vit).eval()(x)
    tpl = out.aux["tokens_per_layer"]
    counts = out.mask.sum(1)
    assert torch.equal(tpl[:, -1], counts) and torch.equal(out.realised_tokens(), counts)
    assert out.patches.shape[1] == int(counts.max())
    assert (tpl[:, 0] == 35).all()
    assert (tpl[:, 1] <= 25).all() and (tpl[:, 2] <= torch.ceil(0.7 * tpl[:, 1])).all()  # at most K per stage
    assert len(set(counts.tolist())) > 1  # adaptive: images keep different numbers of tokens
    for b in range(4):
        real = out.positions[b, out.mask[b]]
        assert (real >= 0).all() and (real.diff() > 0).all()  # distinct grid cells, in grid order
        assert (out.positions[b, ~out.mask[b]] == -1).all() and (out.patches[b, ~out.mask[b]] == 0).all()
    assert densify(out).shape == (4, 35, vit.embed_dim)


def test_an_image_does_not_depend_on_its_batch():
    vit = _peaked(create_backbone("lw_vit_test_p14", (70, 98)).eval())
    spec = BackboneSpec.of(vit, "lw_vit_test_p14", (70, 98))
    enc = ATS(spec, 0.6).build(vit).eval()
    torch.manual_seed(4)
    x = torch.randn(3, 3, 70, 98)
    with torch.no_grad():
        together = enc(x)
        for b in range(3):
            alone = enc(x[b : b + 1])
            m = int(alone.mask.sum())
            assert int(together.mask[b].sum()) == m
            assert torch.equal(together.positions[b, :m], alone.positions[0, :m])
            assert torch.allclose(together.patches[b, :m], alone.patches[0, :m], atol=1e-5)
            assert torch.allclose(together.prefix[b], alone.prefix[0], atol=1e-5)


def test_tokens_decrease_as_budget_tightens(case):
    vit, spec, size = case
    vit = _peaked(vit)
    torch.manual_seed(5)
    x = torch.randn(2, 3, *size)
    kept = []
    for kr in (0.9, 0.5, 0.2):
        with torch.no_grad():
            out = ATS(spec, kr).build(vit).eval()(x)
        kept.append(out.aux["tokens_per_layer"].float().mean().item())
    assert kept[0] > kept[1] > kept[2]


def test_budget_and_option_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)
    for bad in (0.0, 1.01, -1.0):
        with pytest.raises(BudgetError, match=r"valid: keep_rate in \(0, 1\]"):
            ATS(spec, bad)
    with pytest.raises(ConfigError, match="stages"):
        ATS(spec, 0.5, stages=[5])
    assert ATS(spec, 0.5, stages=[0]).sampling_stages() == [0]
    assert ATS.variable_length and ATS.kind == "reduction"


def test_sampling_cost_is_counted_as_overhead():
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.measure.flops import count_macs

    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    full = count_macs(TaskModel(ATS(spec, 1.0).build(vit), ClassifierHead(32, 3)), x)
    enc = ATS(spec, 0.5).build(vit)
    ats = count_macs(TaskModel(enc, ClassifierHead(32, 3)), x)
    kept = int(enc(x).mask.sum())
    assert full.parts["overhead"] == 0 and ats.parts["overhead"] == 2 * 40 * 16  # the CLS row at block 1
    assert full.parts["backbone"] - ats.parts["backbone"] == (35 - kept) * 2 * 32 * 64  # MLP of the dropped tokens
