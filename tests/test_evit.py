"""EViT / top-k: selection and fusion on hand-set attention, the side-computed CLS row against the explicit
attention matrix, exactness at keep_rate=1, token counts, budgets and the fine-tune switch."""

from __future__ import annotations

import pytest
import torch
from _toy import recording_ctx

from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError, ConfigError
from lwbench.method import BackboneSpec
from lwbench.methods._reduction import cls_attention, default_layers, embed, split_qkv
from lwbench.methods.evit import EViT, TopK, select_attentive
from lwbench.registry import get_method


def test_keeps_highest_attention_and_fuses_the_rest():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1).repeat(1, 1, 2)  # token i = (i, i)
    attn = torch.tensor([[0.05, 0.30, 0.02, 0.20, 0.10, 0.03]])  # CLS attention to the 6 tokens
    pos = torch.tensor([[10, 11, 12, 13, 14, 15]])
    tok, p = select_attentive(x, attn, pos, keep=3, fuse=True)
    assert p.tolist() == [[11, 13, 14, -1]]  # top 3 in grid order, then the fused token
    assert tok[0, :3, 0].tolist() == [1.0, 3.0, 4.0]
    fused = 0.05 * 0 + 0.02 * 2 + 0.03 * 5  # attention-weighted sum over the inattentive tokens 0, 2, 5
    assert torch.allclose(tok[0, 3], torch.tensor([fused, fused]))
    tok, p = select_attentive(x, attn, pos, keep=3, fuse=False)
    assert p.tolist() == [[11, 13, 14]] and tok.shape == (1, 3, 2)


def test_side_cls_row_equals_explicit_attention(case):
    vit, spec, size = case
    blk = vit.blocks[0]
    with torch.no_grad():
        h = embed(vit, torch.randn(2, 3, *size))
        q, k, _ = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(h)))
        full = (q @ k.transpose(-1, -2) * blk.attn.scale).softmax(-1)  # the matrix EViT's code materialises
        row = cls_attention(q, k, blk.attn.scale)
    assert torch.allclose(row, full[:, :, 0], atol=1e-6)


@pytest.mark.parametrize("method", ["evit", "topk"])
def test_keep_rate_1_is_the_plain_backbone(case, method):
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = get_method(method)(spec, 1.0).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert torch.equal(out.positions, torch.arange(spec.num_patches).expand(2, -1))


def test_kept_tokens_are_the_most_attended(case):
    """End to end: the cells kept at the pruning block are the top-k of the explicit CLS attention there."""
    vit, spec, size = case
    layer = 1
    x = torch.randn(2, 3, *size)
    enc = get_method("topk")(spec, 0.4, keep_layers=[layer]).build(vit).eval()
    with torch.no_grad():
        out = enc(x)
        h = embed(vit, x)
        for blk in vit.blocks[:layer]:
            h = blk(h)
        blk = vit.blocks[layer]
        q, k, _ = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(h)))
        row = (q @ k.transpose(-1, -2) * blk.attn.scale).softmax(-1)[:, :, 0].mean(1)[:, spec.num_prefix :]
    keep = 14  # ceil(0.4 * 35)
    expect = row.topk(keep, dim=1).indices.sort(dim=1).values
    assert torch.equal(out.positions, expect)
    assert torch.allclose(out.aux["cls_attention"][layer], row, atol=1e-6)


