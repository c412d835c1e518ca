"""MCTF: each criterion's attraction by hand, who fuses (least informative, most similar, smallest), bidirectional
matching and its chains, fusion weights and sizes, the pooled attention map by hand, the official algorithm (its
default approximate one-step-ahead and its precise mode) written out naively on a CLS-only ViT,
prefix tokens never fused, source tracking, one-step-ahead attention, overhead MACs, budgets, r=0 = the backbone."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import BACKBONE_CASES, check_no_op_budget, cls_only_vit, make
from timm.models.vision_transformer import VisionTransformer

from lwbench.errors import BudgetError, ConfigError
from lwbench.flops_report import random_model
from lwbench.measure.flops import count_macs
from lwbench.method import BackboneSpec
from lwbench.methods._reduction import split_qkv
from lwbench.methods.mctf import (
    AHEAD_MODES,
    MCTF,
    MultiCriteriaMerger,
    attention_probs,
    attention_received,
    attraction,
    block_r,
    criteria,
    fuse,
    plan_fusion,
    pool_attention,
)
from lwbench.registry import get_method
from lwbench.tokens import densify


def _four_tokens():
    """A = tokens 0, 2; B = tokens 1, 3 (a_offset 0). cos(0,1) = 1, cos(0,3) = -1, cos(2,1) = cos(2,3) = 0."""
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    info = torch.tensor([[0.1, 0.2, 0.4, 0.5]])  # attention received
    size = torch.tensor([[[1.0], [2.0], [1.0], [4.0]]])
    return metric, info, size


def test_similarity_attraction_by_hand():
    """W_sim = ((cos + 1) / 2) ** (1 / tau_sim): [[1, 0], [1/2, 1/2]] at tau 1, its square root at tau 2."""
    metric, info, size = _four_tokens()
    w = criteria(metric, info, size, 0, tau_sim=1.0, tau_info=0.0, tau_size=0.0)
    torch.testing.assert_close(w["sim"], torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))
    assert w["info"] == 1.0 and w["size"] == 1.0  # tau 0: the criterion is off
    w2 = criteria(metric, info, size, 0, tau_sim=2.0, tau_info=0.0, tau_size=0.0)["sim"]
    torch.testing.assert_close(w2, torch.tensor([[[1.0, 0.0], [0.5**0.5, 0.5**0.5]]]))


def test_informativeness_attraction_by_hand():
    """1/a = [10, 5, 2.5, 2], / max -> [1, 1/2, 1/4, 1/5]; W_info(i, j) = (a~_i a~_j) ** (1/20) for i in A, j in B."""
    metric, info, size = _four_tokens()
    w = criteria(metric, info, size, 0, tau_sim=0.0, tau_info=20.0, tau_size=0.0)["info"]
    expect = torch.tensor([[[1 * 0.5, 1 * 0.2], [0.25 * 0.5, 0.25 * 0.2]]]) ** (1 / 20)
    torch.testing.assert_close(w, expect)
    # a small attention received means a large 1/a: token 0 (a = 0.1, least informative) attracts the most
    assert int(w[0].amax(dim=1).argmax()) == 0


def test_size_attraction_by_hand():
    """1/s = [1, 1/2, 1, 1/4] (max 1); W_size(i, j) = (s~_i s~_j) ** (1/40): small tokens attract."""
    metric, info, size = _four_tokens()
    w = criteria(metric, info, size, 0, tau_sim=0.0, tau_info=0.0, tau_size=40.0)["size"]
    torch.testing.assert_close(w, torch.tensor([[[0.5, 0.25], [0.5, 0.25]]]) ** (1 / 40))
    assert criteria(metric, info, None, 0, 1.0, 20.0, 40.0)["size"] == 1.0  # no sizes yet (first fusion): off


def test_attraction_is_the_product_of_the_three():
    metric, info, size = _four_tokens()
    w = attraction(metric, info, size, 0, 1.0, 20.0, 40.0)
    c = [
        criteria(metric, info, size, 0, *t)[k]
        for t, k in (((1.0, 0.0, 0.0), "sim"), ((0.0, 20.0, 0.0), "info"), ((0.0, 0.0, 40.0), "size"))
    ]
    torch.testing.assert_close(w, c[0] * c[1] * c[2])
    # the normalisations by the max only scale W: the matching is the same without them
    inv_a, inv_s = 1 / info, 1 / size.squeeze(-1)
    raw = (
        c[0]
        * (inv_a[:, 0::2, None] * inv_a[:, None, 1::2]) ** (1 / 20)
        * (inv_s[:, 0::2, None] * inv_s[:, None, 1::2]) ** (1 / 40)
    )
    ratio = raw[w > 0] / w[w > 0]  # (W_sim is 0 for the opposite pair 0-3)
    assert torch.equal(raw.argmax(-1), w.argmax(-1)) and torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_attraction_with_a_offset_one():
    """With an odd prefix the sets swap: A = tokens 1, 3, B = tokens 0, 2."""
    metric, info, size = _four_tokens()
    w = criteria(metric, info, size, 1, 1.0, 0.0, 0.0)["sim"]
    torch.testing.assert_close(w, torch.tensor([[[1.0, 0.5], [0.0, 0.5]]]))


def test_the_least_informative_token_fuses():
    """Equal similarity everywhere: the A token receiving the least attention (zero, up to the clamp) is the one
    fused (r = 1, no bidirection), the attended one is kept."""
    metric = torch.ones(1, 4, 3)  # every pair has cos 1
    info = torch.tensor([[0.5, 0.2, 0.0, 0.3]])  # token 2 (in A) receives no attention
    scores = attraction(metric, info, None, 0, 1.0, 20.0, 40.0)
    keep, dest = plan_fusion(scores, 1, 0, bidirection=False)
    assert keep.tolist() == [[0, 1, 3]]  # [unfused A, B]: token 2 is gone
    assert dest.tolist() == [[0, 1, 1, 2]]  # into the less informative B token (token 1: a = 0.2 < 0.3)


def test_the_most_similar_pair_fuses():
    """Equal informativeness and size: the most similar A-B pair fuses (ToMe's choice)."""
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8], [0.0, 1.2, 1.6]]])
    info = torch.full((1, 4), 0.25)
    keep, dest = plan_fusion(attraction(metric, info, None, 0, 1.0, 20.0, 40.0), 1, 0, bidirection=False)
    assert keep.tolist() == [[0, 1, 3]] and dest.tolist() == [[0, 1, 2, 2]]  # token 2 -> token 3 (same direction)


