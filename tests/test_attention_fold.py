"""Proportional attention folded into the dot product (:func:`lwbench.attention.sdpa_key_bias`): known answers.

The reference is always the call it replaces: ``scaled_dot_product_attention`` with the per-key bias as a float
``attn_mask`` (kernel level), timm's own ``Attention``/``EvaAttention`` called with that mask (module level), and
the merging methods with timm's masked attention put back in their blocks (method level). Measured on this CPU
(PyTorch 2.14, fp32): 0.0 at head dim 64 (``sqrt(64) = 8`` is exact and a power of two, so the folded logit
rounds like the masked one) and at most 3.8e-6 at 48 and 32 with logits of magnitude ~50 (``sqrt(d)`` rounds and the
dot product gains a term: a few ulps of the logits); bfloat16: 0.0 at 64, one bf16 step of the output (2**-6 for
outputs in [2, 4)) at 48 and 32, the size of bf16's own error against fp32. Module level (timm's attention with
the mask, head dim 32): <= 1.9e-6 fused, 0.0 on timm's eager path. Method level (ToMe, PiToMe, MCTF on the tiny
ViT and a random DINOv3 ViT-S): <= 6e-8, the same tokens merged.

The fold runs where flash needs it (CUDA, ``lwbench.attention.FOLD_DEVICES``); on CPU the bias goes to SDPA as a
float mask, which the CPU flash kernel takes at no extra cost. The tests here force the fold on CPU (fixture
``fold_on_cpu``) except the one that checks the CPU default.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from lwbench import attention, eva
from lwbench.attention import biased_attention, sdpa_key_bias
from lwbench.backbones import create_backbone
from lwbench.method import BackboneSpec
from lwbench.methods import _reduction, mctf, tome
from lwbench.registry import get_method


@pytest.fixture(autouse=True)
def fold_on_cpu(monkeypatch):
    """Every test here checks the folded path, which runs on CUDA (``lwbench.attention.FOLD_DEVICES``), on CPU
    tensors: the CPU default (a float mask on the CPU flash kernel) is checked by the tests that ask for it."""
    monkeypatch.setattr(attention, "FOLD_DEVICES", frozenset({"cuda", "cpu"}))


FP32_BOUND = {64: 1e-6, 48: 1e-5, 32: 1e-5}  # measured 0.0, 3.5e-6, 3.8e-6 (see the module docstring)
BF16_BOUND = 2**-5  # two bf16 steps at outputs in [2, 4); measured one (2**-6)


def _qkv_bias(d, dtype, seed=0):
    """Batch 3, 4 heads, 50 tokens; logits of magnitude ~50 (q, k scaled by 3); sizes 1 (prefix and some patches)
    up to 10^4, different per sample."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 50, d, generator=g) * s for s in (3.0, 3.0, 1.0))
    size = torch.randint(1, 200, (3, 50), generator=g).float()
    size[:, :3] = 1.0
    size[0, 10] = size[2, 20] = 1e4
    return q.to(dtype), k.to(dtype), v.to(dtype), size.log()


def _masked(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[:, None, None, :])


@pytest.mark.parametrize("d", [64, 48, 32])
def test_folded_call_equals_the_masked_call_fp32(d):
    for seed in range(3):
        q, k, v, bias = _qkv_bias(d, torch.float32, seed)
        ref = _masked(q, k, v, bias)
        got = sdpa_key_bias(q, k, v, bias)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= FP32_BOUND[d]
        assert (sdpa_key_bias(q, k, v, bias, multiple=1) - ref).abs().max().item() <= FP32_BOUND[d]  # no padding


@pytest.mark.parametrize("d", [64, 48, 32])
def test_folded_call_equals_the_masked_call_bf16(d):
    for seed in range(3):
        q, k, v, bias = _qkv_bias(d, torch.bfloat16, seed)
        got, ref = sdpa_key_bias(q, k, v, bias), _masked(q, k, v, bias)
        assert got.dtype == torch.bfloat16
        assert (got.float() - ref.float()).abs().max().item() <= BF16_BOUND


