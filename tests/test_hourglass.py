"""Hourglass (token clustering + reconstruction): the clustering layer and the reconstruction layer against the
official algorithms written out with loops (float64), the whole method against the official forward on a CLS-only
ViT, k = all patches = the plain backbone, token counts per layer, the dense output, budgets and options, MACs."""

from __future__ import annotations

import math

import pytest
import torch
from _toy import BACKBONE_CASES, cls_only_vit, make

from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import ClassifierHead, LinearSegHead, TaskModel
from lwbench.measure.flops import closed_form_vit_macs, count_macs
from lwbench.method import BackboneSpec
from lwbench.methods.hourglass import (
    Hourglass,
    HourglassOutput,
    TokenClustering,
    TokenReconstruction,
    cluster_cells,
    cluster_grid,
    default_alpha,
    initial_labels,
    side_grid,
    window_mask,
)
from lwbench.registry import get_method
from lwbench.tokens import densify


# -- the official operators, written out ---------------------------------------------------------------------------
def _official_clustering(x: torch.Tensor, grid, cgrid, iters: int, t: float, window: int) -> torch.Tensor:
    """``TokenClusteringBlock.forward`` for one image, ``(N, C)`` tokens -> ``(M, C)`` centres, with loops in float64:
    adaptive-average-pooling bins (rows ``floor(i H / h)`` to ``ceil((i + 1) H / h)``), nearest labels
    (``floor(r h / H)``), the local window on the cluster grid, softmax over each token's window, weighted means."""
    x = x.double()
    (gh, gw), (h, w) = grid, cgrid
    n, m, r = gh * gw, h * w, window // 2
    cent = []
    for i in range(h):
        r0, r1 = (i * gh) // h, -((-(i + 1) * gh) // h)
        for j in range(w):
            c0, c1 = (j * gw) // w, -((-(j + 1) * gw) // w)
            cent.append(x[[a * gw + b for a in range(r0, r1) for b in range(c0, c1)]].mean(0))
    label = [((a * h) // gh) * w + (b * w) // gw for a in range(gh) for b in range(gw)]
    near = [[mm for mm in range(m) if abs(label[nn] % w - mm % w) <= r and abs(label[nn] // w - mm // w) <= r]
            for nn in range(n)]
    for _ in range(iters):
        aff = [[0.0] * n for _ in range(m)]
        for nn in range(n):
            logit = {mm: -t * float(((x[nn] - cent[mm]) ** 2).sum()) for mm in near[nn]}
            top = max(logit.values())
            z = sum(math.exp(v - top) for v in logit.values())
            for mm, v in logit.items():
                aff[mm][nn] = math.exp(v - top) / z
        cent = [sum(aff[mm][nn] * x[nn] for nn in range(n)) / max(sum(aff[mm]), 1e-16) for mm in range(m)]
    return torch.stack(cent)


def _official_reconstruction(z: torch.Tensor, f: torch.Tensor, c: torch.Tensor, k: int, t: float,
                             normalize: str = "l2") -> torch.Tensor:
    """``TokenReconstructionBlock._forward`` for one image with loops in float64: ``w = exp(-t ||f_n - c_m||^2)``,
    kept where ``>=`` the k-th largest of the row, L2-normalised (``F.normalize``; ``l1``: summing to 1), ``sum_m w
    z_m``."""
    z, f, c = z.double(), f.double(), c.double()
    out = []
    for n in range(f.shape[0]):
        wts = [math.exp(-t * float(((f[n] - c[m]) ** 2).sum())) for m in range(c.shape[0])]
        kth = sorted(wts, reverse=True)[min(k, len(wts)) - 1]
        wts = [v if v >= kth else 0.0 for v in wts]
        s = max(math.sqrt(sum(v * v for v in wts)), 1e-12) if normalize == "l2" else sum(wts)  # F.normalize's eps
        out.append(sum(v / s * z[m] for m, v in enumerate(wts)))
    return torch.stack(out)


def test_initial_labels_and_window_by_hand():
    """5 x 7 tokens, 3 x 4 clusters: nearest labels as the exact ``floor(r h / H)``; cluster cells at the centres of
    the pooling bins; window 1 is each token's own initial cluster only, window 5 on a 2 x 2 grid is every cluster."""
    lab = initial_labels((5, 7), (3, 4))
    assert lab.tolist() == [((a * 3) // 5) * 4 + (b * 4) // 7 for a in range(5) for b in range(7)]
    for grid, cgrid in (((5, 7), (3, 4)), ((37, 37), (26, 26)), ((15, 20), (11, 14)), ((40, 40), (28, 28)),
                        ((36, 48), (25, 34)), ((6, 8), (6, 8)), ((4, 6), (2, 3))):  # F.interpolate, the official call
        labels = torch.arange(cgrid[0] * cgrid[1], dtype=torch.float32).reshape(1, 1, *cgrid)
        want = torch.nn.functional.interpolate(labels, size=grid, mode="nearest").flatten().long()
        assert torch.equal(initial_labels(grid, cgrid), want), (grid, cgrid)
    assert cluster_cells((5, 7), (3, 4)).tolist() == [0, 2, 4, 6, 14, 16, 18, 20, 28, 30, 32, 34]
    assert cluster_cells((5, 7), (5, 7)).tolist() == list(range(35))
    one = window_mask((5, 7), (3, 4), 1)
    assert torch.equal(one, torch.nn.functional.one_hot(lab, 12).T.bool())
    assert bool(window_mask((4, 4), (2, 2), 5).all())
    three = window_mask((6, 6), (3, 3), 3)  # a token of the corner cluster 0 may join clusters 0, 1, 3, 4
    assert three[:, 0].nonzero().flatten().tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("grid,cgrid,window", [((5, 7), (3, 4), 5), ((6, 8), (3, 4), 3), ((5, 7), (2, 3), 1)])
def test_clustering_matches_the_official_loop(grid, cgrid, window):
    n = grid[0] * grid[1]
    x = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(0)) * 1.5
    t = 0.1  # t * d ~ 1 for these tokens: soft affinities, not a hard assignment
    got = TokenClustering(iters=3, temperature=t, window=window)(x, grid, cgrid)
    assert got.shape == (2, cgrid[0] * cgrid[1], 8)
    for b in range(2):
        ref = _official_clustering(x[b], grid, cgrid, 3, t, window)
        torch.testing.assert_close(got[b].double(), ref, atol=2e-5, rtol=1e-5)


def test_clustering_zero_iterations_is_adaptive_average_pooling():
    x = torch.randn(1, 35, 4, generator=torch.Generator().manual_seed(1))
    got = TokenClustering(iters=0)(x, (5, 7), (3, 4))
    torch.testing.assert_close(got[0].double(), _official_clustering(x[0], (5, 7), (3, 4), 0, 1.0, 5), atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("normalize", ["l2", "l1"])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_reconstruction_matches_the_official_loop(k, normalize):
    g = torch.Generator().manual_seed(2)
    f, c, z = torch.randn(2, 10, 6, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 7, generator=g)
    t = 0.2
    got, labels = TokenReconstruction(k, t, normalize)(z, f, c)
    assert got.shape == (2, 10, 7)
    # the hard labels lwbench show draws: each token's nearest centre
    assert labels.tolist() == torch.cdist(f, c).argmin(dim=-1).tolist()
    for b in range(2):
        torch.testing.assert_close(got[b].double(), _official_reconstruction(z[b], f[b], c[b], k, t, normalize),
                                   atol=1e-5, rtol=1e-5)


def test_reconstruction_keeps_ties_with_the_kth_and_survives_far_tokens():
    """Identical centres (a flat region pools to the same centre) tie at the k-th weight: the official ``ge`` keeps
    all of them. A token far from every centre (``exp(-t d)`` underflows to 0 in the official form, an all-zero
    token) still gets its nearest clusters' mixture, here all of its nearest one."""
    c = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    f = torch.tensor([[[0.2, 0.0], [-1000.0, 0.0]]])
    z = torch.eye(4)[None]
    rec = TokenReconstruction(k=2, temperature=1.0, normalize="l1")
    w = rec.weights(f, c)
    assert (w[0, 0] > 0).tolist() == [True, True, True, False]  # k = 2, but clusters 1 and 2 tie at the 2nd
    ref = _official_reconstruction(z[0], f[0, :1], c[0], 2, 1.0, "l1")[0]
    torch.testing.assert_close(rec(z, f, c)[0][0, 0].double(), ref, atol=1e-6, rtol=1e-6)
    assert w[0, 1].tolist() == [1.0, 0.0, 0.0, 0.0]  # far token: d = 1e6, 1002001, 1002001, 1010050
    assert rec(z, f, c)[0][0, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert math.exp(-1.0 * 1e6) == 0.0  # where the official weights are all 0


# -- the whole method ----------------------------------------------------------------------------------------------
def _official_forward(vit, img, alpha, cgrid, iters, t, window, k, rt, normalize="l2"):
    """``HourglassVisionTransformer.forward`` (Segmenter release) for one image on a CLS-only timm ViT, with the
    reconstruction applied to the last block's output and the final norm after it (as the DPT release reconstructs
    block outputs): ``(N, D)`` patch tokens and the ``(D,)`` CLS token."""
    grid = vit.patch_embed.grid_size
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(img[None]))))  # (1, 1 + N, C)
    feat = centres = None
    for i, blk in enumerate(vit.blocks):
        if i == alpha:  # after block alpha - 1: official `location`
            feat = h[0, 1:]
            centres = _official_clustering(feat, grid, cgrid, iters, t, window)
            h = torch.cat([h[:, :1], centres.float()[None]], dim=1)
        h = blk(h)
    patches = _official_reconstruction(h[0, 1:], feat, centres, k, rt, normalize)
    h = vit.norm(torch.cat([h[0, :1].double(), patches]).float())
    return h[1:].double(), h[0]


@pytest.mark.parametrize("alpha,k,normalize", [(1, 12, "l2"), (0, 6, "l2"), (2, 20, "l1")])
@torch.no_grad()
def test_matches_the_official_algorithm(alpha, k, normalize):
    """A CLS-only ViT (3 blocks, 5 x 7 patches, LayerScale), a batch of two images, each equal to the official
    forward written out (clustering and reconstruction in float64) within 1e-4."""
    vit, spec = cls_only_vit()
    x = torch.randn(2, 3, *spec.img_size, generator=torch.Generator().manual_seed(3))
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for blk in vit.blocks[:alpha]:
        h = blk(h)
    t = float(f"{1.0 / torch.cdist(h[0, 1:], h[0, 1:]).pow(2).mean().item():.3g}")  # t * d ~ 1: soft, not hard
    cgrid = cluster_grid(spec.grid, k)
    enc = Hourglass(spec, k, alpha=alpha, iters=3, temperature=t, window=3, recon_k=4, recon_temperature=t,
                    normalize=normalize).build(vit).eval()
    out = enc(x)
    assert isinstance(out, HourglassOutput) and out.patches.shape == (2, 35, 32)
    worst = 0.0
    for i in range(2):
        ref, cls = _official_forward(vit, x[i], alpha, cgrid, 3, t, 3, 4, t, normalize)
        torch.testing.assert_close(out.patches[i].double(), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.prefix[i, 0], cls, atol=1e-4, rtol=1e-4)
        worst = max(worst, (out.patches[i].double() - ref).abs().max().item())
    print(f"hourglass alpha={alpha} k={k} {normalize}: max |official - lwbench| = {worst:.2e}")


@pytest.mark.parametrize("name,size", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
@torch.no_grad()
def test_all_patches_is_the_plain_backbone(name, size):
    vit, spec = make(name, size)
    x = torch.randn(2, 3, *size)
    ref = vit.forward_features(x)
    n = spec.num_patches
    for k in (n, n - 1):  # n - 1 rounds to the full grid (4 x 6 and 5 x 7): no clustering layer either
        assert cluster_grid(spec.grid, k) == spec.grid
        out = get_method("hourglass")(spec, k).build(vit).eval()(x)
        assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
        assert out.assignment is None and out.aux["tokens_per_layer"].tolist() == [[n] * spec.depth] * 2


@pytest.mark.parametrize("name,size", BACKBONE_CASES, ids=[c[0] for c in BACKBONE_CASES])
@torch.no_grad()
def test_token_counts_and_dense_output(name, size):
    vit, spec = make(name, size)
    n, p, d = spec.num_patches, spec.num_prefix, spec.embed_dim
    k = Hourglass.budget_grid(spec)[0]
    m = Hourglass(spec, k)
    alpha = m.alpha()
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(4))
    enc = m.build(vit).eval()
    out = enc(x)
    hw = cluster_grid(spec.grid, k)
    assert hw[0] * hw[1] == k and out.aux["cluster_grid"] == hw
    assert out.aux["tokens_per_layer"].tolist() == [[n] * alpha + [k] * (spec.depth - alpha)] * 3
    assert out.realised_tokens().tolist() == [k] * 3  # the tokens the blocks after the clustering layer processed
    assert out.prefix.shape == (3, p, d) and out.patches.shape == (3, n, d) and torch.isfinite(out.patches).all()
    assert out.positions.tolist() == [list(range(n))] * 3 and out.assignment is None and out.sizes is None
    assert torch.equal(densify(out), out.patches)  # every cell has its own reconstructed token
    assert LinearSegHead(d, 5).eval()(out, size=size).shape == (3, 5, *size)
    for i in range(3):  # no image depends on its batch-mates
        one = enc(x[i : i + 1])
        torch.testing.assert_close(one.patches, out.patches[i : i + 1], atol=1e-5, rtol=1e-5)


# (timm name, image size): RoPE (Eva: DINOv3, EVA-02) and no class token (SigLIP, no prefix at all)
OTHER_FAMILIES = [("vit_small_patch16_dinov3", (64, 96)), ("eva02_tiny_patch14_224", (56, 84)),
                  ("vit_base_patch16_siglip_224", (64, 96))]


@pytest.mark.parametrize("name,size", OTHER_FAMILIES, ids=[n for n, _ in OTHER_FAMILIES])
@torch.no_grad()
def test_other_families(name, size):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, depth=2, embed_dim=64,
                            num_heads=2).eval()
    spec = BackboneSpec.of(vit, name, size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    plain = get_method("hourglass")(spec, spec.num_patches).build(vit).eval()(x)
    assert torch.equal(torch.cat([plain.prefix, plain.patches], 1), vit.forward_features(x))
    out = get_method("hourglass")(spec).build(vit).eval()(x)
    assert out.prefix.shape[1] == spec.num_prefix and out.patches.shape[1] == spec.num_patches
    assert torch.isfinite(out.patches).all() and out.realised_tokens()[0] < spec.num_patches


# -- budgets, options, defaults ------------------------------------------------------------------------------------
def test_defaults_follow_the_official_config():
    assert [default_alpha(d) for d in (24, 12, 4, 2, 1)] == [10, 5, 2, 1, 0]  # ADE20K: location 9 of 24
    assert side_grid((40, 40), 0.7) == (28, 28)  # num_spixels 784 of 40 x 40
    paper = BackboneSpec("vit_base_patch14_reg4_dinov2", (518, 518), 14, 12, 768, 12, 5)
    assert Hourglass.default_budget(paper) == 676 and Hourglass.budget_grid(paper) == [361, 676, 961]
    assert Hourglass(paper).alpha() == 5
    # quick profile: traffic signs 240 x 320 and ADE20K 256 x 256 on lw_vit_nano_p16 (4 blocks)
    signs = BackboneSpec("lw_vit_nano_p16", (240, 320), 16, 4, 128, 4, 5)
    ade = BackboneSpec("lw_vit_nano_p16", (256, 256), 16, 4, 128, 4, 5)
    assert Hourglass.default_budget(signs) == 154 and Hourglass.budget_grid(signs) == [80, 154, 221]
    assert Hourglass.default_budget(ade) == 121 and Hourglass.budget_grid(ade) == [64, 121, 196]
    assert Hourglass(signs).alpha() == 2


@pytest.mark.parametrize("grid", [(15, 20), (16, 16), (16, 24), (37, 37), (36, 48), (4, 6), (40, 40), (48, 48)])
def test_default_budgets_are_exact_grids(grid):
    """Every default budget is an ``h x w`` product that ``cluster_grid`` gives back, so ``k`` is the token count."""
    for side in (0.5, 0.7, 0.85):
        h, w = side_grid(grid, side)
        assert cluster_grid(grid, h * w) == (h, w), (grid, side)


def test_bad_budgets_and_options_fail_before_any_work():
    spec = BackboneSpec("lw_vit_test_p8", (40, 56), 8, 2, 32, 2, 5)  # 5 x 7, 2 blocks
    for bad in (0, -1, 36):
        with pytest.raises(BudgetError, match=r"hourglass: .*valid: k=1\.\.35"):
            Hourglass(spec, bad)
    with pytest.raises(BudgetError, match="whole number"):
        Hourglass(spec, 2.5)
    with pytest.raises(ConfigError, match="alpha=2"):
        Hourglass(spec, 12, alpha=2)
    with pytest.raises(ConfigError, match="window=4 must be odd"):
        Hourglass(spec, 12, window=4)
    with pytest.raises(ConfigError, match="normalize"):
        Hourglass(spec, 12, normalize="l3")
    for opt in ({"temperature": 0.0}, {"recon_k": 0}, {"iters": 0}):
        with pytest.raises(ConfigError):
            Hourglass(spec, 12, **opt)
    Hourglass(spec, 1, alpha=0)  # one cluster, clustering before the first block: valid


def test_macs_are_the_closed_form():
    """``alpha`` blocks on N patches, the rest on the M clusters, and the clustering and reconstruction layers as
    overhead: ``(2 iters + 2) M N C`` (the dense distances and affinities, as the official code computes them)."""
    vit, spec = make("lw_vit_test_p8", (32, 48))  # 4 x 6, CLS + 4 registers, 2 blocks, 32 wide
    n, p, c = spec.num_patches, spec.num_prefix, spec.embed_dim
    k, iters = 6, 5
    method = Hourglass(spec, k, iters=iters)
    alpha = method.alpha()
    model = TaskModel(method.build(vit), ClassifierHead(c, 3, "token")).eval()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    hidden = vit.blocks[0].mlp.fc1.out_features
    full = closed_form_vit_macs(alpha, c, hidden, n + p, n, spec.patch)
    rest = closed_form_vit_macs(spec.depth - alpha, c, hidden, k + p, 0, spec.patch)
    for counter in ("fvcore", "torch"):
        r = count_macs(model, x, counter=counter)
        assert r.unsupported_ops == [], r.unsupported_ops
        assert r.parts["overhead"] == (2 * iters + 2) * k * n * c, (counter, r.parts)
        assert r.parts["backbone"] == full + rest, (counter, r.parts)
        assert r.parts["head"] == 3 * c and r.macs == sum(r.parts.values())
