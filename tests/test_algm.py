"""ALGM: window similarity and the adaptive threshold by hand, local merging only inside a window, global merging
at its threshold, the official algorithm written out naively (one image at a time) on a CLS-only ViT, un-merging,
sizes, prefix tokens, per-image independence of a padded batch, budgets, threshold=1 = the plain backbone."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import BACKBONE_CASES, make
from timm.models.vision_transformer import VisionTransformer

from lwbench.errors import BudgetError, ConfigError
from lwbench.method import BackboneSpec
from lwbench.methods.algm import (
    ALGM,
    GlobalMerger,
    LocalMerger,
    adaptive_threshold,
    default_global_block,
    window_cells,
    window_similarity,
)
from lwbench.registry import get_method
from lwbench.tokens import densify


def _local(x, grid, threshold):
    """LocalMerger on ``(B, N, D)`` tokens in grid order, sizes 1."""
    b, n, _ = x.shape
    pos = torch.arange(n).expand(b, -1).clone()
    return LocalMerger(threshold, 2)(x, torch.ones(b, n, 1), pos, pos.clone(), grid)


# -- local merging ----------------------------------------------------------------------------------------------
def test_window_cells_tile_the_grid_row_major():
    cells = window_cells((4, 6), 2)
    assert cells.tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11],
                              [12, 13, 18, 19], [14, 15, 20, 21], [16, 17, 22, 23]]
    assert window_cells((3, 5), 2).tolist() == [[0, 1, 5, 6], [2, 3, 7, 8]]  # the leftover row/column: no window
    assert window_cells((1, 5), 2).shape == (0, 4)


def test_window_similarity_by_hand():
    """Window tokens e0, e0, e1, e1: of the 6 pairs, two have cos 1 and four cos 0, mean 1/3. Identical tokens: 1.
    e0, -e0, e0, -e0: two pairs at +1, four at -1, mean -1/3."""
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    cells = torch.tensor([[0, 1, 2, 3]])
    for toks, want in (([e0, e0, e1, e1], 1 / 3), ([e1, e1, e1, e1], 1.0), ([e0, -e0, e0, -e0], -1 / 3)):
        sim = window_similarity(torch.stack(toks)[None] * 2.5, cells)
        torch.testing.assert_close(sim, torch.tensor([[want]]))


def test_identical_tokens_in_different_windows_never_merge_locally():
    """2 x 4 grid, windows {0, 1, 4, 5} and {2, 3, 6, 7}. Cells 1 and 2 hold the same token but sit in different
    windows whose other tokens are orthogonal: neither window reaches the threshold, nothing merges."""
    e = torch.eye(8)
    x = torch.stack([e[0], e[5], e[5], e[3], e[4], e[1], e[6], e[7]])[None]
    new_x, size, pos, assign, valid = _local(x, (2, 4), 0.5)
    assert torch.equal(new_x, x) and assign.tolist() == [list(range(8))] and size.flatten().tolist() == [1.0] * 8
    assert bool(valid.all()) and pos.tolist() == [list(range(8))]


def test_identical_tokens_in_one_window_merge_into_its_mean_at_the_last_cell():
    """Window 0 = four copies of one direction (different lengths: cos 1): it becomes one token, the mean of its
    cells, at its last (bottom-right) cell 5, first in the new order; window 1 (orthogonal tokens) stays."""
    e = torch.eye(8)
    x = torch.stack([e[0], 2 * e[0], e[2], e[3], 3 * e[0], 4 * e[0], e[6], e[7]])[None]
    new_x, size, pos, assign, valid = _local(x, (2, 4), 0.99)
    assert new_x.shape[1] == 5 and bool(valid.all())
    torch.testing.assert_close(new_x[0, 0], 2.5 * e[0])
    assert torch.equal(new_x[0, 1:], x[0, [2, 3, 6, 7]])  # the unmerged cells, grid order
    assert size.flatten().tolist() == [4.0, 1.0, 1.0, 1.0, 1.0]
    assert pos.tolist() == [[5, 2, 3, 6, 7]]
    assert assign.tolist() == [[0, 0, 1, 2, 0, 0, 3, 4]]


def test_merged_windows_come_first_by_descending_similarity():
    """Official order: ``cat([dst, unm])`` after ``topk``: the most similar merged window first."""
    torch.manual_seed(0)
    e = torch.eye(8)
    w0 = torch.stack([e[0], e[0], e[0], e[0] + 0.3 * e[1]])  # similar, not identical
    w1 = torch.stack([e[2], e[2], e[2], e[2]])  # identical: similarity 1
    x = torch.zeros(1, 8, 8)
    x[0, [0, 1, 4, 5]] = w0
    x[0, [2, 3, 6, 7]] = w1
    new_x, size, pos, assign, _ = _local(x, (2, 4), 0.9)
    assert pos.tolist() == [[7, 5]] and assign.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    torch.testing.assert_close(new_x[0, 0], e[2])
    torch.testing.assert_close(new_x[0, 1], w0.mean(0))


def test_local_counts_differ_per_image_and_pad():
    e = torch.eye(8)
    same = torch.stack([e[0]] * 8)  # both windows merge
    diff = e  # nothing merges
    new_x, size, pos, assign, valid = _local(torch.stack([same, diff]), (2, 4), 0.9)
    assert valid.tolist() == [[True, True] + [False] * 6, [True] * 8]
    assert pos[0, 2:].tolist() == [-1] * 6 and bool((new_x[0, 2:] == 0).all()) and bool((size[0, 2:] == 0).all())
    assert assign[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


# -- global merging ---------------------------------------------------------------------------------------------
def test_adaptive_threshold_by_hand():
    """s = [0.9, 0.5, 0.7, 0.3]: mean 0.6, unbiased std sqrt(0.2 / 3) = 0.2582, l = 5: tau = 0.6 + 0.2582 / 5 =
    0.65164; the padded (not ok) entry is ignored."""
    s = torch.tensor([[0.9, 0.5, 0.7, 0.3, 0.99]])
    ok = torch.tensor([[True, True, True, True, False]])
    thr = adaptive_threshold(s, ok, 5)
    want = 0.6 + math.sqrt(0.2 / 3) / 5
    torch.testing.assert_close(thr, torch.tensor([want]))
    assert want == pytest.approx(0.65164, abs=1e-5)
    torch.testing.assert_close(thr, s[:, :4].mean(1) + s[:, :4].std(1) / 5)  # the official torch.mean/std
    assert torch.isnan(adaptive_threshold(s, torch.tensor([[True] + [False] * 4]), 5)).all()  # one entry: none


def test_global_merging_respects_its_threshold():
    """a_offset 0: A = tokens 0, 2, 4, 6; B = 1, 3, 5, 7. Best cosines of A: 1, 0.8, 0.6, 0 -> mean 0.6, std
    0.4320, l = 2: tau = 0.816: only token 0 (cos 1) merges, into token 1; token 2 (0.8) stays."""
    e = torch.eye(4)
    b0, b1 = e[0], e[1]
    a = [b0, 0.8 * b1 + 0.6 * e[2], 0.6 * b1 + 0.8 * e[2], e[3]]  # e3: orthogonal to every B token
    toks = torch.stack([a[0], b0, a[1], b1, a[2], b0, a[3], b1])[None]
    valid = torch.ones(1, 8, dtype=torch.bool)
    merger = GlobalMerger(layer=2, a_offset=0)
    dest, keep, n_out, node_max, thr, merge_a = merger.plan(toks, valid)
    torch.testing.assert_close(node_max, torch.tensor([[1.0, 0.8, 0.6, 0.0]]))
    s = torch.tensor([1.0, 0.8, 0.6, 0.0])
    torch.testing.assert_close(thr, (s.mean() + s.std() / 2)[None])
    assert float(thr) == pytest.approx(0.6 + math.sqrt(0.56 / 3) / 2, abs=1e-6)
    assert merge_a.tolist() == [[True, False, False, False]] and int(n_out) == 7
    x = toks * torch.arange(1.0, 9.0)[None, :, None]  # lengths do not change the cosines
    pos = torch.arange(8)[None]
    new_x, size, new_pos, assign, v = merger(x, torch.ones(1, 8, 1), pos, pos.clone(), valid)
    # [unmerged A (2, 4, 6), B (1 absorbing 0, 3, 5, 7)]
    want = torch.stack([x[0, 2], x[0, 4], x[0, 6], (x[0, 0] + x[0, 1]) / 2, x[0, 3], x[0, 5], x[0, 7]])
    torch.testing.assert_close(new_x[0], want)
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    assert new_pos.tolist() == [[2, 4, 6, 1, 3, 5, 7]]
    assert assign.tolist() == [[3, 3, 0, 4, 1, 5, 2, 6]]


def test_global_merging_ignores_padding():
    """Padding is never merged, never a partner, and not in the statistics: the padded image gives the same merge
    as the same tokens alone."""
    torch.manual_seed(0)
    toks = torch.randn(1, 9, 6)
    merger = GlobalMerger(layer=5, a_offset=1)
    alone = merger.plan(toks, torch.ones(1, 9, dtype=torch.bool))
    padded = torch.cat([toks, torch.randn(1, 4, 6)], dim=1)
    valid = torch.tensor([[True] * 9 + [False] * 4])
    pad = merger.plan(padded, valid)
    assert int(pad[2]) == int(alone[2])
    assert torch.equal(pad[0][:, :9], alone[0]) and bool((pad[0][:, 9:] >= int(pad[2])).all())
    torch.testing.assert_close(pad[4], alone[4])


# -- the whole method ---------------------------------------------------------------------------------------------
def _naive_official(vit: VisionTransformer, img: torch.Tensor, tau: float, blocks: tuple[int, int]) -> torch.Tensor:
    """The official algorithm for one image on a CLS-only ViT, written out with loops: ``(N, D)`` final tokens per
    grid cell (each cell gets the token that absorbed it, as the official decoders index ``source``)."""
    gh, gw = vit.patch_embed.grid_size
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))[0]  # (1 + N, C)
    size = [1.0] * h.shape[0]
    src = [set()] + [{c} for c in range(gh * gw)]  # cells of every token (CLS: none)
    for i, blk in enumerate(vit.blocks):
        h = h + blk.ls1(blk.attn(blk.norm1(h[None]))[0])
        if i == blocks[0]:
            wins, sims = [], []
            for wr in range(gh // 2):
                for wc in range(gw // 2):
                    cells = [(2 * wr + a) * gw + 2 * wc + b for a in range(2) for b in range(2)]
                    t = torch.nn.functional.normalize(h[[1 + c for c in cells]], dim=-1)
                    s = sum(float(t[p] @ t[q]) for p in range(4) for q in range(4) if p != q) / 12
                    wins.append(cells)
                    sims.append(s)
            merged = sorted([w for w in range(len(wins)) if sims[w] >= tau], key=lambda w: -sims[w])
            gone = {c for w in merged for c in wins[w]}
            toks = [h[0]] + [h[[1 + c for c in wins[w]]].mean(0) for w in merged]
            toks += [h[1 + c] for c in range(gh * gw) if c not in gone]
            src = [set()] + [set(wins[w]) for w in merged] + [{c} for c in range(gh * gw) if c not in gone]
            size = [1.0] + [4.0] * len(merged) + [1.0] * (len(src) - 1 - len(merged))
            h = torch.stack(toks)
        elif i == blocks[1]:
            t = h.shape[0]
            m = torch.nn.functional.normalize(h, dim=-1)
            ia, ib = list(range(0, t, 2)), list(range(1, t, 2))
            best = {}
            for a in ia[1:]:  # index 0 = CLS, never merged (its scores are -inf)
                sims = [float(m[a] @ m[b]) for b in ib]
                j = max(range(len(ib)), key=lambda n: sims[n])
                best[a] = (sims[j], ib[j])
            s = torch.tensor([best[a][0] for a in ia[1:]])
            thr = float(s.mean() + s.std() / (blocks[1] + 1))
            merged = {a: best[a][1] for a in best if best[a][0] >= thr}
            wx = {k: h[k] * size[k] for k in range(t)}
            ws, cells = dict(enumerate(size)), {k: set(src[k]) for k in range(t)}
            for a, b in merged.items():
                wx[b] = wx[b] + h[a] * size[a]
                ws[b] += size[a]
                cells[b] |= cells[a]
            keep = [a for a in ia if a not in merged] + ib
            h = torch.stack([wx[k] / ws[k] for k in keep])
            size, src = [ws[k] for k in keep], [cells[k] for k in keep]
        h = h + blk.ls2(blk.mlp(blk.norm2(h[None])))[0]
    h = vit.norm(h)
    dense = torch.empty(gh * gw, h.shape[1])
    for k in range(1, h.shape[0]):
        for c in src[k]:
            dense[c] = h[k]
    return dense, h[0]


def _cls_only_vit():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=(48, 56), patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                            num_classes=0, init_values=0.5).eval()
    return vit, BackboneSpec.of(vit, "cls_only", (48, 56))


def test_matches_official_algorithm_one_image_at_a_time():
    """On a 6 x 7 grid (a leftover column), CLS only, LayerScale: a batch of three images, each equal to the
    naive official algorithm run on it alone (batch size 1, where the official batch-min counts are the image's)."""
    vit, spec = _cls_only_vit()
    x = torch.randn(3, 3, 48, 56, generator=torch.Generator().manual_seed(1))
    # a threshold that merges some windows of image 0, not all
    with torch.no_grad():
        h = vit._pos_embed(vit.patch_embed(x[:1]))
        h = h + vit.blocks[0].ls1(vit.blocks[0].attn(vit.blocks[0].norm1(h)))
        sims = window_similarity(h[:, 1:], window_cells((6, 7), 2))[0].sort().values
        tau = float(sims[4] + sims[5]) / 2  # halfway between two windows' similarities: no tie at the threshold
        m = ALGM(spec, tau, global_block=2)
        assert m.merge_blocks() == (0, 2)
        out = m.build(vit).eval()(x)
        dense = densify(out)
        counts = out.aux["tokens_per_layer"]
        for i in range(3):
            ref_dense, ref_cls = _naive_official(vit, x[i], tau, (0, 2))
            torch.testing.assert_close(dense[i], ref_dense, atol=2e-5, rtol=0)
            torch.testing.assert_close(out.prefix[i, 0], ref_cls, atol=2e-5, rtol=0)
    assert counts[0, 0] < 42 and counts[0, 2] < counts[0, 0]  # both stages merged in image 0
    assert out.mask is not None and not bool(out.mask.all())  # the images kept different numbers: padding tested


@pytest.mark.parametrize("name,size", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
def test_unmerged_dense_output_sizes_and_prefix(name, size):
    vit, spec = make(name, size)
    n, p = spec.num_patches, spec.num_prefix
    with torch.no_grad():
        out = ALGM(spec, -1.0).build(vit).eval()(torch.randn(2, 3, *size))  # every window merges
    m = out.patches.shape[1]
    assert out.prefix.shape == (2, p, spec.embed_dim)  # CLS and registers: all there, never merged
    a = out.assignment
    assert a.shape == (2, n) and a.min() >= 0 and a.max() < m
    valid = out.mask if out.mask is not None else torch.ones(2, m, dtype=torch.bool)
    assert (out.sizes.sum(1) == n).all()  # the cells are partitioned among the tokens
    assert bool((out.sizes[valid] >= 1).all()) and bool((out.sizes[~valid] == 0).all())
    assert torch.equal(a.gather(1, out.positions.clamp(min=0))[valid], torch.arange(m).expand(2, -1)[valid])
    dense = densify(out)
    assert torch.equal(dense, torch.gather(out.patches, 1, a.unsqueeze(-1).expand(-1, -1, spec.embed_dim)))
    assert (out.aux["tokens_per_layer"][:, 0] <= n - 3 * ((size[0] // spec.patch // 2) * (size[1] // spec.patch // 2))
            ).all()  # threshold -1: every 2x2 window merged in the first block


def test_a_batch_gives_each_image_its_own_result():
    """Padding never leaks: each image of a padded batch equals the image alone (to float tolerance)."""
    vit, spec = make("lw_vit_test_p8", (40, 56))
    x = torch.randn(3, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    enc = ALGM(spec, 0.0).build(vit).eval()
    with torch.no_grad():
        out = enc(x)
        dense = densify(out)
        assert out.mask is not None and not bool(out.mask.all())  # images kept different numbers of tokens
        for i in range(3):
            one = enc(x[i : i + 1])
            torch.testing.assert_close(dense[i : i + 1], densify(one), atol=1e-5, rtol=0)
            torch.testing.assert_close(out.prefix[i : i + 1], one.prefix, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,size", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
def test_threshold_one_is_the_plain_backbone(name, size):
    vit, spec = make(name, size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vit.forward_features(x)
        out = get_method("algm")(spec, 1.0).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert out.mask is None and out.aux["tokens_per_layer"].tolist() == [[spec.num_patches] * spec.depth] * 2


def test_proportional_attention_option_runs_and_changes_the_result():
    vit, spec = make("lw_vit_test_p8", (40, 56))
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        off = ALGM(spec, -1.0).build(vit).eval()(x)
        on = ALGM(spec, -1.0, prop_attn=True).build(vit).eval()(x)
    assert torch.isfinite(on.patches).all() and not torch.allclose(on.prefix, off.prefix)


def test_blocks_and_budgets():
    assert default_global_block(12) == 4 and default_global_block(24) == 6  # --selected-layers 1 5 / 1 7
    assert default_global_block(4) == 1 and default_global_block(6) == 2 and default_global_block(1) is None
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)
    assert ALGM(spec).budget == 0.88 and ALGM(spec).merge_blocks() == (0, 1)
    for ok in (-1.0, 0.5, 1.0):
        ALGM(spec, ok)
    for bad in (1.01, -1.5):
        with pytest.raises(BudgetError, match=r"algm: .*valid: threshold in \[-1, 1\]"):
            ALGM(spec, bad)
    with pytest.raises(ConfigError, match="global_block"):
        ALGM(spec, 0.9, global_block=2)
    with pytest.raises(ConfigError, match="local_block"):
        ALGM(spec, 0.9, local_block=2)
    one = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 1, 32, 2, 5)
    assert ALGM(one, 0.9).merge_blocks() == (0, None)  # one block: local merging only


# (timm name, image size): RoPE (Eva: DINOv3, EVA-02) and no class token (SigLIP, no prefix at all)
OTHER_FAMILIES = [("vit_small_patch16_dinov3", (64, 96)), ("eva02_tiny_patch14_224", (56, 84)),
                  ("vit_base_patch16_siglip_224", (64, 96))]


@pytest.mark.parametrize("name,size", OTHER_FAMILIES, ids=[n for n, _ in OTHER_FAMILIES])
@torch.no_grad()
def test_other_families_noop_and_merging(name, size):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, depth=2, embed_dim=64,
                            num_heads=2).eval()
    for prm in vit.parameters():
        prm.normal_(0.0, 0.3)
    spec = BackboneSpec.of(vit, name, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    plain = get_method("algm")(spec, 1.0).build(vit).eval()(x)
    ref = vit.forward_features(x)
    assert torch.equal(torch.cat([plain.prefix, plain.patches], 1), ref)
    enc = get_method("algm")(spec, -1.0).build(vit).eval()
    out = enc(x)
    assert out.prefix.shape[1] == spec.num_prefix and torch.isfinite(out.patches).all()
    assert (out.sizes.sum(1) == spec.num_patches).all() and out.patches.shape[1] < spec.num_patches
    for i in range(2):  # padding and merged tokens' RoPE cells: each image as alone
        torch.testing.assert_close(densify(out)[i : i + 1], densify(enc(x[i : i + 1])), atol=1e-4, rtol=1e-4)
