"""The seam between lwbench and timm: the few places that mirror timm's forward order, checked against timm.

``lwbench/vit.py`` re-sequences ``VisionTransformer.forward_features`` (prefix tokens, patch and position
embedding, pre-block dropouts and norm, blocks, final norm) so that methods can embed a subset of patches or
hand in their own prefix; ``methods/_reduction.py`` re-sequences ``Block.forward`` (attention half, then MLP
half) so that reduction methods can act between the two. With nothing selected or reduced both must be timm,
bit for bit: ``torch.equal``, no tolerance, since they call the same modules in the same order. The only
tolerance below is where lwbench deliberately computes differently (a linear map instead of the patch
convolution for a subset of patches; the CLS attention row recomputed outside the fused kernel).

Three tiny timm configurations, randomly re-initialised so that every prefix token, position embedding and
LayerScale is far from zero:

* ``classic_p16``: CLS only, position embedding over CLS and patches (original timm / JAX), no LayerScale.
* ``dinov2_reg4_p14``: CLS + 4 registers, position embedding on patches only, LayerScale (DINOv2 layout).
* ``reg1_qknorm_dynamic_p16``: CLS + 1 register inside the position embedding, LayerScale, qk-norm, and
  ``dynamic_img_size`` run at a size it was not built for, so the position embedding is resampled (timm
  resamples it in ``_pos_embed``; lwbench in ``patch_pos_embed``).
* ``siglip_noclass_p16``: no prefix token at all (SigLIP, ``global_pool='map'``).
* ``clip_normpre_p16``: CLIP's image tower (``norm_pre`` before the blocks).

The RoPE ``Eva`` half of the seam (``lwbench/eva.py``) is tested at the end on DINOv3 (RoPE only, CLS + 4
registers, LayerScale, ``dynamic_img_size``) and EVA-02 (absolute + RoPE, CLS, SwiGLU, q/v bias through
``F.linear``), against timm's own ``Eva.forward_features`` and ``EvaBlock.forward``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from lwbench.methods._reduction import (
    as_attn_mask,
    attention_residual,
    check_blocks,
    cls_attention,
    embed,
    key_bias_from_mask,
    mlp_residual,
    split_qkv,
    start_tokens,
)
from lwbench.vit import (
    all_positions,
    assemble,
    embed_patches,
    gather_patches,
    grid_of,
    num_prefix,
    patchify,
    prefix_tokens,
    run_selected,
    run_tokens,
    to_output,
)

# id -> (timm model, overrides, built at (H, W), run at (H, W))
CONFIGS = {
    "classic_p16": ("vit_base_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), (32, 48), (32, 48)),
    "dinov2_reg4_p14": ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=48, num_heads=3), (42, 56), (42, 56)),
    "reg1_qknorm_dynamic_p16": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=32, num_heads=2, reg_tokens=1, init_values=0.5, qk_norm=True, dynamic_img_size=True),
        (48, 48),
        (32, 64),
    ),
    "siglip_noclass_p16": ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=32, num_heads=2), (32, 48), (32, 48)),
    "clip_normpre_p16": ("vit_base_patch16_clip_224", dict(depth=2, embed_dim=32, num_heads=2), (32, 48), (32, 48)),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def seam(request):
    """``(vit, x)``: a randomly re-initialised tiny timm ViT in eval mode and a batch of two images."""
    model, overrides, built, run = CONFIGS[request.param]
    torch.manual_seed(0)
    vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=built, **overrides).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 3, *run)
    if run != built:  # the resampling path must really run
        assert grid_of(vit, x) != tuple(vit.patch_embed.grid_size)
    return vit, x


def _block_inputs(vit, x) -> torch.Tensor:
    """The tokens timm's ``forward_features`` hands its first block, captured in the act."""
    seen = []
    handle = vit.blocks.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        vit.forward_features(x)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_tokens_entering_the_blocks_are_timms(seam):
    vit, x = seam
    ref = _block_inputs(vit, x)
    p = num_prefix(vit)
    assert torch.equal(assemble(vit, embed_patches(vit, x)), ref)
    # norm_pre (CLIP) is per token: the blocks see it applied to prefix and patches alike
    assert torch.equal(vit.norm_pre(prefix_tokens(vit, x.shape[0])), ref[:, :p])
    assert torch.equal(vit.norm_pre(embed_patches(vit, x)), ref[:, p:])
    assert torch.equal(embed(vit, x), ref)  # what every reduction method starts from
    tokens, positions, grid, n_pre = start_tokens(vit, x)
    assert torch.equal(tokens, ref) and n_pre == p and grid == grid_of(vit, x)
    assert torch.equal(positions, torch.arange(grid[0] * grid[1]).expand(x.shape[0], -1))