def test_the_smaller_token_fuses():
    """Two A tokens equally similar to B and equally informative: the one of size 1 fuses, the one of size 9 is
    kept (the size criterion protects large tokens)."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    info = torch.full((1, 4), 0.25)
    size = torch.tensor([[[9.0], [1.0], [1.0], [1.0]]])
    keep, dest = plan_fusion(attraction(metric, info, size, 0, 1.0, 20.0, 40.0), 1, 0, bidirection=False)
    assert keep.tolist() == [[0, 1, 3]] and dest[0, 2] == dest[0, 1]
    keep, _ = plan_fusion(attraction(metric, info, size, 0, 1.0, 20.0, 0.0), 1, 0, bidirection=False)
    assert keep.tolist() == [[2, 1, 3]]  # without it the tie goes to the first A token (index order), token 0


def test_bidirectional_matching_by_hand():
    """Six tokens, A = 0, 2, 4 and B = 1, 3, 5, r = 2: step 1 (r1 = 1) fuses the A token with the highest best
    score into its B partner; step 2 (r2 = 1) fuses the B token with the highest best score over the *unfused* A
    tokens into it, with the same W. New order: [unfused A by index, unfused B by step-2 score]."""
    scores = torch.tensor(
        [
            [
                [0.1, 0.2, 0.3],  # A0: best B2 (0.3)
                [0.9, 0.1, 0.1],  # A1 (token 2): best B0 (0.9) -> fused in step 1
                [0.2, 0.8, 0.4],
            ]
        ]
    )  # A2 (token 4)
    keep, dest = plan_fusion(scores, 2, 0, bidirection=True)
    # step 2 over unfused A = {A0, A2}: B0 best 0.2 (A2), B1 best 0.8 (A2), B2 best 0.4 (A2) -> B1 (token 3) fuses
    # into A2; unfused B in score order: B2 (0.4), B0 (0.2)
    assert keep.tolist() == [[0, 4, 5, 1]]
    assert dest.tolist() == [[0, 3, 3, 1, 1, 2]]  # token 2 -> B0 (slot 3); token 3 -> A2 (slot 1); token 5 -> slot 2
    keep1, dest1 = plan_fusion(scores, 2, 0, bidirection=False)  # ToMe's way: two A tokens into B
    assert keep1.tolist() == [[0, 1, 3, 5]] and dest1.tolist() == [[0, 1, 1, 2, 2, 3]]


def test_bidirectional_chain_ends_in_one_token():
    """A1 -> B0 in step 1, then B0 (holding A1) -> A0 in step 2: all three end in A0's slot."""
    scores = torch.tensor(
        [[[0.7, 0.1], [0.9, 0.1]]]
    )  # A1's best is B0 (0.9): step 1; then B0's best unfused A is A0 (0.7)
    keep, dest = plan_fusion(scores, 2, 0, bidirection=True)
    assert keep.tolist() == [[0, 3]] and dest.tolist() == [[0, 0, 0, 1]]


