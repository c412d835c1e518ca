"""SAINT (``saint``): known answers from the official algorithm (ArmenJeddi/saint ``ViT/saint/prune.py``
``saint_drop`` inside ``ViT/saint/patch/timm.py`` ``SaintBlock``) written out here with loops, on a CLS-only ViT (the
official layout) and on the DINOv2 layout (CLS + 4 registers, LayerScale); the graph's votes and scores by hand; the
official batch-mean rate and lwbench's per-image rate; the schedule's token counts; exactness at threshold=1; FLOPs
and budgets."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from _toy import cls_only_vit, make, recording_ctx

from lwbench.errors import BudgetError, ConfigError
from lwbench.flops_report import flops_report
from lwbench.method import BackboneSpec
from lwbench.methods._reduction import embed
from lwbench.methods.saint import Saint, SimilarityGraph, default_prune_layers
from lwbench.registry import get_method
from lwbench.tokens import densify
from lwbench.vit import all_positions, grid_of


# -- the official algorithm, written out ---------------------------------------------------------------------
def official_drop(metric, x, pos, protected, thr, k=5, gamma=10.0):
    """``saint_drop`` + its ``drop_func`` for a batch, one image and one A token at a time: ``metric`` ``(B, T, C)``
    (keys averaged over heads, whole sequence), ``x`` ``(B, T, D)``, ``pos`` a list per image of the patch tokens'
    cells. The rate is the batch mean of the votes, truncated; returns the new ``x``, cells and the rate."""
    bsz, t, _ = x.shape
    n = t - protected
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    votes, scores = [], []
    for b in range(bsz):
        unit = [metric[b, protected + i] / metric[b, protected + i].norm() for i in range(n)]
        v, sc = 0, []
        for i in a_idx:
            sims = [float((unit[i] * unit[j]).sum()) for j in b_idx]
            hits = [s for s in sims if s >= thr]
            v += len(hits) >= k
            if hits:
                sc.append(len(hits) * math.exp(gamma * (sum(hits) / len(hits) - thr)))
            else:
                sc.append(sum(sims) / len(sims))
        votes.append(v)
        scores.append(sc)
    r = int(sum(votes) / bsz)
    if r <= 0:
        return x, pos, 0
    rows, cells = [], []
    for b in range(bsz):
        ranked = sorted(range(len(a_idx)), key=lambda a: -scores[b][a])  # most redundant first (stable)
        order = [a_idx[a] for a in ranked[r:]] + b_idx  # [kept A in ranked order, B]
        rows.append(torch.cat([x[b, :protected], x[b, [protected + i for i in order]]]))
        cells.append([pos[b][i] for i in order])
    return torch.stack(rows), cells, r


def official_forward(vit, x, layers, thr, protected, k=5, gamma=10.0):
    """``SaintBlock.forward`` with ``SaintAttention`` (attention by hand, keys averaged over heads) in every block,
    the drop in ``layers``; the final norm. Returns the tokens, the patch tokens' cells and the rate per block."""
    h = embed(vit, x)
    n = h.shape[1] - protected
    pos = [list(range(n)) for _ in range(x.shape[0])]
    rates = []
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        bsz, t, c = h.shape
        qkv = a.qkv(blk.norm1(h)).reshape(bsz, t, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ kk.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        y = a.proj((att @ v).transpose(1, 2).reshape(bsz, t, c))
        h = h + blk.ls1(y)
        if i in layers:
            h, pos, r = official_drop(kk.mean(1), h, pos, protected, thr, k, gamma)
            rates.append(r)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return vit.norm(h), pos, rates


def _cases():
    vit, spec = cls_only_vit()  # CLS only: the official layout
    dino, dspec = make("lw_vit_test_p8", (40, 56))  # CLS + 4 registers, LayerScale (all protected here)
    return {"cls_only": (vit, spec), "dinov2_layout": (dino, dspec)}


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_batch_rate_equals_the_official_algorithm(case):
    """``rate=batch``: the official batch-mean rate, the same tokens dropped, in the official order, and the same
    outputs as the written-out official forward (attention by hand there, fused here: float noise)."""
    vit, spec = CASES[case]
    p = spec.num_prefix
    torch.manual_seed(1)
    x = torch.randn(4, 3, *spec.img_size)
    layers = [0, 1]
    with torch.no_grad():
        out = Saint(spec, 0.3, prune_layers=layers, rate="batch").build(vit).eval()(x)
        ref, cells, rates = official_forward(vit, x, layers, 0.3, p)
    assert all(r > 0 for r in rates), rates  # the case exercises dropping in both blocks
    n = spec.num_patches
    assert out.aux["tokens_per_layer"][0].tolist()[:2] == [n - rates[0], n - rates[0] - rates[1]]
    assert out.mask is None and out.positions.tolist() == cells
    assert (out.patches - ref[:, p:]).abs().max().item() < 1e-5
    assert (out.prefix - ref[:, :p]).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_image_rate_is_the_official_algorithm_one_image_at_a_time(case):
    """``rate=image`` (the default): each image of a batch as the official code treats it alone (batch size 1),
    padding after its real tokens, masked and zeroed."""
    vit, spec = CASES[case]
    p = spec.num_prefix
    torch.manual_seed(1)
    x = torch.randn(4, 3, *spec.img_size)
    layers = [0, 1]
    with torch.no_grad():
        out = Saint(spec, 0.3, prune_layers=layers).build(vit).eval()(x)
    kept = out.aux["tokens_per_layer"][:, -1]
    assert len(set(kept.tolist())) > 1  # images keep different numbers of tokens
    assert out.mask is not None and out.mask.sum(1).tolist() == kept.tolist()
    worst = 0.0
    for b in range(x.shape[0]):
        with torch.no_grad():
            ref, cells, rates = official_forward(vit, x[b : b + 1], layers, 0.3, p)
        m = int(kept[b])
        assert out.positions[b, :m].tolist() == cells[0] and (out.positions[b, m:] == -1).all()
        assert (out.patches[b, m:] == 0).all()
        worst = max(worst, (out.patches[b, :m] - ref[0, p:]).abs().max().item(),
                    (out.prefix[b] - ref[0, :p]).abs().max().item())
    assert worst < 1e-5, worst


def test_graph_votes_and_scores_by_hand():
    """Four patch tokens in 2-D: A = 0, 2; B = 1, 3. Token 0 points along B's keys (cosines 1 and 0.8), token 2 is
    orthogonal to both; with K = 2 and threshold 0.75, token 0 has two valid edges, votes and is dropped; its score is
    2 * exp(gamma * (0.9 - 0.75)); token 2 has none and scores the mean of its cosines."""
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, -1.0], [0.8, 0.6]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    plan = SimilarityGraph(0.75, k=2, gamma=10.0)(metric, valid)
    assert plan.votes.tolist() == [1] and plan.dropped.tolist() == [1]
    assert plan.scores[0, 0].item() == pytest.approx(2 * math.exp(10.0 * (0.9 - 0.75)), rel=1e-5)
    assert plan.scores[0, 1].item() == pytest.approx((0.0 - 0.6) / 2, abs=1e-6)
    assert plan.index.tolist() == [[2, 1, 3]]  # [kept A, B]
    # K = 3 > |B|: nobody votes, nothing is dropped and the order is left alone
    plan = SimilarityGraph(0.75, k=3)(metric, valid)
    assert plan.index.tolist() == [[0, 1, 2, 3]] and plan.dropped.tolist() == [0]
    # gamma is honoured (the official patch never passes its --gamma through): gamma = 0 scores the count alone
    assert SimilarityGraph(0.75, k=2, gamma=0.0)(metric, valid).scores[0, 0].item() == pytest.approx(2.0)