@torch.no_grad()
def test_backbone_on_all_patches_is_forward_features(seam):
    vit, x = seam
    ref = vit.forward_features(x)
    grid = grid_of(vit, x)
    pos = all_positions(x.shape[0], grid, x.device)
    p = num_prefix(vit)
    for out in (run_selected(vit, x, pos), run_tokens(vit, embed_patches(vit, x), pos, grid),
                to_output(vit, vit.blocks(embed(vit, x)), pos, grid)):
        assert out.prefix.shape[1] == p and out.grid == grid
        assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


@torch.no_grad()
def test_every_patch_in_any_order_embeds_exactly(seam):
    """All patches, permuted: timm's convolution then a gather, so bit-identical to embedding everything."""
    vit, x = seam
    full = embed_patches(vit, x)
    n = full.shape[1]
    perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(x.shape[0])])
    sub = embed_patches(vit, x, perm)
    assert torch.equal(sub, torch.gather(full, 1, perm.unsqueeze(-1).expand(-1, -1, full.shape[-1])))


@torch.no_grad()
def test_subset_embedding_matches_the_convolution(seam):
    """A strict subset is embedded with the convolution's weights as a linear map (only the chosen pixels are
    read). Same products, summed in another order: equal to fp32 rounding, not bit for bit."""
    vit, x = seam
    full = embed_patches(vit, x)
    n = full.shape[1]
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(n, generator=g)[: max(1, n // 2)].sort().values for _ in range(x.shape[0])])
    sub = embed_patches(vit, x, idx)
    ref = torch.gather(full, 1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    # Rounding of a sum grows with its terms, not its result: an output near 0 from terms of size ~10 (weights
    # N(0, 0.3), 768 products for patch 16) differs by ~1e-5 between summation orders. Scale the bound with the output.
    torch.testing.assert_close(sub, ref, rtol=1e-5, atol=1e-6 * max(1.0, float(full.abs().max())))


def test_blocks_pass_the_reduction_check(seam):
    check_blocks(seam[0], "seam")


@torch.no_grad()
def test_resequenced_block_is_block_forward(seam):
    """``attention_residual`` then ``mlp_residual`` is ``Block.forward`` in every block, and chaining them
    through the whole backbone is ``forward_features``. The captured ``qkv`` is the block's own projection."""
    vit, x = seam
    h = embed(vit, x)
    chained = h
    for i, blk in enumerate(vit.blocks):
        mid, qkv = attention_residual(blk, h)
        assert torch.equal(qkv, blk.attn.qkv(blk.norm1(h))), f"block {i}: tapped qkv"
        assert torch.equal(mlp_residual(blk, mid), blk(h)), f"block {i}"
        chained = mlp_residual(blk, attention_residual(blk, chained)[0])
        h = blk(h)
    grid = grid_of(vit, x)
    out = to_output(vit, chained, all_positions(x.shape[0], grid, x.device), grid)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), vit.forward_features(x))


@torch.no_grad()
def test_resequenced_block_with_a_key_mask_is_block_forward(seam):
    """The float ``attn_mask`` reduction methods pass (``-inf`` for padded keys) goes to timm's attention
    unchanged, so the re-sequenced block still equals ``Block.forward(x, attn_mask=...)``."""
    vit, x = seam
    h = embed(vit, x)
    p = num_prefix(vit)
    n = h.shape[1] - p
    valid = torch.ones(x.shape[0], n, dtype=torch.bool)
    valid[0, n // 2:] = False  # image 0 has padding, image 1 none
    mask = as_attn_mask(key_bias_from_mask(valid, p, h.dtype))
    for i, blk in enumerate(vit.blocks):
        ref = blk(h, attn_mask=mask)
        assert torch.equal(mlp_residual(blk, attention_residual(blk, h, mask)[0]), ref), f"block {i}"
        h = ref


@torch.no_grad()
def test_side_attention_sees_what_timm_attention_sees(seam):
    """``split_qkv`` gives the q, k, v timm's attention uses (q/k norms applied): fused attention on them,
    then timm's output projection, is the attention module's output exactly. The CLS row recomputed on the
    side (``cls_attention``) is the softmax row of the explicit attention matrix (fp32 rounding)."""
    vit, x = seam
    h = embed(vit, x)
    for i, blk in enumerate(vit.blocks):
        attn = blk.attn
        xin = blk.norm1(h)
        _, qkv = attention_residual(blk, h)
        q, k, v = split_qkv(attn, qkv)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        assert torch.equal(attn.proj(attn.norm(y)), attn(xin)), f"block {i}"

        row = cls_attention(q, k, attn.scale)
        explicit = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        torch.testing.assert_close(row, explicit, rtol=1e-5, atol=1e-6)
        cls_out = F.scaled_dot_product_attention(q, k, v)[:, :, 0]
        torch.testing.assert_close(torch.einsum("bht,bhtd->bhd", row, v), cls_out, rtol=1e-5, atol=1e-5)
        h = blk(h)


def test_gathering_patches_is_unfolding_then_gathering(seam):
    """The fast pixel gather LookWhere's extractor uses is ``patchify`` + gather, bit for bit (also on an image
    whose size is not a multiple of the patch, where both drop the remainder)."""
    vit, x = seam
    p = int(vit.patch_embed.patch_size[0])
    for img in (x, torch.nn.functional.pad(x, (0, p // 2, 0, p - 1))):
        pix = patchify(vit, img)
        g = torch.Generator().manual_seed(1)
        idx = torch.stack([torch.randperm(pix.shape[1], generator=g)[:5] for _ in range(img.shape[0])])
        ref = torch.gather(pix, 1, idx.unsqueeze(-1).expand(-1, -1, pix.shape[-1]))
        assert torch.equal(gather_patches(vit, img, idx), ref)


# -- the Eva (RoPE) half of the seam ----------------------------------------------------------------------
from lwbench import eva  # noqa: E402
from lwbench.methods._reduction import attention_step  # noqa: E402
from lwbench.vit import family_of, rope_of, run_blocks  # noqa: E402

EVA_CONFIGS = {
    "dinov3_s16": ("vit_small_patch16_dinov3", dict(depth=2, embed_dim=64, num_heads=2), (32, 48)),
    "eva02_t14": ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=2), (28, 42)),
}


@pytest.fixture(scope="module", params=list(EVA_CONFIGS), ids=list(EVA_CONFIGS))
def eva_seam(request):
    model, overrides, size = EVA_CONFIGS[request.param]
    torch.manual_seed(0)
    vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=size, **overrides).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    assert family_of(vit) == "eva"
    return vit, torch.randn(2, 3, *size)


def _eva_block_inputs(vit, x):
    """``(tokens, rope)`` timm's ``Eva.forward_features`` hands its first block."""
    seen = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.append((args[0], kw["rope"])),
                                                     with_kwargs=True)
    try:
        vit.forward_features(x)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_eva_tokens_and_rope_entering_the_blocks_are_timms(eva_seam):
    vit, x = eva_seam
    ref, ref_rope = _eva_block_inputs(vit, x)
    assert torch.equal(embed(vit, x), ref)
    assert torch.equal(rope_of(vit, grid_of(vit, x)), ref_rope)
    assert rope_of(timm.create_model("vit_base_patch16_224", num_classes=0, depth=1, embed_dim=32, num_heads=2),
                   (14, 14)) is None  # a VisionTransformer has no RoPE


@torch.no_grad()
def test_eva_backbone_on_all_patches_is_forward_features(eva_seam):
    vit, x = eva_seam
    ref = vit.forward_features(x)
    grid = grid_of(vit, x)
    pos = all_positions(x.shape[0], grid, x.device)
    for out in (run_selected(vit, x, pos), run_tokens(vit, embed_patches(vit, x), pos, grid),
                to_output(vit, run_blocks(vit, embed(vit, x), rope_of(vit, grid)), pos, grid)):
        assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


@torch.no_grad()
def test_eva_rope_follows_each_token_to_its_cell(eva_seam):
    """Every patch, in a different order per image: each token's RoPE is its own cell's (indexed per sample), so
    the output is forward_features permuted (attention sums in another order: fp32 rounding)."""
    vit, x = eva_seam
    ref = vit.forward_features(x)
    p = num_prefix(vit)
    n = ref.shape[1] - p
    perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(x.shape[0])])
    out = run_selected(vit, x, perm)
    torch.testing.assert_close(out.prefix, ref[:, :p], rtol=1e-5, atol=1e-5)
    want = torch.gather(ref[:, p:], 1, perm.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.patches, want, rtol=1e-5, atol=1e-5)
    table = rope_of(vit, grid_of(vit, x))
    assert torch.equal(rope_of(vit, grid_of(vit, x), perm)[1, 0], table[perm[1]])


