"""Representation Shift (``repshift``): known answers from the paper's score ``D(F(x), x)`` with F the MLP
(``||MLP(LN(x')) - x'||_2``, and the residual reading ``||x_out - x'||_2``), the score against the block by hand,
the schedule's token counts and GMACs, prefix tokens, RoPE backbones, exactness at keep_rate=1, the overhead
line, budgets and the fine-tune regime."""

from __future__ import annotations

import pytest
import timm
import torch
from _toy import recording_ctx
from torch import nn

from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError, ConfigError
from lwbench.flops_report import flops_report
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.measure.flops import count_macs
from lwbench.method import BackboneSpec
from lwbench.methods._reduction import embed
from lwbench.methods.repshift import RepShift, ShiftPruner, default_layers, select_shifted
from lwbench.vit import all_positions, grid_of, num_prefix, rope_of


def _timm(name, size, depth=2, **kw):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, depth=depth,
                            **{"embed_dim": 64, "num_heads": 2, **kw}).eval()
    with torch.no_grad():  # far from init: LayerScale, prefix tokens and position embeddings all matter
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    return vit, BackboneSpec.of(vit, name, size)


# -- known answers -------------------------------------------------------------------------------------------
def test_keeps_the_most_shifted_tokens_in_grid_order():
    x = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1).repeat(1, 1, 2)
    shift = torch.tensor([[2.0, 0.0, 7.0, 1.0, 5.0]])
    pos = torch.tensor([[10, 11, 12, 13, 14]])
    tok, p = select_shifted(x, shift, pos, keep=3)
    assert p.tolist() == [[10, 12, 14]] and tok[0, :, 0].tolist() == [0.0, 2.0, 4.0]


def test_score_is_the_l2_distance_of_the_mlp_output_to_its_input_and_an_unchanged_token_goes_first():
    """Two prefix tokens, four patch tokens. The paper's score ||MLP(LN(x')) - x'||_2 (``mlp``): MLP(LN(x')) - x'
    is (3, 4), (0, 0), (6, 8), (1, 0), so the token the MLP maps to itself (cell 1) has shift 0 and goes first."""
    x_mid = torch.tensor([[[9.0, 9.0], [9.0, 9.0], [1.0, 2.0], [5.0, 5.0], [0.0, 1.0], [2.0, 2.0]]])  # x'
    mlp = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [4.0, 6.0], [5.0, 5.0], [6.0, 9.0], [3.0, 2.0]]])  # MLP(LN(x'))
    attn = torch.ones_like(x_mid)  # Attn(LN(x)), so x = x' - 1
    x_in, x_out = x_mid - attn, x_mid + mlp
    pos = torch.tensor([[0, 1, 2, 3]])
    pruner = ShiftPruner(num_prefix=2, keep_rate=0.75, shift="mlp")
    assert pruner.score(x_in, x_mid, attn, mlp).tolist() == [[5.0, 0.0, 10.0, 1.0]]
    tok, p, s = pruner(x_in, x_out, x_mid, attn, mlp, pos)
    assert p.tolist() == [[0, 2, 3]]  # ceil(0.75 * 4) = 3: cell 1 is the one dropped
    assert torch.equal(tok[:, :2], x_out[:, :2])  # prefix first, as the block left it, never ranked
    assert torch.equal(tok[:, 2:], x_out[:, [2, 4, 5]])
    assert torch.equal(s, pruner.score(x_in, x_mid, attn, mlp))

    def score(shift):
        return ShiftPruner(2, 0.5, shift).score(x_in, x_mid, attn, mlp)

    # the other reading, the residual stream before and after the MLP sub-block: ||x_out - x'|| = ||MLP(LN(x'))||
    assert torch.allclose(score("mlp_branch"), torch.tensor([[52.0, 50.0, 117.0, 13.0]]).sqrt())
    # the paper's other operations, read the same way: ||Attn(LN(x)) - x|| and ||Block(x) - x||
    assert torch.allclose(score("attn"), torch.tensor([[1.0, 18.0, 5.0, 0.0]]).sqrt())
    assert torch.allclose(score("block"), torch.tensor([[74.0, 72.0, 149.0, 25.0]]).sqrt())