def test_fusion_weights_and_sizes():
    """x = sum a_i s_i x_i / sum a_i s_i over the fused tokens (weights sum to one), sizes add up to the cells."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 0.0]]])
    info = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0]]])
    merger = MultiCriteriaMerger(0, 0, 1.0, 20.0, 40.0, bidirection=False, pooling="attention")
    w = merger.weights(info, size)
    torch.testing.assert_close(w.squeeze(-1), torch.tensor([[0.1, 0.4, 0.9, 0.4]]))
    dest = torch.tensor([[0, 1, 0, 1]])  # tokens 0 + 2 and 1 + 3 fuse
    new_x, new_size = fuse(x, w, size, dest, 2)
    torch.testing.assert_close(new_x[0, 0], (0.1 * x[0, 0] + 0.9 * x[0, 2]) / 1.0)
    torch.testing.assert_close(new_x[0, 1], (0.4 * x[0, 1] + 0.4 * x[0, 3]) / 0.8)
    assert new_size.flatten().tolist() == [4.0, 3.0]  # 1 + 3 and 2 + 1 cells
    norm = w.squeeze(-1) / torch.zeros(1, 2).scatter_add(1, dest, w.squeeze(-1)).gather(1, dest)
    assert torch.zeros(1, 2).scatter_add(1, dest, norm).flatten().tolist() == pytest.approx([1.0, 1.0])
    for pooling, expect in (("size", [1.0, 2.0, 3.0, 1.0]), ("mean", [1.0, 1.0, 1.0, 1.0])):
        m = MultiCriteriaMerger(0, 0, 1.0, 20.0, 40.0, bidirection=False, pooling=pooling)
        assert m.weights(info, size).flatten().tolist() == expect


def test_attention_received_is_the_mean_over_heads_and_queries():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    bias = torch.randn(2, 5)  # one logit bias per key
    got = attention_received(q, k, 0.5, bias)
    ref = torch.stack(
        [torch.stack([(q[b, h] @ k[b, h].T * 0.5 + bias[b]).softmax(-1) for h in range(3)]) for b in range(2)]
    ).mean(dim=(1, 2))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))  # each query row sums to one, so does their mean


def test_one_step_ahead_qk_are_the_blocks_own():
    """The side q, k are what block l's attention computes on its (unfused) input: the one-step-ahead map."""
    vit, spec = make()
    blk = vit.blocks[1]
    h = torch.randn(2, 5 + spec.num_patches, spec.embed_dim)
    merger = MultiCriteriaMerger(1, 5, 1.0, 20.0, 40.0, True, "attention")
    with torch.no_grad():
        q, k = merger.side_qk(blk.attn, blk.norm1(h))
        q_ref, k_ref, _ = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(h)))
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


@pytest.mark.parametrize("name,size", [("vit_small_patch16_dinov3", (32, 48)), ("eva02_tiny_patch14_224", (28, 42))])
def test_one_step_ahead_qk_on_rope_backbones_are_the_blocks_own(name, size):
    """On an Eva (DINOv3: fused qkv with q/v biases, CLS + registers; EVA-02: absolute + RoPE) the side q, k are the
    q, k the block's attention uses, after its q/k norms and rotated with the RoPE at the tokens' cells."""
    from lwbench import eva
    from lwbench.backbones import create_backbone
    from lwbench.methods._reduction import rope_of, start_tokens

    torch.manual_seed(0)
    vit = create_backbone(name, size).eval()
    x = torch.randn(2, 3, *size)
    h, _, grid, p = start_tokens(vit, x)
    rope = rope_of(vit, grid)
    blk = vit.blocks[0]
    merger = MultiCriteriaMerger(p % 2, p, 1.0, 20.0, 40.0, True, "attention")
    with torch.no_grad():
        q, k = merger.side_qk(blk.attn, blk.norm1(h), rope)
        _, q_ref, k_ref, _ = eva.attention_step(blk, h, rope, None, need_v=False, rotated=True)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