def test_each_sample_gets_its_own_bias_and_the_bias_matters():
    q, k, v, bias = _qkv_bias(48, torch.float32)
    got = sdpa_key_bias(q, k, v, bias)
    swapped = sdpa_key_bias(q, k, v, bias.flip(0))
    assert (swapped - got).abs().max() > 1e-2  # sizes differ per sample, and so do the outputs
    assert (sdpa_key_bias(q, k, v, torch.zeros_like(bias)) - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5


def test_the_folded_call_hands_sdpa_no_mask_a_padded_width_and_the_original_scale(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask, q.shape[-1], k.shape[-1], v.shape[-1], kw.get("scale")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    q, k, v, bias = _qkv_bias(48, torch.float32)
    assert sdpa_key_bias(q, k, v, bias).shape[-1] == 48
    assert seen == [(None, 56, 56, 56, 1 / math.sqrt(48))]


def test_on_cpu_the_bias_is_a_float_mask_on_the_cpu_flash_kernel_equal_to_the_fold(monkeypatch):
    """The CPU default: SDPA gets the bias as an attn_mask (the CPU flash kernel takes it at no cost, the fold
    widens the head dim), the same outputs as the fold, and the profiler still names cpu_flash; ``fold=True``
    forces the fold anywhere."""
    from lwbench.measure.paired import attention_kernels

    monkeypatch.setattr(attention, "FOLD_DEVICES", frozenset({"cuda"}))
    seen = []
    real = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask is None, q.shape[-1]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    q, k, v, bias = _qkv_bias(64, torch.float32)
    masked = sdpa_key_bias(q, k, v, bias)
    folded = sdpa_key_bias(q, k, v, bias, fold=True)
    assert seen == [(False, 64), (True, 72)]
    assert (masked - folded).abs().max().item() <= FP32_BOUND[64] and torch.equal(masked, _masked(q, k, v, bias))

    class One(torch.nn.Module):
        def forward(self, x):
            return sdpa_key_bias(x, x, x, bias[:1])

    assert attention_kernels(One(), q[:1]) == "cpu_flash"


# -- module level: timm's attention with the mask ----------------------------------------------------------------
SMALL = dict(depth=1, embed_dim=64, num_heads=2)
MODULES = {
    "vit_qknorm": ("vit_small_patch16_224", (32, 48), dict(qk_norm=True)),  # timm Attention, q/k LayerNorm
    "vit_small_patch16_dinov3": ("vit_small_patch16_dinov3", (32, 48), {}),  # Eva: RoPE, CLS + 4 registers
    "eva02_tiny_patch14_224": ("eva02_tiny_patch14_224", (28, 42), {}),  # Eva: q/v bias through F.linear
    "eva02_base_patch14_224": ("eva02_base_patch14_224", (28, 42), {}),  # Eva: separate q/k/v projections
}


@pytest.fixture(scope="module", params=list(MODULES), ids=list(MODULES))
def block_case(request):
    name, size, extra = MODULES[request.param]
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **SMALL, **extra).eval()
    with torch.no_grad():  # far from init, so that every bias, norm and LayerScale matters
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    return vit, size


def _timm_masked(attn, x, bias, rope):
    mask = bias[:, None, None, :]
    return attn(x, attn_mask=mask) if rope is None else attn(x, rope=rope, attn_mask=mask)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@torch.no_grad()
def test_biased_attention_is_timms_attention_with_the_mask(block_case, fused):
    vit, _ = block_case
    blk = vit.blocks[0]
    attn, p = blk.attn, vit.num_prefix_tokens
    grid = tuple(vit.patch_embed.grid_size)
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, p + n, vit.embed_dim, generator=g)
    bias = torch.cat([torch.zeros(2, p), torch.randint(1, 50, (2, n), generator=g).float().log()], dim=1)
    positions = torch.stack([torch.randperm(n, generator=g) for _ in range(2)])  # tokens at shuffled cells
    rope = eva.rope_of(vit, grid, positions) if eva.is_eva(vit) else None
    was = attn.fused_attn
    attn.fused_attn = fused
    try:
        ref = _timm_masked(attn, blk.norm1(x), bias, rope)
        got, q, k, v = biased_attention(attn, blk.norm1(x), bias, rope)
    finally:
        attn.fused_attn = was
    assert (got - ref).abs().max().item() < 1e-5  # measured 0.0 eager, <= 1.9e-6 fused (outputs ~8, head dim 32)
    q_ref, k_ref, v_ref = (eva.project(attn, blk.norm1(x)) if eva.is_eva(vit)
                           else _reduction.split_qkv(attn, attn.qkv(blk.norm1(x))))
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)  # before RoPE


# -- method level: the merging methods against their masked selves ----------------------------------------------
def masked_path(monkeypatch, module):
    """Put back, in a method's module, what its blocks ran before the fold: timm's block or attention with the
    bias as a float ``attn_mask`` (``call_block``, and ``attention_step``'s mask path with its ``qkv`` tap).
    Returns a list that grows by one at every block that got a bias."""
    calls = []

    def block(blk, x, rope=None, key_bias=None):
        calls.extend([1] if key_bias is not None else [])
        return _reduction.call_block(blk, x, rope, None if key_bias is None else key_bias[:, None, None, :])

    def step(blk, x, attn_mask=None, rope=None, need_v=True, rotated=True, key_bias=None):
        calls.extend([1] if key_bias is not None else [])
        mask = None if key_bias is None else key_bias[:, None, None, :]
        return _reduction.attention_step(blk, x, mask, rope, need_v=need_v, rotated=rotated)

    monkeypatch.setattr(module, "biased_block", block)
    monkeypatch.setattr(module, "attention_step", step)
    return calls