class MaskedMLP(nn.Module):
    """A per-token 'MLP' returning its input times a fixed per-position factor."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.register_buffer("factor", factor)

    def forward(self, x):
        return x * self.factor[: x.shape[1], None]


@pytest.mark.parametrize("shift", ["mlp", "mlp_branch"])
def test_tokens_with_zero_shift_are_pruned_and_prefix_survives_even_at_zero_shift(shift):
    """End to end on the DINOv2 layout (CLS + 4 registers, LayerScale), block 0's MLP made to leave cells 1 and 4
    and every prefix token with shift exactly 0: ``mlp``, the MLP layer maps them to themselves (norm2 and ls2
    made identities, factor 1; the others factor 0); ``mlp_branch``, the branch is 0 for them (factor 0; the
    others 1). Those two patch tokens are the ones dropped; the prefix is kept."""
    vit, spec = _timm("vit_small_patch14_reg4_dinov2", (28, 42))  # 2 x 3 patches
    p, n = spec.num_prefix, spec.num_patches
    zero = torch.zeros(p + n, dtype=torch.bool)
    zero[:p] = True  # prefix tokens: shift 0, the least of all, still never pruned
    zero[p + torch.tensor([1, 4])] = True
    blk = vit.blocks[0]
    if shift == "mlp":
        blk.norm2, blk.ls2, blk.mlp = nn.Identity(), nn.Identity(), MaskedMLP(zero.float())
    else:
        blk.mlp = MaskedMLP((~zero).float())
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        out = RepShift(spec, 0.6, keep_layers=[0], shift=shift).build(vit).eval()(x)  # ceil(0.6 * 6) = 4
    assert out.positions.tolist() == [[0, 2, 3, 5]] * 2
    assert out.prefix.shape[1] == p and out.patches.shape[1] == 4
    assert (out.aux["representation_shift"][0][:, [1, 4]] == 0).all()
    assert (out.aux["representation_shift"][0][:, [0, 2, 3, 5]] > 0).all()


@pytest.mark.parametrize("shift", ["mlp", "mlp_branch"])
def test_score_against_the_block_by_hand(case, shift):
    """The score at block 0 from the block's parts written out here: x' = x + ls1(attn(norm1(x))), the branch
    b = ls2(mlp(norm2(x'))); ``mlp`` is ||b - x'||, ``mlp_branch`` ||b||; the kept cells are the top
    ceil(keep_rate * n)."""
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    enc = RepShift(spec, 0.4, keep_layers=[0], shift=shift).build(vit).eval()
    blk = vit.blocks[0]
    with torch.no_grad():
        out = enc(x)
        h = embed(vit, x)
        mid = h + blk.ls1(blk.attn(blk.norm1(h)))
        branch = blk.ls2(blk.mlp(blk.norm2(mid)))
        torch.testing.assert_close(mid + branch, blk(h), rtol=0, atol=1e-6)  # the hand split is the block
        delta = branch - mid if shift == "mlp" else branch
        expect = delta[:, spec.num_prefix :].norm(dim=-1)
    torch.testing.assert_close(out.aux["representation_shift"][0], expect, rtol=1e-5, atol=1e-6)
    keep = 14  # ceil(0.4 * 35)
    assert torch.equal(out.positions, expect.topk(keep, dim=1).indices.sort(dim=1).values)


# -- schedule -------------------------------------------------------------------------------------------------
def test_default_layers_are_the_official_0_3_6_scaled_to_depth():
    assert default_layers(12) == [0, 3, 6]  # the README's --drop_r [0.2,0,0,0.2,0,0,0.2,0,0,0,0,0]
    assert default_layers(24) == [0, 6, 12]
    assert default_layers(4) == [0, 1, 2]
    assert default_layers(2) == [0]  # never after the last block
    assert default_layers(1) == [0]


@pytest.mark.parametrize("keep_rate,expect", [(0.8, [13, 13, 13, 11, 11, 11, 9, 9, 9, 9, 9, 9]),
                                              (0.5, [8, 8, 8, 4, 4, 4, 2, 2, 2, 2, 2, 2])])
def test_tokens_per_layer_at_the_official_schedule(keep_rate, expect):
    """DeiT layout, 12 blocks, 4 x 4 patches: ceil(keep_rate * n) after blocks 0, 3 and 6, n the current count."""
    vit, spec = _timm("deit_small_patch16_224", (64, 64), depth=12, embed_dim=32)
    with torch.no_grad():
        out = RepShift(spec, keep_rate).build(vit).eval()(torch.randn(2, 3, 64, 64))
    assert out.aux["tokens_per_layer"].tolist() == [expect] * 2
    assert sorted(out.aux["representation_shift"]) == [0, 3, 6]
    assert out.patches.shape[1] == expect[-1] and out.prefix.shape[1] == 1
    assert (out.positions.diff(dim=1) > 0).all()  # distinct cells in grid order


def test_official_schedule_reproduces_the_papers_gflops():
    """DeiT-S at 224 px, keep 0.8 after blocks 0, 3, 6 (the official drop_r=0.2), counted by ``lwbench flops``:
    the paper's 4.6 -> 3.0 (its "GFLOPs" are GMACs; the unpruned 4.60 is the closed form). DeiT-B gives 17.56 ->
    11.50, its 17.6 -> 11.5 (slower to trace)."""
    pruned = flops_report("repshift", "deit_small_patch16_224", 224, budget="keep_rate=0.8", num_classes=1000)
    assert round(pruned["closed_form_gmacs"], 1) == 4.6 and round(pruned["parts_gmacs"]["backbone"], 1) == 3.0
    tokens = 196 + 157 + 126  # scored after blocks 0, 3, 6: 196 -> 157 -> 126 -> 101
    assert pruned["parts_gmacs"]["overhead"] == pytest.approx(tokens * 384 / 1e9, rel=1e-5)


# -- exactness, families, RoPE ---------------------------------------------------------------------------------
def test_keep_rate_1_is_the_plain_backbone(case):
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = RepShift(spec, 1.0, keep_layers=[0, 1]).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert torch.equal(out.positions, torch.arange(spec.num_patches).expand(2, -1))
    assert out.aux["representation_shift"] == {}


@pytest.mark.parametrize("name,size", [("deit_small_patch16_224", (32, 48)),
                                       ("vit_base_patch16_siglip_224", (32, 48)),  # no class token
                                       ("vit_small_patch16_dinov3", (32, 48)),  # RoPE, CLS + 4 registers
                                       ("eva02_tiny_patch14_224", (28, 42))])  # absolute + RoPE
def test_every_family_no_op_and_pruned_against_the_blocks_by_hand(name, size):
    """keep_rate=1 is timm's forward_features bit for bit; at keep_rate 0.5 the output is the remaining blocks
    run by hand on the kept tokens, with RoPE at the kept cells (Eva)."""
    vit, spec = _timm(name, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = RepShift(spec, 1.0).build(vit).eval()(x)
        assert torch.equal(torch.cat([plain.prefix, plain.patches], 1), vit.forward_features(x))
        out = RepShift(spec, 0.5, keep_layers=[0]).build(vit).eval()(x)
        grid, p = grid_of(vit, x), num_prefix(vit)
        rope = rope_of(vit, grid)
        kw = {} if rope is None else {"rope": rope}
        h0 = embed(vit, x)
        blk = vit.blocks[0]
        y = blk.attn(blk.norm1(h0), **kw)
        ls1 = getattr(blk, "ls1", None) or (lambda t: t if blk.gamma_1 is None else blk.gamma_1 * t)
        mid = h0 + ls1(y)  # the attention residual by hand (timm Block: ls1; EvaBlock: gamma_1)
        h = blk(h0, **kw)
        score = out.aux["representation_shift"][0]
        torch.testing.assert_close(score, ((h - mid) - mid)[:, p:].norm(dim=-1), rtol=1e-4, atol=1e-5)  # ||b - x'||
        idx = score.topk(3, dim=1).indices.sort(dim=1).values  # ceil(0.5 * 6)
        assert torch.equal(out.positions, all_positions(2, grid, x.device).gather(1, idx))
        h = torch.cat([h[:, :p], h[:, p:].gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))], 1)
        rope = rope_of(vit, grid, idx)
        kw = {} if rope is None else {"rope": rope}
        ref = vit.norm(vit.blocks[1](h, **kw))
    torch.testing.assert_close(out.patches, ref[:, p:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.prefix, ref[:, :p], rtol=0, atol=1e-5)


# -- cost ------------------------------------------------------------------------------------------------------
def test_scoring_cost_is_counted_as_overhead():
    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    full = count_macs(TaskModel(RepShift(spec, 1.0).build(vit), ClassifierHead(32, 3)), x)
    pruned = count_macs(TaskModel(RepShift(spec, 0.5).build(vit), ClassifierHead(32, 3)), x)
    assert full.parts["overhead"] == 0
    assert pruned.parts["overhead"] == 35 * 32  # the squared norm of 35 patch tokens x 32 dims, after block 0
    per_token = 3 * 32 * 32 + 32 * 32 + 2 * 32 * 64  # qkv, proj, MLP (hidden 64)
    attn = 2 * 32 * (40 * 40 - 23 * 23)  # q k^T and attn v (2 T^2 D), 40 -> 23 tokens in block 1
    assert full.parts["backbone"] - pruned.parts["backbone"] == 17 * per_token + attn  # 35 -> 18 patches


# -- budgets, options, regime ----------------------------------------------------------------------------------
def test_budget_and_option_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(BudgetError, match=r"repshift: .*valid: keep_rate in \(0, 1\]"):
            RepShift(spec, bad)
    with pytest.raises(ConfigError, match="0..1"):
        RepShift(spec, 0.5, keep_layers=[2])
    with pytest.raises(ConfigError, match="shift"):
        RepShift(spec, 0.5, shift="cosine")
    assert RepShift(spec, 0.5, keep_layers="0,1").pruning_layers() == [0, 1]
    assert RepShift(spec).budget == 0.8 and RepShift(spec, 0.5).pruning_layers() == [0]


@pytest.mark.parametrize("regime", ["off_the_shelf", "finetuned"])
def test_finetuned_regime_finetunes_everything_off_the_shelf_nothing(regime):
    vit = create_backbone("lw_vit_test_p8", (40, 56))
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    calls = []
    ctx = recording_ctx(vit, regime, calls)
    model = RepShift(spec, 0.5).fit(ctx)
    assert calls == ([("repshift-keep_rate=0.5-finetune", True)] if regime == "finetuned" else [])
    assert list(model.encoder.pruners) == ["0"]