def test_prefix_is_never_fused():
    """Prefix tokens identical to patch tokens (the most similar) are passed through untouched; only patches fuse."""
    torch.manual_seed(0)
    p, t, d = 5, 12, 8
    h = torch.randn(1, p + t, d)
    h[:, :p] = h[:, p : p + p]  # each prefix token equals a patch token
    q, k = torch.randn(1, 2, p + t, 4), torch.randn(1, 2, p + t, 4)
    blk = make()[0].blocks[0]
    pos = torch.arange(t)[None]
    probs = attention_probs(q, k, 0.5)
    for bidirection in (True, False):
        merger = MultiCriteriaMerger(p % 2, p, 1.0, 20.0, 40.0, bidirection=bidirection, pooling="attention")
        for side in ({"qk": (q, k)}, {"probs": probs}):
            out, size, positions, assign, pooled = merger(h, blk, None, None, pos, pos.clone(), 6, **side)
            assert torch.equal(out[:, :p], h[:, :p]) and out.shape[1] == p + t - 6
            assert size.sum().item() == t
            assert torch.bincount(assign[0], minlength=t - 6).tolist() == size.flatten().long().tolist()
            if "probs" in side:  # the prefix rows keep their own queries, their keys stay apart
                assert pooled.shape == (1, 2, p + t - 6, p + t - 6)
                torch.testing.assert_close(pooled[:, :, :p, :p], probs[:, :, :p, :p])
                torch.testing.assert_close(pooled.sum(-1), torch.ones(1, 2, p + t - 6))