# mctf's default (approximate one-step-ahead) gives a fusing block the pooled side map, no SDPA call: its precise
# mode runs the folded kernel there, and "off" fuses after block 0's MLP
METHODS = [("tome", {}), ("pitome", {"prop_attn": True}), ("mctf", {"one_step_ahead": "precise"}),
           ("mctf", {"one_step_ahead": "off", "layers": "0,1"})]
BACKBONES = [("lw_vit_test_p8", (40, 56), 4), ("vit_small_patch16_dinov3", (64, 96), 4)]


@pytest.mark.parametrize("backbone,size,r", BACKBONES, ids=[b[0] for b in BACKBONES])
@pytest.mark.parametrize("method,opts", METHODS, ids=["tome", "pitome", "mctf_precise", "mctf_off"])
@torch.no_grad()
def test_methods_give_the_logits_of_the_masked_path(monkeypatch, backbone, size, r, method, opts):
    torch.manual_seed(0)
    vit = create_backbone(backbone, size).eval()
    spec = BackboneSpec.of(vit, backbone, size)
    enc = get_method(method)(spec, r, **opts).build(vit).eval()
    head = torch.nn.Linear(spec.embed_dim, 5)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    calls = masked_path(monkeypatch, mctf if method == "mctf" else tome)  # PiToMe runs ToMe's block loop
    ref = enc(x)
    assert calls, "no block had a size bias: the comparison would be vacuous"
    assert torch.equal(out.positions, ref.positions)  # the same tokens merged
    full, full_ref = torch.cat([out.prefix, out.patches], 1), torch.cat([ref.prefix, ref.patches], 1)
    assert (full - full_ref).abs().max().item() < 1e-5  # measured <= 6e-8 (outputs of magnitude ~4)
    assert (head(out.cls) - head(ref.cls)).abs().max().item() < 1e-5


@torch.no_grad()
def test_no_float_mask_reaches_sdpa_in_a_merging_forward(monkeypatch):
    """What makes flash eligible on CUDA: every SDPA call of ToMe / MCTF carries no ``attn_mask``, and the folded
    calls (a width one more than the head dim, padded) are multiples of 8."""
    real = F.scaled_dot_product_attention
    seen = []

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask is None, q.shape[-1]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    torch.manual_seed(0)
    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    for method in ("tome", "mctf"):
        seen.clear()
        get_method(method)(spec, 4).build(vit).eval()(torch.randn(1, 3, 40, 56))
        assert seen and all(no_mask for no_mask, _ in seen)
        assert {w for _, w in seen} <= {16, 24}  # head dim 16: plain blocks 16, folded 17 -> 24


def test_the_recorded_kernel_is_the_plain_models():
    """``attention_kernel`` is read from the profiler's op names (what ran, not whether a mask was passed): on CPU
    ToMe and PiToMe report ``cpu_flash``, as the plain backbone does (and as they did with the mask); MCTF, in every
    mode, also writes its blocks' whole attention map out (the map it fuses by: a square softmax outside SDPA), and
    says so: ``cpu_flash+matmul``."""
    from lwbench.measure.paired import attention_kernels

    vit = create_backbone("lw_vit_test_p8", (40, 56)).eval()
    spec = BackboneSpec.of(vit, "lw_vit_test_p8", (40, 56))
    x = torch.randn(1, 3, 40, 56)
    for method, opts in METHODS:
        want = "cpu_flash+matmul" if method == "mctf" else "cpu_flash"
        assert attention_kernels(get_method(method)(spec, 4, **opts).build(vit).eval(), x) == want, (method, opts)
    assert attention_kernels(vit, x) == "cpu_flash"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tome_runs_the_flash_kernel_on_cuda_in_bf16():
    from lwbench.measure.paired import attention_kernels

    vit = create_backbone("lw_vit_test_p14", (224, 224)).eval().cuda().to(torch.bfloat16)
    spec = BackboneSpec.of(vit, "lw_vit_test_p14", (224, 224))
    enc = get_method("tome")(spec, 8).build(vit).eval()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    assert attention_kernels(enc, x) == attention_kernels(vit, x) == "flash"