def test_eva_cell_less_tokens_get_the_identity_rotation(eva_seam):
    vit, x = eva_seam
    grid = grid_of(vit, x)
    rope = rope_of(vit, grid, torch.tensor([[grid[0] * grid[1] - 1, -1]]))  # last cell: a non-zero angle
    sin, cos = rope[0, 0, 1].chunk(2)
    assert torch.equal(sin, torch.zeros_like(sin)) and torch.equal(cos, torch.ones_like(cos))
    t = torch.randn(1, 2, 2 + num_prefix(vit), rope.shape[-1] // 2)
    attn = vit.blocks[0].attn
    rotated = eva.rotate(attn, t, rope, t)
    assert torch.equal(rotated[:, :, -1], t[:, :, -1]) and not torch.equal(rotated[:, :, -2], t[:, :, -2])


def test_eva_blocks_pass_the_reduction_check(eva_seam):
    check_blocks(eva_seam[0], "seam")


@torch.no_grad()
def test_eva_resequenced_block_is_block_forward(eva_seam):
    """Attention half then MLP half is ``EvaBlock.forward(x, rope=...)`` bit for bit, with the grid's table and
    with a per-sample (gathered) RoPE; chained through the backbone it is ``forward_features``."""
    vit, x = eva_seam
    grid = grid_of(vit, x)
    h = embed(vit, x)
    table = rope_of(vit, grid)
    gathered = rope_of(vit, grid, all_positions(x.shape[0], grid, x.device))
    chained = h
    for i, blk in enumerate(vit.blocks):
        ref = blk(h, rope=table)
        for rope in (table, gathered):
            mid, q, k, v = attention_step(blk, h, None, rope)
            assert torch.equal(mlp_residual(blk, mid), ref), f"block {i}"
        chained = mlp_residual(blk, attention_step(blk, chained, None, table)[0])
        h = ref
    out = to_output(vit, chained, all_positions(x.shape[0], grid, x.device), grid)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), vit.forward_features(x))


