"""``lwbench.attention`` on RoPE ``Eva`` models: the logits are the ones timm's own attention feeds its softmax.

The reference is taken from timm itself, not recomputed: each block's attention is switched to timm's
non-fused path (``fused_attn = False``) and the module-level ``maybe_add_mask`` it calls on the softmax
input (``(q * scale) @ k^T``, with the q/v biases, after ``q_norm``/``k_norm`` and, on an Eva, RoPE) is
wrapped, in the module that defines the attention class, to record that ``(B, H, N, N)`` matrix.
``attention.py``'s head- and query-mean over patch keys must equal the same means of it.
Small random models as in ``tests/test_families.py`` (2 blocks, 64 wide). The ``VisionTransformer`` path is
checked bit for bit against the code it had before Eva support.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import timm
import torch

from lwbench import eva
from lwbench.attention import BlockInputs, LastBlockInput, attention_logits
from lwbench.vit import embed_patches, grid_of, num_prefix, rope_of, run_selected

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
EVAS = {
    "vit_small_patch16_dinov3": (32, 48),  # RoPE only, CLS + 4 registers, no qkv bias
    "eva02_tiny_patch14_224": (28, 42),  # absolute + RoPE, q/v bias (F.linear on qkv.weight), packed SwiGLU
    "eva02_base_patch14_224": (28, 42),  # separate q/k/v projections, SwiGLU with norm
}
VITS = {
    "deit_small_patch16_224": (32, 48),
    "vit_small_patch14_reg4_dinov2": (28, 42),
    "vit_base_patch16_siglip_224": (32, 48),  # no class token
}


def _model(name, size):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **SMALL).eval()
    with torch.no_grad():  # far from init, as in test_families: biases, LayerScale, prefix tokens all matter
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    return vit, x


@pytest.fixture(scope="module", params=list(EVAS), ids=list(EVAS))
def eva_model(request):
    vit, x = _model(request.param, EVAS[request.param])
    assert eva.is_eva(vit)
    return request.param, vit, x


@contextlib.contextmanager
def timm_softmax_inputs(vit):
    """Every block's softmax input as timm computes it, in block order, on its attention's non-fused path
    (``maybe_add_mask`` as named in the module that defines the attention class)."""
    module = sys.modules[type(vit.blocks[0].attn).__module__]
    seen: list[torch.Tensor] = []
    original = module.maybe_add_mask

    def record(attn, attn_bias=None):
        seen.append(attn.detach().clone())
        return original(attn, attn_bias)

    fused = [blk.attn.fused_attn for blk in vit.blocks]
    module.maybe_add_mask = record
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    try:
        yield seen
    finally:
        module.maybe_add_mask = original
        for blk, f in zip(vit.blocks, fused, strict=True):
            blk.attn.fused_attn = f


def _means(full, p):
    """(B, H, N, N) logits -> {"patch": patch rows, "cls": row 0} means over heads and rows, patch keys only."""
    return {"patch": full[:, :, p:, p:].mean(dim=2).mean(dim=1), "cls": full[:, :, 0, p:].mean(dim=1)}


@torch.no_grad()
def test_eva_logits_are_timms_softmax_inputs(eva_model):
    """timm's own ``forward_features`` (rope=its grid table): every block, both query kinds, to 1e-5."""
    name, vit, x = eva_model
    p = num_prefix(vit)
    with timm_softmax_inputs(vit) as seen, BlockInputs(vit) as captured:
        vit.forward_features(x)
    assert len(seen) == len(vit.blocks)
    n = p + grid_of(vit, x)[0] * grid_of(vit, x)[1]
    for queries in ("patch", "cls"):
        got = captured.logits(p, queries)
        for i, full in enumerate(seen):
            assert full.shape[-2:] == (n, n)
            torch.testing.assert_close(got[i], _means(full, p)[queries], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_eva_logits_on_a_token_subset_use_the_cells_rope(eva_model):
    """Through lwbench's seam on a subset of cells (RoPE indexed at them, per sample): still timm's logits."""
    name, vit, x = eva_model
    p, grid = num_prefix(vit), grid_of(vit, x)
    idx = torch.stack([torch.tensor([5, 0, 3]), torch.tensor([1, 4, 2])])  # unsorted, different per sample
    with timm_softmax_inputs(vit) as seen, BlockInputs(vit) as captured:
        run_selected(vit, x, idx)
    assert len(seen) == len(vit.blocks) and seen[0].shape[-1] == p + 3
    for queries in ("patch", "cls"):
        got = captured.logits(p, queries)
        for i, full in enumerate(seen):
            torch.testing.assert_close(got[i], _means(full, p)[queries], rtol=1e-5, atol=1e-5)
    assert captured.rope[0].shape[:3] == (2, 1, 3)  # the indexed table the blocks got, not the grid's
    assert grid[0] * grid[1] == 6  # the 2 x 3 grid idx indexes


@torch.no_grad()
def test_eva_last_block_input_matches_the_where_target(eva_model):
    """``LastBlockInput`` (and the free function with ``rope_of``) equal ``eva.attention_logits`` as LookWhere's
    teacher target calls it, and differ from the no-RoPE computation attention.py did before."""
    name, vit, x = eva_model
    p, rope = num_prefix(vit), rope_of(vit, grid_of(vit, x))
    with LastBlockInput(vit) as last:
        vit.forward_features(x)
    for queries in ("patch", "cls"):
        want = eva.attention_logits(last.block, last.x, p, rope, queries)
        assert torch.equal(last.logits(p, queries), want)
        assert torch.equal(attention_logits(last.block, last.x, p, queries, rope), want)
    no_rope = _vit_logits_before(last.block, last.x, p, "patch") if last.block.attn.qkv is not None else None
    if no_rope is not None:
        assert not torch.allclose(no_rope, last.logits(p, "patch"), atol=1e-3)


def test_eva_logits_carry_gradients_to_the_attention_weights(eva_model):
    """The teacher's attention loss trains through them: q/k weights and (EVA-02) the query bias get gradients."""
    name, vit, x = eva_model
    vit.zero_grad()
    with BlockInputs(vit, [-1]) as captured:
        vit.forward_features(x)
    captured.logits(num_prefix(vit), "cls")[len(vit.blocks) - 1].logsumexp(1).sum().backward()
    attn = vit.blocks[-1].attn
    weight = attn.qkv.weight if attn.qkv is not None else attn.q_proj.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    if attn.q_bias is not None:
        assert attn.q_bias.grad is not None and attn.q_bias.grad.abs().sum() > 0
    vit.zero_grad()


def test_rope_is_read_from_positional_and_keyword_calls():
    vit, x = _model("vit_small_patch16_dinov3", EVAS["vit_small_patch16_dinov3"])
    blk, rope = vit.blocks[0], rope_of(vit, grid_of(vit, x))
    h = torch.cat([vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1), embed_patches(vit, x)], 1)
    with torch.no_grad():
        for call in (lambda: blk(h, rope), lambda: blk(h, rope=rope)):
            with BlockInputs(vit, [0]) as captured:
                call()
            assert captured.rope[0] is rope