def _naive_attention(blk, seq: torch.Tensor, size: torch.Tensor | None):
    """Explicit attention logits of ``blk`` on the ``(T, C)`` sequence, log-size bias added, and its values."""
    a, t = blk.attn, seq.shape[0]
    q, k, v = a.qkv(blk.norm1(seq)).reshape(t, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
    logits = q @ k.transpose(-1, -2) * a.scale
    return (logits if size is None else logits + size.log()[None, None, :]), v


def _naive_scores(h, att, size, tau_sim=1.0, tau_info=20.0, tau_size=40.0):
    """The official W over the whole sequence (A = even indices, CLS first in A with its row at -inf), in floats."""
    t = h.shape[0]
    s = torch.ones(t) if size is None else size
    m = h / h.norm(dim=-1, keepdim=True)
    inv_a, inv_s = (1 / att) / (1 / att).max(), (1 / s) / (1 / s).max()
    scores = []
    for i in range(0, t, 2):
        row = []
        for j in range(1, t, 2):
            w = (float(m[i] @ m[j] + 1) / 2) ** (1 / tau_sim) * float(inv_a[i] * inv_a[j]) ** (1 / tau_info)
            if size is not None:
                w *= float(inv_s[i] * inv_s[j]) ** (1 / tau_size)
            row.append(-math.inf if i == 0 else w)
        scores.append(row)
    return scores


def _naive_fuse(h, att, size, rr):
    """One official fusion (bidirectional, pooling 1) of ``rr`` tokens: the new sequence, sizes and the groups (the
    old tokens in each new one, in the new order)."""
    t = h.shape[0]
    s = torch.ones(t) if size is None else size
    score = _naive_scores(h, att, size)
    ia, ib = list(range(0, t, 2)), list(range(1, t, 2))
    r1, r2 = rr // 2, rr - rr // 2
    best = [max(range(len(ib)), key=row.__getitem__) for row in score]
    order = sorted(range(len(ia)), key=lambda n: -score[n][best[n]])  # stable, like a descending argsort
    src1, unm = order[:r1], sorted(order[r1:])
    group_b = {j: [ib[j]] + [ia[n] for n in src1 if best[n] == j] for j in range(len(ib))}
    best2 = [max(range(len(unm)), key=lambda u, j=j: score[unm[u]][j]) for j in range(len(ib))]
    order2 = sorted(range(len(ib)), key=lambda j: -score[unm[best2[j]]][j])
    src2, unm_b = order2[:r2], order2[r2:]
    groups = [[ia[unm[u]]] + sum((group_b[j] for j in src2 if best2[j] == u), []) for u in range(len(unm))]
    groups += [group_b[j] for j in unm_b]
    wt = att * s
    new_h = torch.stack([sum(wt[i] * h[i] for i in g) / sum(wt[i] for i in g) for g in groups])
    return new_h, torch.stack([sum(s[i] for i in g) for g in groups]), groups


def _reference_mctf_cls(vit: VisionTransformer, x: torch.Tensor, r: int) -> list[torch.Tensor]:
    """The official algorithm (``one_step_ahead=2`` "precise", bidirection, pooling 1, prop_attn, tau 1/20/40,
    activate_layer 1..depth-1) written out naively, one image at a time, for a CLS-only ViT: sets A/B over the whole
    sequence with CLS in A and its row at -inf, explicit attention with the log-size bias."""
    outs = []
    for img in x:
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))[0]  # (T, C)
        size = None
        for layer, blk in enumerate(vit.blocks):
            t = h.shape[0]
            rr = r if t - r >= 10 else t - 10
            rr = min(rr, (t - 1) // 2)
            if layer >= 1 and rr > 0:
                logits, _ = _naive_attention(blk, h, size)
                h, size, _ = _naive_fuse(h, logits.softmax(-1).mean(dim=(0, 1)), size, rr)
            logits, v = _naive_attention(blk, h, size)
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(h.shape)
            h = h + blk.ls1(blk.attn.proj(o))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        outs.append(vit.norm(h))
    return outs


def _reference_mctf_cls_approx(vit: VisionTransformer, x: torch.Tensor, r: int) -> list[torch.Tensor]:
    """The official default (``one_step_ahead=1``, ``models/modules/blocks.py`` ``Block_DEIT.forward``,
    ``utils/mctf.py`` ``merge_wavg`` with ``pooling_type=1``, ``models/SA/MHSA.py``) written out with loops, one image
    at a time, for a CLS-only ViT. In a fusing block: the attention map A of the block on its unfused input (log-size
    bias), the fusion by A's mean over heads and queries, then A pooled to the fused tokens (a fused key sums its
    members' columns, a fused query averages its members' rows with the fusion weights a_i s_i) is the block's
    attention: only v is computed, on the fused tokens. Other blocks: plain attention with the log-size bias."""
    outs = []
    for img in x:
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))[0]  # (T, C)
        size = None
        for layer, blk in enumerate(vit.blocks):
            t = h.shape[0]
            rr = r if t - r >= 10 else t - 10
            rr = min(rr, (t - 1) // 2)
            if layer >= 1 and rr > 0:
                logits, _ = _naive_attention(blk, h, size)
                att_map = logits.softmax(-1)  # (H, T, T)
                att = att_map.mean(dim=(0, 1))
                s = torch.ones(t) if size is None else size
                h, size, groups = _naive_fuse(h, att, size, rr)
                w = att * s
                pooled = torch.zeros(att_map.shape[0], len(groups), len(groups))
                for hh in range(att_map.shape[0]):
                    for gi, gq in enumerate(groups):
                        for gj, gk in enumerate(groups):
                            num = sum(w[i] * sum(att_map[hh, i, j] for j in gk) for i in gq)
                            pooled[hh, gi, gj] = num / sum(w[i] for i in gq)
                a, tn = blk.attn, h.shape[0]
                v = a.qkv(blk.norm1(h)).reshape(tn, 3, a.num_heads, a.head_dim)[:, 2].transpose(0, 1)  # (H, T', hd)
                o = (pooled @ v).transpose(0, 1).reshape(h.shape)
            else:
                logits, v = _naive_attention(blk, h, size)
                o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(h.shape)
            h = h + blk.ls1(blk.attn.proj(o))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        outs.append(vit.norm(h))
    return outs


def test_matches_official_default_approximate_mode_on_a_cls_only_vit():
    vit, spec = cls_only_vit()  # 35 patches + CLS
    x = torch.randn(2, 3, 40, 56)
    assert MCTF(spec, 5).opts.one_step_ahead == "approx"  # the official default
    for r in (5, 6):  # odd r: r1 = 2, r2 = 3
        with torch.no_grad():
            out = MCTF(spec, r).build(vit).eval()(x)
            ref = _reference_mctf_cls_approx(vit, x, r)
            precise = MCTF(spec, r, one_step_ahead="precise").build(vit).eval()(x)
        for b in range(2):
            got = torch.cat([out.prefix[b], out.patches[b]], 0)
            assert got.shape == ref[b].shape == (36 - 2 * r, 32)
            torch.testing.assert_close(got, ref[b], atol=2e-5, rtol=1e-4)
        assert torch.equal(out.positions, precise.positions)  # same fusion in the first fusing block ...
        assert (out.prefix - precise.prefix).abs().max() > 1e-4  # ... another attention there (5x the tolerance)


def test_pooled_attention_by_hand():
    """Three tokens, 0 and 2 fused (weights 1 and 3) into slot 0, token 1 alone in slot 1: a fused key sums its
    members' columns, a fused query row is the weighted mean of its members' rows; rows still sum to one."""
    att = torch.tensor([[[[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]])  # (1, 1, 3, 3)
    dest = torch.tensor([[0, 1, 0]])
    w = torch.tensor([[1.0, 5.0, 3.0]])
    got = pool_attention(att, dest, w, 2)[0, 0]
    keys = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.8, 0.2]])  # columns 0 + 2 summed
    expect = torch.stack([(1.0 * keys[0] + 3.0 * keys[2]) / 4.0, keys[1]])
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_matches_official_precise_mode_on_a_cls_only_vit():
    vit, spec = cls_only_vit()  # 35 patches + CLS
    x = torch.randn(2, 3, 40, 56)
    for r in (5, 6):  # odd r: r1 = 2, r2 = 3
        with torch.no_grad():
            out = MCTF(spec, r, one_step_ahead="precise").build(vit).eval()(x)
            ref = _reference_mctf_cls(vit, x, r)
        for b in range(2):
            got = torch.cat([out.prefix[b], out.patches[b]], 0)
            assert got.shape == ref[b].shape == (36 - 2 * r, 32)
            torch.testing.assert_close(got, ref[b], atol=2e-5, rtol=1e-4)


