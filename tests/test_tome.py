"""ToMe: matching and merging math on hand-made tokens, proportional attention, the official algorithm on a
CLS-only ViT, exactness at r=0, source tracking and budgets."""

from __future__ import annotations

import pytest
import torch
from _toy import cls_only_vit
from timm.models.vision_transformer import VisionTransformer

from lwbench.attention import biased_attention
from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError, ConfigError
from lwbench.method import BackboneSpec
from lwbench.methods.tome import BipartiteMatcher, ToMe, size_bias, tome_schedule
from lwbench.registry import get_method
from lwbench.tokens import densify


def _merge(x, metric, r, size=None, a_offset=0):
    b, t, _ = x.shape
    pos = torch.arange(t).expand(b, -1).clone()
    size = torch.ones(b, t, 1) if size is None else size
    return BipartiteMatcher(a_offset)(x, metric, size, pos, pos.clone(), r)


def test_matcher_merges_the_most_similar_pair():
    # A = tokens 0, 2; B = tokens 1, 3. Token 2 has the same key direction as token 3; token 0 is orthogonal.
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8], [0.0, 1.2, 1.6]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [5.0]]])
    new_x, size, pos, assign = _merge(x, metric, r=1)
    assert new_x.flatten().tolist() == [1.0, 2.0, 4.0]  # [unmerged A, B0, mean(2 -> 3)]
    assert size.flatten().tolist() == [1.0, 1.0, 2.0]
    assert pos.tolist() == [[0, 1, 3]]  # merged token sits in its B partner's cell
    assert assign.tolist() == [[0, 1, 2, 2]]


def test_a_offset_follows_sequence_parity():
    # With an odd number of prefix tokens, patch 0 is in B: now token 3 (A) merges into token 2 (B).
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8], [0.0, 1.2, 1.6]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [5.0]]])
    new_x, size, pos, assign = _merge(x, metric, r=1, a_offset=1)
    assert new_x.flatten().tolist() == [2.0, 1.0, 4.0]  # [unmerged A = token 1, B = token 0, token 2 + 3]
    assert assign.tolist() == [[1, 0, 2, 2]] and pos.tolist() == [[1, 0, 2]]


def test_size_weighted_average():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # 0~3 and 2~1
    x = torch.tensor([[[4.0, 0.0], [0.0, 8.0], [2.0, 2.0], [0.0, 4.0]]])
    size = torch.tensor([[[3.0], [1.0], [5.0], [1.0]]])
    new_x, new_size, _, assign = _merge(x, metric, r=2, size=size)
    # B0 = token 1 absorbs token 2; B1 = token 3 absorbs token 0. Weighted by size.
    assert torch.allclose(new_x[0, 0], (1 * x[0, 1] + 5 * x[0, 2]) / 6)
    assert torch.allclose(new_x[0, 1], (1 * x[0, 3] + 3 * x[0, 0]) / 4)
    assert new_size.flatten().tolist() == [6.0, 4.0]
    assert assign.tolist() == [[1, 0, 0, 1]]


def test_proportional_attention_equals_duplicated_tokens(case):
    """Two identical tokens merged into one of size 2 with a log(2) bias attend exactly like the pair."""
    vit, spec, _ = case
    p, d = spec.num_prefix, spec.embed_dim
    torch.manual_seed(1)
    prefix, t1, t2 = torch.randn(1, p, d), torch.randn(1, 1, d), torch.randn(1, 1, d)
    attn, norm = vit.blocks[0].attn, vit.blocks[0].norm1
    duplicated = torch.cat([prefix, t1, t2, t2], dim=1)
    merged = torch.cat([prefix, t1, t2], dim=1)
    size = torch.tensor([[[1.0], [2.0]]])
    with torch.no_grad():
        ref = attn(norm(duplicated))
        out = attn(norm(merged), attn_mask=size_bias(size, p)[:, None, None, :])  # timm's attention, a float mask
        folded = biased_attention(attn, norm(merged), size_bias(size, p))[0]  # the bias folded into q . k
        plain = attn(norm(merged))
    assert torch.allclose(out, ref[:, : p + 2], atol=1e-6)  # CLS, registers and both tokens
    assert torch.allclose(folded, ref[:, : p + 2], atol=1e-6)
    assert not torch.allclose(plain[:, 0], ref[:, 0], atol=1e-6)  # without the bias it differs


def test_r0_is_the_plain_backbone(case):
    vit, spec, size = case
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = get_method("tome")(spec, 0).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert out.aux["tokens_per_layer"].tolist() == [[spec.num_patches] * spec.depth] * 2


def test_assignment_covers_every_cell_and_densify_unmerges(case):
    vit, spec, size = case
    n = spec.num_patches
    enc = get_method("tome")(spec, 6).build(vit).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, *size))
    m = out.patches.shape[1]
    a = out.assignment
    assert a.shape == (2, n) and a.min() >= 0 and a.max() < m
    assert (out.sizes >= 1).all() and (out.sizes.sum(1) == n).all()  # every token owns >= 1 cell, cells partitioned
    assert torch.equal(a.gather(1, out.positions), torch.arange(m).expand(2, -1))  # each token sits in its own cell
    dense = densify(out)
    assert torch.equal(dense, torch.gather(out.patches, 1, a.unsqueeze(-1).expand(-1, -1, spec.embed_dim)))


