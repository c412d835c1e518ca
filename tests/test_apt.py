"""apt: the entropy and the quadtree against the official algorithm written out with loops (``torch.histc`` per patch,
``log2``, padded patches at entropy 1e6, ``select_patches_by_threshold``), the whole forward against a loop
re-implementation of the official tokenizer and embedding, the no-op budget, token counts and cell coverage, batch
padding, the FLOP split, refused budgets and the fine-tuning."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from _toy import make, toy_ctx
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from lwbench.errors import BudgetError, ConfigError
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.measure.flops import closed_form_for, count_macs
from lwbench.method import BackboneSpec
from lwbench.methods.apt import APT, APTEncoder, grey_levels, level_pos_embed, quadtree
from lwbench.task import normalize
from lwbench.tokens import densify


# -- the official algorithm, written out ------------------------------------------------------------------------
def official_entropy(img: torch.Tensor, patch: int, scales: int, bins: int = 512, pad_value: float = 1e6):
    """``compute_patch_entropy_vectorized`` (entropy_utils.py, commit c4ed466) on a ``(3, H, W)`` image in [0, 255]:
    grey, zero padding to whole patches, one ``torch.histc`` per patch, ``-sum p log2(p + 1e-10)``, partial patches
    (last row / column) at ``pad_value``. ``{size: (Hp, Wp)}``."""
    grey = 0.2989 * img[0] + 0.5870 * img[1] + 0.1140 * img[2]
    h, w = grey.shape
    maps = {}
    for i in range(scales):
        s = patch * 2 ** i
        nh, nw = (h + s - 1) // s, (w + s - 1) // s
        padded = F.pad(grey, (0, nw * s - w, 0, nh * s - h), value=0)
        ent = torch.zeros(nh, nw)
        for r in range(nh):
            for c in range(nw):
                hist = torch.histc(padded[r * s:(r + 1) * s, c * s:(c + 1) * s].reshape(-1), bins=bins, min=0, max=255)
                prob = hist / (s * s)
                ent[r, c] = -torch.sum(prob * torch.log2(prob + 1e-10))
        if nh * s > h:
            ent[-1, :] = pad_value
        if nw * s > w:
            ent[:, -1] = pad_value
        maps[s] = ent
    return maps


def official_select(maps: dict[int, torch.Tensor], thresholds: list[float]) -> dict[int, torch.Tensor]:
    """``select_patches_by_threshold``, one image, with loops: each larger scale kept below its threshold, every
    smaller scale's cells under a kept patch cleared, largest first."""
    sizes = sorted(maps)
    masks = {sizes[0]: torch.ones_like(maps[sizes[0]])}
    for i in range(len(sizes) - 1, 0, -1):
        masks[sizes[i]] = (maps[sizes[i]] < thresholds[i - 1]).float()
    for i in range(len(sizes) - 1, 0, -1):
        big = masks[sizes[i]]
        for j in range(i):
            small = masks[sizes[j]]
            f = sizes[i] // sizes[j]
            for r in range(small.shape[0]):
                for c in range(small.shape[1]):
                    if r // f < big.shape[0] and c // f < big.shape[1] and big[r // f, c // f] == 1:
                        small[r, c] = 0
    return masks


def scene(h: int, w: int, seed: int) -> torch.Tensor:
    """A ``(3, h, w)`` uint8 image with flat areas, smooth gradients, a few grey levels and noisy texture."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(3, h, w)
    img[:, : h // 2, : w // 2] = torch.tensor([200.0, 180.0, 90.0]).view(3, 1, 1)  # flat
    ramp = torch.linspace(0, 60, w - w // 2)
    img[:, : h // 2, w // 2:] = 100 + ramp.view(1, 1, -1)  # a gentle gradient
    img[:, h // 2:, : w // 3] = torch.randint(0, 4, (1, h - h // 2, w // 3), generator=g).float() * 40  # few levels
    img[:, h // 2:, w // 3:] = torch.randint(0, 256, (3, h - h // 2, w - w // 3), generator=g).float()  # texture
    k = torch.randint(0, 6, (1,), generator=g).item()  # a patch of texture somewhere in the flat part
    img[:, 2 + k: 10 + k, 3 + k: 13 + k] = torch.randint(0, 256, (3, 8, 10), generator=g).float()
    return img.round().clamp(0, 255).to(torch.uint8)


def _vit(size, patch=8, **kw) -> VisionTransformer:
    """A seeded CLS-only timm ViT (the layout the official code handles), its weights far from init."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=0, **kw).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(0, 0.5)
        vit.cls_token.normal_(0, 0.5)
    return vit


