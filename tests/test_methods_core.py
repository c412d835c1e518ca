"""full / random / lowres: exactness against the plain timm model, budgets, token bookkeeping."""

from __future__ import annotations

import pytest
import torch
from _toy import make

from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError, UnknownNameError
from lwbench.method import resolve_budget
from lwbench.registry import get_method

CASES = [("lw_vit_test_p8", (48, 64)), ("vit_small_patch14_reg4_dinov2", (70, 98))]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def vit_case(request):
    name, size = request.param
    vit, spec = make(name, size)
    return name, size, vit, spec


def test_full_equals_timm(vit_case):
    _, size, vit, spec = vit_case
    x = torch.randn(2, 3, *size)
    ref = vit.forward_features(x)
    out = get_method("full")(spec).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)
    assert out.grid == spec.grid and out.positions.shape == (2, spec.num_patches)


def test_random_with_all_patches_equals_timm(vit_case):
    _, size, vit, spec = vit_case
    x = torch.randn(2, 3, *size)
    ref = vit.forward_features(x)
    out = get_method("random")(spec, spec.num_patches).build(vit).eval()(x)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


def test_random_subset_positions_and_embedding(vit_case):
    _, size, vit, spec = vit_case
    k = 5
    enc = get_method("random")(spec, k).build(vit).eval()
    x = torch.randn(3, 3, *size)
    out = enc(x)
    assert out.patches.shape == (3, k, vit.embed_dim)
    pos = out.positions
    assert (pos.diff(dim=1) > 0).all() and pos.max() < spec.num_patches  # sorted, unique, on the grid
    # the subset path embeds only selected pixels; it must agree with embedding everything then gathering
    from lwbench.vit import embed_patches

    full = embed_patches(enc.vit, x)
    sub = embed_patches(enc.vit, x, pos)
    assert torch.allclose(sub, torch.gather(full, 1, pos.unsqueeze(-1).expand(-1, -1, full.shape[-1])), atol=1e-5)
    assert torch.equal(enc(x).positions, pos)  # deterministic in eval


def test_build_does_not_touch_the_teacher(vit_case):
    _, size, vit, spec = vit_case
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    get_method("lowres")(spec).build(vit)
    get_method("random")(spec, 3).build(vit)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert tuple(vit.patch_embed.img_size) == tuple(size)


def test_lowres_runs_at_budget_height(vit_case):
    _, size, vit, spec = vit_case
    h = spec.patch * 2
    enc = get_method("lowres")(spec, h).build(vit).eval()
    out = enc(torch.randn(1, 3, *size))
    assert out.grid[0] == 2 and out.patches.shape[1] == out.grid[0] * out.grid[1]


@pytest.mark.parametrize("method,budget", [("random", 0), ("random", 10_000), ("lowres", 7), ("lowres", 10_000)])
def test_impossible_budgets_fail_before_work(vit_case, method, budget):
    *_, spec = vit_case
    with pytest.raises(BudgetError, match="valid"):
        get_method(method)(spec, budget)


def test_budget_key_checked():
    with pytest.raises(BudgetError, match="k=..."):
        resolve_budget(get_method("random"), "r=4")
    with pytest.raises(BudgetError, match="no budget"):
        resolve_budget(get_method("full"), "k=4")


def test_image_size_not_divisible():
    with pytest.raises(BudgetError, match="not divisible by the patch size 14"):
        create_backbone("vit_small_patch14_reg4_dinov2", (224, 225))


def test_unknown_backbone():
    with pytest.raises(UnknownNameError, match="Did you mean"):
        create_backbone("vit_small_patch14_reg4_dinov", 224)