@torch.no_grad()
def test_eva_side_attention_sees_what_timm_attention_sees(eva_seam):
    """q, k (RoPE applied) and v from ``attention_step`` are the ones ``EvaAttention`` used: fused attention on
    them, then its norm and projection, is the module's output exactly; the side CLS row is the explicit one."""
    vit, x = eva_seam
    grid = grid_of(vit, x)
    rope = rope_of(vit, grid)
    h = embed(vit, x)
    for blk in vit.blocks:
        attn = blk.attn
        _, q, k, v = attention_step(blk, h, None, rope)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        torch.testing.assert_close(attn.proj(attn.norm(y)), attn(blk.norm1(h), rope=rope), rtol=0, atol=1e-6)
        row = cls_attention(q, k, attn.scale)
        explicit = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
        torch.testing.assert_close(row, explicit, rtol=1e-5, atol=1e-6)
        h = blk(h, rope=rope)


@torch.no_grad()
def test_eva_where_target_logits_use_the_rope(eva_seam):
    """LookWhere's teacher target on an Eva (``eva.attention_logits``): head- and query-mean of the logits of the
    rotated q and k the attention used, patch keys only."""
    vit, x = eva_seam
    rope = rope_of(vit, grid_of(vit, x))
    h = embed(vit, x)
    blk, p = vit.blocks[-1], num_prefix(vit)
    h = vit.blocks[0](h, rope=rope)
    _, q, k, _ = attention_step(blk, h, None, rope)
    for queries, rows in (("patch", q[:, :, p:]), ("cls", q[:, :, :1])):
        want = ((rows * blk.attn.scale) @ k[:, :, p:].transpose(-2, -1)).mean(dim=2).mean(dim=1)
        got = eva.attention_logits(blk, h, p, rope, queries)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