def _spec(vit, size, name="vit_test"):
    return BackboneSpec.of(vit, name, size)


# -- 1. entropy and quadtree = the official ones ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_maps_match_the_official_loops(seed):
    """On an 80x112 image (a 10x14 grid of 8 px: 16 px patches 5x7 whole, 32 px 2x3 whole of the official 3x4):
    every whole patch's entropy within 1e-5 bits of the official histc/log2 loops (8-bit levels recovered exactly
    from the normalised image)."""
    img = scene(80, 112, seed)
    x = normalize(img).unsqueeze(0)
    assert torch.equal(grey_levels(x)[0], 0.2989 * img[0].float() + 0.5870 * img[1].float() + 0.1140 * img[2].float())
    enc = APTEncoder(_vit((80, 112)), 5.0, scales=3)
    ours = enc.scorer.entropy_maps(x)
    ref = official_entropy(img.float(), 8, 3)
    for i, e in enumerate(ours, start=1):
        s = 8 << i
        hi, wi = e.shape[1:]
        assert (hi, wi) == (10 // 2 ** i, 14 // 2 ** i)
        diff = (e[0] - ref[s][:hi, :wi]).abs().max().item()
        assert diff < 1e-5, (s, diff)
        assert bool((ref[s][hi:, :] == 1e6).all()) and bool((ref[s][:, wi:] == 1e6).all())  # never kept officially


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 3.3, 4.7, 6.1, 7.3])
def test_kept_patches_match_the_official_selection(seed, threshold):
    img = scene(80, 112, seed)
    x = normalize(img).unsqueeze(0)
    ref_maps = official_entropy(img.float(), 8, 3)
    near = min(abs(v - threshold) for m in ref_maps.values() for v in m.flatten().tolist())
    assert near > 1e-4  # no entropy at the threshold: float rounding cannot flip a decision
    ref = official_select(ref_maps, [threshold, threshold])
    kept = APTEncoder(_vit((80, 112)), threshold, scales=3).scorer(x)
    for i, k in enumerate(kept):
        s = 8 << i
        hi, wi = k.shape[1:]
        assert torch.equal(k[0].float(), ref[s][:hi, :wi]), (s, threshold)
        assert float(ref[s][hi:, :].sum() + ref[s][:, wi:].sum()) == 0  # partial patches never kept


def test_quadtree_by_hand():
    """4x4 base grid: the 4-cell patch (2, 2) kept at scale 2 covers everything; otherwise scale-1 patches."""
    e1 = torch.tensor([[[1.0, 9.0], [9.0, 1.0]]])  # scale 1: 2x2
    e2 = torch.tensor([[[5.0]]])  # scale 2: 1x1
    k0, k1, k2 = quadtree([e1, e2], (4, 4), 6.0)
    assert k2.all() and not k1.any() and not k0.any()
    k0, k1, k2 = quadtree([e1, e2], (4, 4), 3.0)
    assert not k2.any() and k1[0].tolist() == [[True, False], [False, True]]
    assert k0[0].tolist() == [[False, False, True, True], [False, False, True, True], [True, True, False, False],
                              [True, True, False, False]]
    k0, k1 = quadtree([e1[:, :1, :]], (3, 5), 3.0)  # odd grid: the last row and column stay base cells
    assert k1[0].tolist() == [[True, False]] and int(k0.sum()) == 15 - 4


