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
    assert torch.equal(prefix_tokens(vit, x.shape[0]), ref[:, :p])
    assert torch.equal(embed_patches(vit, x), ref[:, p:])
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
    torch.testing.assert_close(sub, ref, rtol=1e-5, atol=1e-5)


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