def test_assignment_covers_every_cell_and_densify_unmerges():
    vit, spec = make("lw_vit_test_p8", (40, 56))  # 35 patches, CLS + 4 registers
    n = spec.num_patches
    for mode in AHEAD_MODES:
        with torch.no_grad():
            out = MCTF(spec, 7, one_step_ahead=mode).build(vit).eval()(torch.randn(2, 3, 40, 56))
        m = out.patches.shape[1]
        a = out.assignment
        assert m == n - 7 and out.prefix.shape[1] == 5
        assert a.shape == (2, n) and a.min() >= 0 and a.max() < m
        assert (out.sizes >= 1).all() and (out.sizes.sum(1) == n).all()
        assert torch.equal(a.gather(1, out.positions), torch.arange(m).expand(2, -1))  # a token sits in its own cell
        dense = densify(out)
        assert torch.equal(dense, torch.gather(out.patches, 1, a.unsqueeze(-1).expand(-1, -1, spec.embed_dim)))


@pytest.mark.parametrize("name,size", BACKBONE_CASES)
def test_r0_is_the_plain_backbone(name, size):
    check_no_op_budget(lambda spec: MCTF(spec, 0), name, size)
    vit, spec = make(name, size)
    x = torch.randn(2, 3, *size)
    for mode in AHEAD_MODES:
        with torch.no_grad():
            ref = vit.forward_features(x)
            out = MCTF(spec, 0, one_step_ahead=mode).build(vit).eval()(x)
        assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


def test_tokens_per_layer_first_block_kept_and_min_tokens():
    vit, spec = make("vit_small_patch14_reg4_dinov2", (70, 98))  # 35 patches, 5 prefix, 12 blocks
    with torch.no_grad():
        out = MCTF(spec, 3).build(vit).eval()(torch.randn(1, 3, 70, 98))
    tpl = out.aux["tokens_per_layer"][0].tolist()
    # block 0 does not fuse (official activate_layer 1..11); then 3 a block until 10 tokens (5 prefix + 5) are left
    assert tpl == [35, 32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 5]
    assert block_r(16, 196, 1) == 16 and block_r(16, 12, 1) == 3 and block_r(16, 8, 1) == 0
    enc = MCTF(spec, 3, layers="3,6,9").build(vit)
    assert sorted(int(k) for k in enc.mergers) == [3, 6, 9]