def test_batch_rate_is_the_truncated_mean_of_the_votes():
    """Image 0 has 2 voters of 2 A tokens, image 1 one: per image they drop 2 and 1, the official rate int(1.5) = 1."""
    e = torch.eye(3)
    img0 = torch.stack([e[0], e[0], e[0], e[0]])  # every cosine 1
    img1 = torch.stack([e[0], e[0], e[1], e[0]])  # token 2 orthogonal to B
    metric = torch.stack([img0, img1])
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert SimilarityGraph(0.5, k=2)(metric, valid).dropped.tolist() == [2, 1]
    plan = SimilarityGraph(0.5, k=2, rate="batch")(metric, valid)
    assert plan.votes.tolist() == [2, 1] and plan.dropped.tolist() == [1, 1]
    assert plan.valid.all() and plan.index.shape == (2, 3)


def test_padding_has_no_edges_and_no_votes():
    """A padded token is in no edge, no mean and never ranked before a real one."""
    e = torch.eye(3)
    metric = torch.stack([e[0], e[0], e[1], e[1], e[0], e[0]])[None]  # tokens 4, 5 are padding
    valid = torch.tensor([[True, True, True, True, False, False]])
    plan = SimilarityGraph(0.5, k=1)(metric, valid)
    assert plan.votes.tolist() == [2] and plan.dropped.tolist() == [2]  # A = 0, 2 each match their B; 4 is padding
    assert plan.scores[0, 2].item() == float("-inf")
    assert plan.index.tolist() == [[1, 3]] and plan.valid.tolist() == [[True, True]]


# -- schedule and exactness ----------------------------------------------------------------------------------
def test_default_layers_are_the_first_half():
    assert default_prune_layers(12) == [0, 1, 2, 3, 4, 5]
    assert default_prune_layers(4) == [0, 1] and default_prune_layers(1) == [0]
    vit, spec = make("lw_vit_test_p8", (40, 56))
    assert Saint(spec, 0.75).prune_layers() == [0]  # 2 blocks
    assert Saint(spec, 0.75, prune_layers="0,1").prune_layers() == [0, 1]


