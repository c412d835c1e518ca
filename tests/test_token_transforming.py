"""Token Transforming: the transform on hand-made tokens, a known-answer comparison with a naive loop re-implementation
of the algorithm the method file states (the official repository has no code to compare with), exactness at r=0,
token counts per block, source tracking, overhead accounting and budgets."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import cls_only_vit

from lwbench.errors import BudgetError, ConfigError
from lwbench.method import BackboneSpec
from lwbench.methods.token_transforming import TokenTransforming, TransformMatrix
from lwbench.methods.tome import ToMe
from lwbench.registry import get_method
from lwbench.tokens import densify


def _transform(x, q_row, metric, r, k=2, tau=0.1, size=None):
    """Run :class:`TransformMatrix` with a chosen CLS attention: one head, a CLS query of ones and keys whose dot
    product with it is ``q_row`` (log-attention), so the targets are the tokens with the largest ``q_row``."""
    b, n, _ = x.shape
    d = 1
    q = torch.ones(b, 1, n + 1, d)
    key = torch.cat([torch.zeros(b, 1, 1, d), q_row.reshape(b, 1, n, 1)], dim=2)
    pos = torch.arange(n).expand(b, -1).clone()
    size = torch.ones(b, n, 1) if size is None else size
    return TransformMatrix(1.0, 1, k, tau)(x, q, key, metric, None, size, pos, pos.clone(), r)


def test_k1_merges_each_removed_token_into_its_nearest_target():
    # targets: tokens 0 and 2 (largest CLS attention). Token 1 points like token 2, token 3 like token 0.
    metric = torch.tensor([[[1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [1.0, 0.2]]])
    x = torch.tensor([[[1.0], [2.0], [4.0], [7.0]]])
    new_x, size, pos, assign = _transform(x, torch.tensor([[3.0, 0.0, 2.0, 1.0]]), metric, r=2, k=1)
    assert new_x.flatten().tolist() == [4.0, 3.0]  # (1 + 7) / 2 and (4 + 2) / 2
    assert size.flatten().tolist() == [2.0, 2.0] and pos.tolist() == [[0, 2]]
    assert assign.tolist() == [[0, 1, 1, 0]]


def test_many_to_many_weights_are_a_softmax_over_the_k_targets():
    # One removed token (3) between targets 0 and 1 (cos 0.8 and 0.6); target 2 is orthogonal and not in its top 2.
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.8, 0.6, 0.0]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0]]])
    tau = 0.5
    new_x, new_size, _, assign = _transform(x, torch.tensor([[3.0, 2.0, 1.0, 0.0]]), metric, r=1, k=2, tau=tau,
                                            size=size)
    e0, e1 = math.exp(0.8 / tau), math.exp(0.6 / tau)
    w0, w1 = e0 / (e0 + e1), e1 / (e0 + e1)
    exp_size = [1 + 3 * w0, 2 + 3 * w1, 1.0]
    exp_x = [(1 + 30 * w0) / exp_size[0], (2 * 2 + 30 * w1) / exp_size[1], 3.0]
    assert torch.allclose(new_size.flatten(), torch.tensor(exp_size), atol=1e-6)
    assert torch.allclose(new_x.flatten(), torch.tensor(exp_x), atol=1e-6)
    assert math.isclose(new_size.sum().item(), size.sum().item(), rel_tol=1e-6)  # mass conserved
    assert assign.tolist() == [[0, 1, 2, 0]]  # the removed token's cell follows its largest weight


def _reference(vit, x, r, k, tau, p):
    """The algorithm of ``methods/token_transforming.py`` written out naively, one image at a time: explicit attention
    with the log-size bias, the CLS row averaged over heads, targets by sorting, each removed token's k nearest
    targets and their softmax weights with Python loops, the size-weighted sums in dictionaries."""
    outs, sizes_out = [], []
    for img in x:
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))[0]  # (T, C)
        size = [1.0] * (h.shape[0] - p)
        for blk in vit.blocks:
            a = blk.attn
            t, c = h.shape
            hn = blk.norm1(h)
            q, kk, v = a.qkv(hn).reshape(t, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
            q, kk = a.q_norm(q), a.k_norm(kk)
            bias = torch.tensor([0.0] * p + [math.log(s) for s in size])
            logits = q @ kk.transpose(-1, -2) * a.scale + bias[None, None, :]
            att = logits.softmax(-1)
            h = h + blk.ls1(a.proj((att @ v).transpose(0, 1).reshape(t, c)))
            n = t - p
            rr = min(r, n // 2)
            if rr > 0:
                row = [float(att[:, 0, p + j].mean()) for j in range(n)]
                order = sorted(range(n), key=lambda j: -row[j])
                targets, removed = sorted(order[: n - rr]), sorted(order[n - rr :])
                km = kk.mean(0)[p:]
                km = km / km.norm(dim=-1, keepdim=True)
                wx = {i: h[p + i] * size[i] for i in targets}
                ws = {i: size[i] for i in targets}
                for j in removed:
                    sims = sorted(((float(km[j] @ km[i]), i) for i in targets), key=lambda s: -s[0])[:k]
                    z = sum(math.exp(s / tau) for s, _ in sims)
                    for s, i in sims:
                        w = math.exp(s / tau) / z * size[j]
                        wx[i] = wx[i] + w * h[p + j]
                        ws[i] = ws[i] + w
                h = torch.cat([h[:p], torch.stack([wx[i] / ws[i] for i in targets])])
                size = [ws[i] for i in targets]
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        outs.append(vit.norm(h))
        sizes_out.append(size)
    return torch.stack(outs), sizes_out


@pytest.mark.parametrize("k,tau", [(4, 0.1), (1, 0.1), (3, 1.0)])
def test_matches_the_loop_reference_on_a_cls_only_vit(k, tau):
    vit, spec = cls_only_vit()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = TokenTransforming(spec, 6, k=k, tau=tau).build(vit).eval()(x)
        ref, _ = _reference(vit, x, 6, k, tau, p=1)
    assert out.patches.shape[1] == 35 - 18
    got = torch.cat([out.prefix, out.patches], dim=1)
    assert (got - ref).abs().max() < 1e-5


def test_matches_the_loop_reference_with_registers(case):
    vit, spec, size = case  # the tiny test model and the DINOv2 layout (CLS + 4 registers, LayerScale)
    torch.manual_seed(4)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = TokenTransforming(spec, 5).build(vit).eval()(x)
        ref, _ = _reference(vit, x, 5, 4, 0.1, p=spec.num_prefix)
    got = torch.cat([out.prefix, out.patches], dim=1)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5


def test_r0_is_the_plain_backbone(case):
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = get_method("token_transforming")(spec, 0).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert out.aux["tokens_per_layer"].tolist() == [[spec.num_patches] * spec.depth] * 2
    assert TokenTransforming.noop_budget(spec) == 0


def test_tokens_per_layer_equal_tomes(case):
    vit, spec, size = case
    x = torch.randn(1, 3, *size)
    for r in (1, 6, 17):
        with torch.no_grad():
            tt = TokenTransforming(spec, r).build(vit).eval()(x)
            tome = ToMe(spec, r).build(vit).eval()(x)
        expect, cur = [], spec.num_patches
        for _ in range(spec.depth):
            cur -= min(r, cur // 2)
            expect.append(cur)
        assert tt.aux["tokens_per_layer"][0].tolist() == expect == tome.aux["tokens_per_layer"][0].tolist()


def test_assignment_partitions_the_cells_and_densify_unmerges(case):
    vit, spec, size = case
    n = spec.num_patches
    with torch.no_grad():
        out = TokenTransforming(spec, 6).build(vit).eval()(torch.randn(2, 3, *size))
    m, a = out.patches.shape[1], out.assignment
    assert a.shape == (2, n) and a.min() >= 0 and a.max() < m
    assert (out.sizes >= 1).all() and (out.sizes.sum(1) == n).all()
    assert torch.equal(a.gather(1, out.positions), torch.arange(m).expand(2, -1))  # each target sits in its cell
    dense = densify(out)
    assert torch.equal(dense, torch.gather(out.patches, 1, a.unsqueeze(-1).expand(-1, -1, spec.embed_dim)))


def test_overhead_is_counted_and_parts_sum_to_the_total():
    from lwbench.backbones import create_backbone
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.measure.flops import count_macs

    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    reps = {r: count_macs(TaskModel(TokenTransforming(spec, r).build(vit), ClassifierHead(32, 3)), x) for r in (0, 4)}
    tome = count_macs(TaskModel(ToMe(spec, 4).build(vit), ClassifierHead(32, 3)), x)
    assert reps[0].parts["overhead"] == 0
    # per block: the CLS row over all keys (2 heads x (5 prefix + n) keys x head dim 16), then removed x targets on
    # head-averaged keys: n = 35 (4 removed, 31 targets), then n = 31 (4 removed, 27 targets)
    assert reps[4].parts["overhead"] == (2 * 40 * 16 + 4 * 31 * 16) + (2 * 36 * 16 + 4 * 27 * 16)
    assert reps[4].parts["backbone"] == tome.parts["backbone"]  # the same token counts, the same backbone cost
    assert math.isclose(sum(reps[4].parts.values()), reps[4].macs, rel_tol=1e-9)


def test_budget_and_option_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)  # 35 patches
    TokenTransforming(spec, 17)
    with pytest.raises(BudgetError, match=r"valid: r=0\.\.17"):
        TokenTransforming(spec, 18)
    with pytest.raises(BudgetError, match="valid"):
        TokenTransforming(spec, -1)
    with pytest.raises(BudgetError):
        TokenTransforming(spec, 2.5)
    with pytest.raises(ConfigError, match="k"):
        TokenTransforming(spec, 2, k=0)
    with pytest.raises(ConfigError, match="tau"):
        TokenTransforming(spec, 2, tau=0)
    with pytest.raises(ConfigError, match="class token|CLS"):
        TokenTransforming(BackboneSpec("siglip", (32, 48), 16, 2, 32, 2, 0, family="vit-noclass"), 2)
    grid = TokenTransforming.budget_grid(spec)
    assert grid == ToMe.budget_grid(spec) and TokenTransforming.default_budget(spec) in grid