def _closed_form_block(t: int, d: int, mlp: int = 4) -> int:
    """MACs of one plain block on t tokens: qkv 3 t d^2, q k^T and attn @ v 2 t^2 d, proj t d^2, MLP 2 mlp t d^2."""
    return 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * mlp * t * d * d


def test_overhead_macs_closed_form():
    """Tiny (CLS + 4 registers, 24 patches, width 32, 2 heads, blocks 1.. fuse r=6, 29 -> 23 tokens in block 1).
    Precise: the side q, k projection 2 T d^2 and the T x T map T^2 d on the unfused tokens are pure overhead beside
    the A x B similarity Ta Tb d, and the whole block runs again on the fused tokens. Approximate (the default): that
    map is the block's own attention (backbone), the block adds only v, attn @ v, proj and the MLP on the fused
    tokens, and the overhead is the similarity alone; it saves 2 T' d^2 + T'^2 d per fusing block. (Counted on CPU,
    where the precise block's log-size bias is a float mask: on CUDA its fold adds padded channels.)"""
    x = torch.randn(1, 3, 32, 48)
    t, d, heads, sim = 29, 32, 2, 12 * 12 * 32
    reps = {}
    for mode in ("precise", "approx"):
        model, _, _, _ = random_model("mctf", "lw_vit_test_p8", (32, 48), "r=6", num_classes=3,
                                      opts={"one_step_ahead": mode})
        reps[mode] = count_macs(model, x)
    assert reps["precise"].parts["overhead"] == 2 * t * d * d + heads * t * t * (d // heads) + sim
    assert reps["approx"].parts["overhead"] == sim
    tn, hd = t - 6, d // heads
    # saved in block 1: the q, k projection on the fused tokens and q k^T (attn @ v runs in both modes)
    saved = 2 * tn * d * d + heads * tn * tn * hd
    assert reps["precise"].macs - reps["approx"].macs == saved
    plain, _, _, _ = random_model("full", "lw_vit_test_p8", (32, 48), None, num_classes=3)
    assert reps["approx"].parts["backbone"] < count_macs(plain, x).parts["backbone"]


@pytest.mark.parametrize("mode", AHEAD_MODES)
def test_finetunes_with_the_task_loss(mode):
    """The encoder is differentiable through the fusion (finetuned regime): gradients reach every block, the q and k
    rows of ``qkv`` included (approximate mode: through the pooled attention map, as the official mode 1)."""
    vit, spec = make()
    enc = MCTF(spec, 6, one_step_ahead=mode).build(vit).train()
    out = enc(torch.randn(2, 3, 32, 48))
    (out.prefix[:, 0].sum() + out.patches.sum()).backward()
    for blk in enc.vit.blocks:
        g = blk.attn.qkv.weight.grad
        assert g is not None and torch.isfinite(g).all()
        assert g[: 2 * spec.embed_dim].abs().sum() > 0


def test_budget_and_option_errors():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)  # 35 patches
    MCTF(spec, 17)
    with pytest.raises(BudgetError, match=r"mctf.*valid: r=0\.\.17"):
        MCTF(spec, 18)
    with pytest.raises(BudgetError, match="valid"):
        MCTF(spec, -1)
    with pytest.raises(ConfigError, match="layers"):
        MCTF(spec, 2, layers="0,5")
    with pytest.raises(ConfigError, match="pooling"):
        MCTF(spec, 2, pooling="max")
    with pytest.raises(ConfigError, match="one_step_ahead"):
        MCTF(spec, 2, one_step_ahead="true")  # version 1's boolean: name the mode
    MCTF(BackboneSpec("vit_small_patch16_dinov3", (32, 32), 16, 2, 32, 2, 5, family="eva"), 1)  # RoPE: supported
    cls = get_method("mctf")
    assert cls is MCTF and cls.budget_key == "r" and cls.training == "none"
    grid = MCTF.budget_grid(spec)
    assert grid == [9, 17] and MCTF.default_budget(spec) in grid  # 1 fusing block: r = f * 35, capped at 17
    assert MCTF.budget_grid(BackboneSpec("deit_s", (224, 224), 16, 12, 384, 6, 1)) == [4, 9, 13, 16]