# -- the VisionTransformer path: unchanged -------------------------------------------------------------
def _vit_logits_before(block, x, n_prefix, queries="patch"):
    """``lwbench.attention.attention_logits`` as it was before Eva support (commit 3e2d545), verbatim."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    rows = q[:, :, n_prefix:] if queries == "patch" else q[:, :, :1]
    q_mean = rows.mean(dim=2, keepdim=True) * attn.scale
    logits = (q_mean @ k[:, :, n_prefix:].transpose(-2, -1)).squeeze(2)
    return logits.mean(dim=1)


@pytest.mark.parametrize("name", list(VITS))
def test_vision_transformer_path_is_bit_identical(name):
    vit, x = _model(name, VITS[name])
    p = num_prefix(vit)
    kinds = ("patch", "cls") if p else ("patch",)
    with torch.no_grad(), timm_softmax_inputs(vit) as seen, BlockInputs(vit) as captured:
        vit.forward_features(x)
    assert all(r is None for r in captured.rope.values())
    with torch.no_grad(), LastBlockInput(vit) as last:
        vit.forward_features(x)
    for queries in kinds:
        got = captured.logits(p, queries)
        for i, blk in enumerate(vit.blocks):
            with torch.no_grad():
                assert torch.equal(got[i], _vit_logits_before(blk, captured.x[i], p, queries))
            torch.testing.assert_close(got[i], _means(seen[i], p)[queries], rtol=1e-5, atol=1e-5)
        assert torch.equal(last.logits(p, queries), _vit_logits_before(vit.blocks[-1], last.x, p, queries))