# -- 2. the whole forward = the official tokenizer + embedding, with loops --------------------------------------
def official_forward(vit, agg, img_norm: torch.Tensor, kept: dict[int, torch.Tensor], patch: int):
    """``PatchTokenizer.construct_patch_groups`` + ``TokenizedZeroConvPatchAttn.forward`` + the blocks, one image,
    with loops: ``[CLS + its pos, base tokens (conv embedding + pos), then per larger scale: zero_conv(patch_attn^i(
    its cells' embeddings)) + embedding of the patch downsampled by F.interpolate + pos resampled by timm]``."""
    pe = vit.patch_embed.proj
    toks = [vit.cls_token[0, 0] + vit.pos_embed[0, 0]]
    grid = vit.patch_embed.grid_size
    pos16 = vit.pos_embed[0, 1:].reshape(grid[0], grid[1], -1)
    for (size, mask) in sorted(kept.items()):
        i = int(math.log2(size // patch))
        n = 2 ** i
        scaled = img_norm if i == 0 else F.interpolate(img_norm, scale_factor=0.5 ** i, mode="bilinear")
        if i == 0:
            pos = pos16
        else:
            pos = resample_abs_pos_embed(vit.pos_embed, new_size=(grid[0] // n, grid[1] // n), old_size=grid,
                                         num_prefix_tokens=1)[0, 1:].reshape(grid[0] // n, grid[1] // n, -1)
        for r in range(mask.shape[0]):
            for c in range(mask.shape[1]):
                if not mask[r, c]:
                    continue
                emb = pe(scaled[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]).flatten()
                if i:
                    sub = torch.stack([torch.stack([
                        pe(img_norm[:, :, (r * n + a) * patch:(r * n + a + 1) * patch,
                                    (c * n + b) * patch:(c * n + b + 1) * patch]).flatten()
                        for b in range(n)], dim=-1) for a in range(n)], dim=-2).unsqueeze(0)  # (1, D, n, n)
                    for _ in range(i):
                        sub = agg.conv(sub)
                    emb = agg.zero(sub.flatten()) + emb
                toks.append(emb + pos[r, c])
    x = torch.stack(toks).unsqueeze(0)
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


@pytest.mark.parametrize("seed", [0, 1])
@torch.no_grad()
def test_forward_matches_the_official_embedding_written_out(seed):
    """64x64 (an 8x8 grid of 8 px, 16 px patches 4x4, 32 px 2x2: every size divides, as the official needs), the
    aggregation's zero linear set to random weights so that it counts: tokens and outputs within 1e-5."""
    size = (64, 64)
    vit = _vit(size)
    img = scene(*size, seed)
    x = normalize(img).unsqueeze(0)
    maps = official_entropy(img.float(), 8, 3)
    threshold = 4.5  # no entropy within 0.1 of it (several are 4.0 and 5.0 exactly: gradients)
    kept = official_select(maps, [threshold, threshold])
    assert kept[16].sum() > 0 and kept[32].sum() > 0 and kept[8].sum() > 0  # every size in play
    enc = APTEncoder(vit, threshold, scales=3).eval()
    torch.manual_seed(seed)
    enc.aggregator.zero.weight.normal_(0, 0.1)
    enc.aggregator.zero.bias.normal_(0, 0.1)
    out = enc(x)
    ref = official_forward(vit, enc.aggregator, x, {s: m.bool() for s, m in kept.items()}, 8)
    n_tok = int(sum(m.sum() for m in kept.values()))
    assert out.patches.shape[1] == n_tok and out.mask is None
    got = torch.cat([out.prefix, out.patches], dim=1)
    diff = (got - ref).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("grid, level", [((8, 12), 1), ((8, 12), 2), ((16, 16), 2)])
def test_level_position_embedding_is_timms_resampling_when_the_grid_divides(grid, level):
    pos = torch.randn(1, grid[0] * grid[1], 16, generator=torch.Generator().manual_seed(0))
    n = 2 ** level
    ref = resample_abs_pos_embed(pos, new_size=(grid[0] // n, grid[1] // n), old_size=grid, num_prefix_tokens=0)
    assert (level_pos_embed(pos, grid, level) - ref).abs().max().item() < 1e-6


# -- 3. no-op, counts, coverage, padding ------------------------------------------------------------------------
@pytest.mark.parametrize("name, size", [("lw_vit_test_p8", (32, 48)), ("vit_small_patch14_reg4_dinov2", (70, 98))])
@torch.no_grad()
def test_noop_budget_is_the_backbone_bit_for_bit(name, size):
    vit, spec = make(name, size)
    assert APT.noop_budget(spec) == 0.0
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    out = APT(spec, 0.0).build(vit).eval()(x)
    feats = vit.forward_features(x)
    p = spec.num_prefix
    assert torch.equal(out.prefix, feats[:, :p]) and torch.equal(out.patches, feats[:, p:])
    assert torch.equal(out.positions, torch.arange(spec.num_patches).expand(2, -1)) and out.mask is None


def _batch(size, seeds):
    return torch.stack([normalize(scene(*size, s)) for s in seeds])


@torch.no_grad()
def test_counts_and_every_cell_covered_exactly_once():
    size = (80, 112)  # 10 x 14 grid, odd scale grids
    vit = _vit(size)
    x = _batch(size, [0, 1, 2])
    x[2] = normalize(torch.full((3, *size), 120, dtype=torch.uint8))  # one flat image: all large patches that fit
    for threshold in (3.0, 4.5, 9.0):
        enc = APTEncoder(vit, threshold, scales=3).eval()
        out = enc(x)
        kept = enc.scorer(x)
        n = 10 * 14
        for b in range(3):
            ok = out.mask[b] if out.mask is not None else torch.ones(out.patches.shape[1], dtype=torch.bool)
            t = int(ok.sum())
            expect = int(sum(k[b].sum() for k in kept))
            assert t == expect == n - 3 * int(kept[1][b].sum()) - 15 * int(kept[2][b].sum())
            assert torch.equal(out.aux["tokens_per_scale"][b], torch.stack([k[b].sum() for k in kept]))
            assign = out.assignment[b]
            assert int(assign.min()) >= 0 and int(assign.max()) < t  # every cell in exactly one real token
            per_token = torch.bincount(assign, minlength=out.patches.shape[1])
            assert torch.equal(per_token[:t], out.sizes[b, :t]) and int(out.sizes[b, t:].sum()) == 0
            assert int(out.sizes[b].sum()) == n
            assert torch.equal(assign[out.positions[b, :t]], torch.arange(t))  # a token's cell is one of its own
            assert bool((out.positions[b, t:] == -1).all())
        if threshold == 9.0:  # the flat image: 2x3 patches of 32 px (8x12 cells), the rest (row 4 and column 6 of
            assert out.aux["tokens_per_scale"][2].tolist() == [0, 7 + 4, 6]  # the 5x7 grid of 16 px) at 16 px


@torch.no_grad()
def test_higher_threshold_fewer_tokens_and_densify_copies_a_large_token():
    size = (64, 64)
    vit = _vit(size)
    x = _batch(size, [0, 3])
    counts = []
    for threshold in (0.0, 3.0, 4.5, 6.0, 9.0):
        out = APTEncoder(vit, threshold, scales=3).eval()(x)
        counts.append(out.realised_tokens().tolist())
    assert counts[0] == [64, 64] and counts[-1] == [4, 4]
    assert all(a[i] >= b[i] for a, b in zip(counts[:-1], counts[1:], strict=True) for i in range(2))
    out = APTEncoder(vit, 4.5, scales=3).eval()(x)
    dense = densify(out)
    for b in range(2):
        for t in range(int(out.realised_tokens()[b])):
            cells = (out.assignment[b] == t).nonzero().flatten()
            assert torch.equal(dense[b, cells], out.patches[b, t].expand(len(cells), -1))


@torch.no_grad()
def test_batch_padding_does_not_change_an_image():
    """Three images with different token counts in one batch (padded, masked) = each alone (no padding)."""
    size = (80, 112)
    for name in ("classic", "reg4"):
        if name == "classic":
            vit = _vit(size)
        else:
            vit, _ = make("vit_small_patch14_reg4_dinov2", (70, 98))
            size = (70, 98)
        x = _batch(size, [0, 1, 2])
        x[1, :, : size[0] // 2] = x[1, :1, :1, :1]  # a flatter image: fewer tokens
        enc = APTEncoder(vit, 4.5, scales=3).eval()
        out = enc(x)
        assert out.mask is not None and len(set(out.realised_tokens().tolist())) > 1
        for b in range(3):
            alone = enc(x[b: b + 1])
            t = alone.patches.shape[1]
            assert alone.mask is None and int(out.mask[b].sum()) == t
            assert (out.prefix[b] - alone.prefix[0]).abs().max().item() < 1e-5
            assert (out.patches[b, :t] - alone.patches[0]).abs().max().item() < 1e-5
            assert torch.equal(out.positions[b, :t], alone.positions[0])
            assert torch.equal(out.assignment[b], alone.assignment[0])
            assert float(out.patches[b, t:].abs().sum()) == 0.0


# -- 4. budgets, labels, cost, fine-tuning ----------------------------------------------------------------------
@pytest.mark.parametrize("budget, opts", [(-1.0, {}), (9.5, {}), (8.5, {"bins": 256}), (float("nan"), {}),
                                          (float("inf"), {})])
def test_bad_budgets_fail_before_any_work(budget, opts):
    _, spec = make()
    with pytest.raises(BudgetError) as err:
        APT(spec, budget, **opts)
    assert "apt" in str(err.value) and "\n" not in str(err.value)


def test_bad_options_fail():
    _, spec = make()
    with pytest.raises(ConfigError):
        APT(spec, 5.0, scales=1)
    with pytest.raises(ConfigError):
        APT(spec, 5.0, scales=5)


def test_metadata_and_labels():
    assert APT.budget_key == "entropy" and APT.training == "finetune" and APT.kind == "selection"
    labels = APT.labels
    assert (labels.training, labels.attention_map, labels.token_count, labels.dense) == \
        ("finetune", "none", "per image", True)
    _, spec = make()
    assert APT(spec).budget == APT.default_budget(spec) == 5.0


@torch.no_grad()
def test_macs_are_the_closed_form_on_the_tokens_plus_the_aggregation():
    """backbone + head = the plain ViT on the image's tokens (each token embedded once); the aggregation's MACs by
    hand; the entropy's elementwise work counted too."""
    size = (64, 64)
    vit = _vit(size)
    x = _batch(size, [0])
    enc = APTEncoder(vit, 4.5, scales=3).eval()
    out = enc(x)
    t = int(out.realised_tokens()[0])
    per_scale = out.aux["tokens_per_scale"][0].tolist()
    assert per_scale[1] and per_scale[2]
    head = ClassifierHead(32, 3, "token")
    r = count_macs(TaskModel(enc, head).eval(), x)
    assert r.unsupported_ops == []
    assert r.parts["backbone"] + r.parts["head"] == closed_form_for(vit, size, num_classes=3, num_patches=t)
    d, cpp = 32, 3 * 8 * 8
    agg = 0
    for level, k in enumerate(per_scale):
        n = 2 ** level
        if level:
            convs = sum((n >> j) ** 2 for j in range(1, level + 1)) * d * d * 4
            agg += k * (n * n * cpp * d + convs + d * d)
    assert r.parts["overhead"] > agg  # + the elementwise entropy work
    tc = count_macs(TaskModel(enc, head).eval(), x, counter="torch")
    assert r.parts == pytest.approx(tc.parts, rel=1e-9)
    ew = r.by_operator.get("elementwise in overhead", 0)
    assert r.parts["overhead"] == agg + ew and 0 < ew < 100 * 64 * 64


def test_finetune_trains_the_aggregation(tmp_path):
    """``fit``: one fine-tuning (finetuned_once) of the whole model; on plain images large patches are kept, so the
    zero-initialised linear leaves zero."""
    vit, spec = make()
    m = APT(spec, 9.0, finetune={"steps": 2})
    model = m.fit(toy_ctx(vit, tmp_path, steps=2))
    zero = model.encoder.aggregator.zero
    assert float(zero.weight.detach().abs().sum()) > 0
    assert not model.training


def test_timm_dinov2_at_its_own_size_runs():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=(56, 84),
                            depth=1, embed_dim=32, num_heads=2).eval()
    spec = _spec(vit, (56, 84), "vit_small_patch14_dinov2")
    x = _batch((56, 84), [0, 1])
    with torch.no_grad():
        out = APT(spec, 5.0).build(vit).eval()(x)
    assert torch.isfinite(out.patches).all() and out.grid == (4, 6)