@pytest.mark.parametrize("name", ["lw_vit_test_p8", "lw_vit_test_p14"])
def test_tokens_per_layer_and_cap(name):
    size = (40, 56) if name.endswith("p8") else (70, 98)
    vit = create_backbone(name, size).eval()
    spec = BackboneSpec.of(vit, name, size)
    n, depth = spec.num_patches, spec.depth  # 35 patches, 2 or 3 blocks
    x = torch.randn(1, 3, *size)
    counts = {}
    for r in (1, 2, 17):
        with torch.no_grad():
            out = get_method("tome")(spec, r).build(vit).eval()(x)
        tpl = out.aux["tokens_per_layer"][0].tolist()
        expect, cur = [], n
        for _ in range(depth):
            cur -= min(r, cur // 2)
            expect.append(cur)
        assert tpl == expect and out.patches.shape[1] == expect[-1]
        counts[r] = tpl[-1]
    assert counts[1] > counts[2] > counts[17] >= 1
    assert counts == ({1: 33, 2: 31, 17: 9} if depth == 2 else {1: 32, 2: 29, 17: 5})


def test_decreasing_schedule():
    assert tome_schedule(8, 12, "decreasing") == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert tome_schedule(8, 12) == [8] * 12
    spec = BackboneSpec("x", (56, 56), 8, 12, 32, 2, 5)
    enc = get_method("tome")(spec, 2, schedule="decreasing").build(create_backbone("lw_vit_test_p8", (56, 56)))
    assert enc.schedule == tome_schedule(2, 12, "decreasing")


def test_budget_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)  # 35 patches
    ToMe(spec, 17)
    with pytest.raises(BudgetError, match=r"valid: r=0\.\.17"):
        ToMe(spec, 18)
    with pytest.raises(BudgetError, match=r"valid: r=0\.\.8"):
        ToMe(spec, 9, schedule="decreasing")
    with pytest.raises(BudgetError, match="valid"):
        ToMe(spec, -1)
    with pytest.raises(ConfigError, match="schedule"):
        ToMe(spec, 2, schedule="linear")
    grid = ToMe.budget_grid(spec)
    assert len(grid) >= 3 and all(1 <= r <= 17 for r in grid) and ToMe.default_budget(spec) in grid


def _reference_tome_cls(vit: VisionTransformer, x: torch.Tensor, r: int) -> torch.Tensor:
    """The official algorithm, written out naively for a CLS-only ViT: explicit attention with the log-size
    bias, sets A/B over the whole sequence (CLS in A, never merged), one image at a time."""
    outs = []
    for img in x:
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))[0]  # (T, C)
        size = torch.ones(h.shape[0])
        for blk in vit.blocks:
            a = blk.attn
            t, c = h.shape
            q, k, v = a.qkv(blk.norm1(h)).reshape(t, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
            logits = q @ k.transpose(-1, -2) * a.scale + size.log()[None, None, :]
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(t, c)
            h = h + blk.ls1(a.proj(o))
            rr = min(r, (t - 1) // 2)
            if rr > 0:
                km = k.mean(0)
                km = km / km.norm(dim=-1, keepdim=True)
                ia, ib = list(range(0, t, 2)), list(range(1, t, 2))
                best = []
                for i in ia:
                    sims = [float(km[i] @ km[j]) for j in ib]
                    jbest = max(range(len(ib)), key=lambda j: sims[j])
                    best.append((-float("inf") if i == 0 else sims[jbest], i, ib[jbest]))
                order = sorted(range(len(ia)), key=lambda n: -best[n][0])  # stable, like argsort descending
                merged = {best[n][1]: best[n][2] for n in order[:rr]}
                wx = {i: h[i] * size[i] for i in range(t)}
                ws = {i: size[i].clone() for i in range(t)}
                for src, dst in merged.items():
                    wx[dst] = wx[dst] + h[src] * size[src]
                    ws[dst] = ws[dst] + size[src]
                keep = [i for i in ia if i not in merged] + ib
                h = torch.stack([wx[i] / ws[i] for i in keep])
                size = torch.stack([ws[i] for i in keep])
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        outs.append(vit.norm(h)[0])
    return torch.stack(outs)


def test_matches_official_algorithm_on_a_cls_only_vit():
    vit, spec = cls_only_vit()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = ToMe(spec, 6).build(vit).eval()(x)
        ref = _reference_tome_cls(vit, x, 6)
    assert out.patches.shape[1] == 35 - 18
    assert (out.cls - ref).abs().max() < 1e-5


def test_matching_cost_is_counted_as_overhead():
    from lwbench.heads import ClassifierHead, TaskModel
    from lwbench.measure.flops import count_macs

    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    reps = {r: count_macs(TaskModel(ToMe(spec, r).build(vit), ClassifierHead(32, 3)), x) for r in (0, 4)}
    assert reps[0].parts["overhead"] == 0 and reps[0].counter == "fvcore"
    # A.B^T per block on head-averaged keys (head dim 16): 17x18 pairs at 35 patches, then 15x16 at 31.
    assert reps[4].parts["overhead"] == (17 * 18 + 15 * 16) * 16
    # the merged tokens skip the MLP of block 0 (4 x 2 x 32 x 64) and all of block 1 (8 x ...), minus attention
    assert reps[4].parts["backbone"] < reps[0].parts["backbone"]
    torch_count = count_macs(TaskModel(ToMe(spec, 4).build(vit), ClassifierHead(32, 3)), x, counter="torch")
    assert torch_count.parts == reps[4].parts