def test_tokens_per_layer(case):
    vit, spec, size = case
    x = torch.randn(1, 3, *size)
    layers = default_layers(spec.depth)
    seen = {}
    for kr in (0.9, 0.5, 0.2):
        for method, extra in (("evit", 1), ("topk", 0)):
            with torch.no_grad():
                out = get_method(method)(spec, kr).build(vit).eval()(x)
            expect, n = [], spec.num_patches
            for i in range(spec.depth):
                if i in layers:
                    kept = -(-int(kr * 100) * n // 100)  # ceil(kr * n)
                    n = kept + extra if kept < n else n
                expect.append(n)
            assert out.aux["tokens_per_layer"][0].tolist() == expect
            assert out.patches.shape[1] == expect[-1]
            # an earlier fused token competes like any other (official behaviour), so it may survive
            fused = int((out.positions == -1).sum())
            assert (1 <= fused <= len(layers)) if method == "evit" else fused == 0
            seen[method, kr] = expect[-1]
    assert seen["topk", 0.9] > seen["topk", 0.5] > seen["topk", 0.2]
    assert seen["evit", 0.9] > seen["evit", 0.5] > seen["evit", 0.2]
    if spec.depth == 12:  # layers 3, 6, 9: 35 -> 32 (+1) -> ... ; 35 -> 18 -> 9 -> 5 without fusion
        assert default_layers(12) == [3, 6, 9]
        assert seen["topk", 0.5] == 5 and seen["evit", 0.5] == 7


def test_default_layers_scale_with_depth():
    assert default_layers(12) == [3, 6, 9]
    assert default_layers(24) == [6, 12, 18]
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(2) == [1]


def test_budget_and_option_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(BudgetError, match=r"valid: keep_rate in \(0, 1\]"):
            EViT(spec, bad)
    with pytest.raises(BudgetError, match="valid"):
        TopK(spec, 2.0)
    with pytest.raises(ConfigError, match="0..1"):
        EViT(spec, 0.5, keep_layers=[2])
    assert EViT(spec, 0.5, keep_layers="0,1").pruning_layers() == [0, 1]


@pytest.mark.parametrize("regime", ["off_the_shelf", "finetuned"])
def test_finetuned_regime_finetunes_everything_off_the_shelf_nothing(regime):
    """Fine-tuning is the run's regime, not an EViT option: finetuned trains encoder and head with train.*."""
    vit = create_backbone("lw_vit_test_p8", (40, 56))
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    calls = []
    ctx = recording_ctx(vit, regime, calls)
    model = EViT(spec, 0.5).fit(ctx)
    assert calls == ([("evit-keep_rate=0.5-finetune", True)] if regime == "finetuned" else [])
    assert model.encoder.pruners["1"].fuse


def test_scoring_cost_is_counted_as_overhead():
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.measure.flops import count_macs

    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    full = count_macs(TaskModel(EViT(spec, 1.0).build(vit), ClassifierHead(32, 3)), x)
    evit = count_macs(TaskModel(EViT(spec, 0.5).build(vit), ClassifierHead(32, 3)), x)
    topk = count_macs(TaskModel(TopK(spec, 0.5).build(vit), ClassifierHead(32, 3)), x)
    cls_row = 2 * 40 * 16  # heads x tokens x head dim: one attention row, at block 1
    assert full.parts["overhead"] == 0
    assert topk.parts["overhead"] == cls_row
    assert evit.parts["overhead"] == cls_row + 17 * 32  # + fusing the 17 dropped tokens
    mlp_per_token = 2 * 32 * 64
    assert full.parts["backbone"] - topk.parts["backbone"] == 17 * mlp_per_token  # dropped before block 1's MLP
    assert full.parts["backbone"] - evit.parts["backbone"] == 16 * mlp_per_token  # the fused token pays its MLP


@pytest.mark.parametrize("method", ["evit", "topk"])
def test_random_pruning_baseline_keeps_as_many_tokens_at_the_same_blocks(case, method):
    """``<method>_random``: the same schedule (tokens per block), other tokens than the method's, the same draw on
    every evaluation call, and a different one in training."""
    vit, spec, size = case
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = get_method(method)(spec, 0.5).build(vit).eval()(x)
        enc = get_method(f"{method}_random")(spec, 0.5).build(vit).eval()
        a, b = enc(x), enc(x)
    assert torch.equal(a.aux["tokens_per_layer"], ref.aux["tokens_per_layer"])
    assert a.positions.shape == ref.positions.shape and not torch.equal(a.positions, ref.positions)
    assert torch.equal(a.positions, b.positions)  # fixed seed in evaluation
    enc.train()
    with torch.no_grad():
        draws = {tuple(enc(x).positions[0].tolist()) for _ in range(4)}
    assert len(draws) > 1