def test_tokens_per_layer_when_every_edge_is_valid():
    """threshold=-1: every edge is valid, so every A token votes while |B| >= K and all of A is dropped. 35 patches on
    6 blocks, dropping in blocks 0-2: 35 -> 17 (A 18 dropped) -> 8 (A 9 of 17 dropped, B 8 >= 5) -> 8 (B 4 < 5)."""
    vit = make("lw_vit_test_p8", (40, 56))[0]
    vit.blocks = torch.nn.Sequential(*[vit.blocks[i % 2] for i in range(6)])
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    assert Saint(spec, -1.0).prune_layers() == [0, 1, 2]
    with torch.no_grad():
        out = Saint(spec, -1.0).build(vit).eval()(torch.randn(2, 3, 40, 56))
    assert out.aux["tokens_per_layer"].tolist() == [[17, 8, 8, 8, 8, 8]] * 2
    assert out.patches.shape[1] == 8 and out.mask is None


@pytest.mark.parametrize("case", list(CASES))
def test_threshold_one_is_the_backbone(case):
    vit, spec = CASES[case]
    x = torch.randn(2, 3, *spec.img_size)
    with torch.no_grad():
        out = get_method("saint")(spec, Saint.noop_budget(spec)).build(vit).eval()(x)
        ref = vit.forward_features(x)
    p = spec.num_prefix
    assert torch.equal(out.prefix, ref[:, :p]) and torch.equal(out.patches, ref[:, p:])
    assert torch.equal(out.positions, all_positions(2, grid_of(vit, x), x.device)) and out.mask is None


def test_dense_output_fills_dropped_cells():
    vit, spec = CASES["dinov2_layout"]
    with torch.no_grad():
        out = Saint(spec, 0.3, prune_layers=[0, 1]).build(vit).eval()(torch.randn(2, 3, *spec.img_size))
        dense = densify(out)
    assert dense.shape == (2, spec.num_patches, spec.embed_dim) and torch.isfinite(dense).all()


@pytest.mark.parametrize("name,size", [("vit_small_patch16_dinov3", (32, 48)), ("eva02_tiny_patch14_224", (28, 42))])
def test_rope_backbones_run(name, size):
    """RoPE ``Eva`` backbones: tokens are dropped (keys before the rotation), the no-op is the backbone."""
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, depth=2).eval()
    spec = BackboneSpec.of(vit, name, size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = Saint(spec, -1.0, k=1).build(vit).eval()(x)
        ref = Saint(spec, 1.0).build(vit).eval()(x)
        full = vit.forward_features(x)
    assert out.patches.shape[1] < spec.num_patches and torch.isfinite(out.patches).all()
    assert torch.equal(ref.patches, full[:, spec.num_prefix :])


# -- FLOPs, budgets, regimes ---------------------------------------------------------------------------------
def test_flops_fall_with_the_threshold_and_the_graph_is_overhead():
    d_full = flops_report("saint", "lw_vit_test_p8", (40, 56), budget="threshold=1", num_classes=3)
    d_low = flops_report("saint", "lw_vit_test_p8", (40, 56), budget="threshold=-1", num_classes=3)
    assert d_full["parts_gmacs"]["overhead"] == 0
    assert d_low["parts_gmacs"]["overhead"] > 0 and d_low["gmacs"] < d_full["gmacs"]
    assert math.isclose(sum(d_low["parts_gmacs"].values()), d_low["gmacs"], rel_tol=1e-9)


@pytest.mark.parametrize("value", [1.5, -1.5, float("nan"), float("inf")])
def test_impossible_thresholds_raise(value):
    _, spec = CASES["cls_only"]
    with pytest.raises(BudgetError):
        Saint(spec, value)


@pytest.mark.parametrize("opts", [{"prune_layers": "0,7"}, {"prune_layers": [-1]}, {"k": 0}, {"rate": "layer"}])
def test_bad_options_raise(opts):
    _, spec = CASES["cls_only"]
    with pytest.raises(ConfigError):
        Saint(spec, 0.75, **opts)


def test_defaults():
    spec = CASES["cls_only"][1]
    assert Saint(spec).budget == 0.75 and Saint.budget_grid(spec) == [0.6, 0.75, 0.9]
    assert Saint.training_free and Saint.plot_style() == ("#6a3d9a", r"$\bigstar$")


@pytest.mark.parametrize("regime", ["off_the_shelf", "finetuned"])
def test_fit_follows_the_regime(regime):
    vit, spec = CASES["cls_only"]
    calls = []
    Saint(spec, 0.75).fit(recording_ctx(vit, regime, calls))
    assert calls == ([] if regime == "off_the_shelf" else [("saint-threshold=0.75-finetune", True)])
