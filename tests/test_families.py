"""Every timm ViT family x every registered method, on small random models (2 blocks, 64 wide, 2 x 3 patches).

Families are decided by class (``lwbench.vit.family_of``), never by name: timm ``VisionTransformer`` (DeiT,
AugReg, MAE, CLIP, SigLIP without a class token, DINOv2 with and without registers) and the RoPE ``Eva``
(DINOv3, EVA-02). For each (family, method):

* (a) **no-op budget = the plain model**, ``torch.equal`` against timm's ``forward_features`` (no tolerance;
  the no-op table and the comparison are test_contracts.py's). LookWhere has no no-op (its prefix is the
  selector's): its extractor given the backbone's own prefix must be the backbone, as in test_contracts.
* (b) **MACs = the closed form**: at the no-op budget the fvcore backbone + head MACs are exactly
  ``closed_form_for`` (selection overheads are counted apart, as ``Overhead``), and ``random`` at k < N is the
  closed form with k patches (only the k patches are embedded and enter the blocks).
* (c) **a method that refuses a family** does so when it is constructed from the ``BackboneSpec`` (planning
  time), in one line naming the families it supports; the refusals are exactly the ones listed here.
* (d) at a reducing budget every supported method runs and returns finite tokens on the grid (``lowres``: its
  own low-res grid).
"""

from __future__ import annotations

import pytest
import timm
import torch
from test_contracts import NOOP, NoNoOp, _assert_is_backbone, _reference

from lwbench.backbones import check_backbone_name, spec_of
from lwbench.errors import ConfigError, UnknownNameError
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.measure.flops import closed_form_for, count_macs
from lwbench.method import BackboneSpec
from lwbench.registry import METHODS

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
# name -> (family, image size: a 2 x 3 patch grid)
FAMILIES = {
    "deit_small_patch16_224": ("vit", (32, 48)),
    "vit_small_patch16_224": ("vit", (32, 48)),  # AugReg
    "vit_base_patch16_224.mae": ("vit", (32, 48)),
    "vit_base_patch16_clip_224": ("vit", (32, 48)),  # norm_pre
    "vit_base_patch16_siglip_224": ("vit-noclass", (32, 48)),  # no class token, global_pool='map'
    "vit_small_patch14_dinov2": ("vit", (28, 42)),
    "vit_small_patch14_reg4_dinov2": ("vit", (28, 42)),
    "vit_small_patch16_dinov3": ("eva", (32, 48)),  # RoPE only, CLS + 4 registers
    "eva02_tiny_patch14_224": ("eva", (28, 42)),  # absolute + RoPE, SwiGLU
}
METHOD_NAMES = sorted(METHODS.names())
# read or write the class token
NEED_CLS = {"evit", "topk", "evit_random", "topk_random", "ats", "ips", "lookwhere", "token_transforming"}
# (family, method) pairs refused at planning time
REFUSED = {(fam, m) for fam in ("vit-noclass", "eva-noclass") for m in NEED_CLS}
NUM_CLASSES = 3


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    name = request.param
    fam, size = FAMILIES[name]
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **SMALL).eval()
    with torch.no_grad():  # far from init: LayerScale, prefix tokens and position embeddings all matter
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    spec = BackboneSpec.of(vit, name, size)
    assert spec.family == fam
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    return name, vit, spec, x


def _build(name, spec, budget):
    return METHODS.get(name)(spec, budget)


def _head(spec):
    torch.manual_seed(1)
    return ClassifierHead(spec.embed_dim, NUM_CLASSES, "avg").eval()  # avg: defined with and without CLS


@pytest.mark.parametrize("method", METHOD_NAMES)
@torch.no_grad()
def test_noop_budget_is_the_plain_model(family, method):
    name, vit, spec, x = family
    if (spec.family, method) in REFUSED:
        pytest.skip("refused (test_refusals_are_one_line_at_planning_time)")
    entry = NOOP[method]
    enc = _build(method, spec, entry.budget(spec)).build(vit).eval()
    ref = _reference(vit, spec, x)
    if isinstance(entry, NoNoOp):
        _assert_is_backbone(entry.part(enc, x), ref, f"{method} on {name} (the part that must be the backbone)")
        return
    _assert_is_backbone(enc(x), ref, f"{method} on {name}")
    head = _head(spec)
    assert torch.equal(TaskModel(enc, head)(x), head(ref)), f"{method} on {name}: head logits"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_noop_macs_are_the_closed_form(family, method):
    name, vit, spec, x = family
    if (spec.family, method) in REFUSED:
        pytest.skip("refused")
    enc = _build(method, spec, NOOP[method].budget(spec)).build(vit)
    r = count_macs(TaskModel(enc, _head(spec)).eval(), x[:1])
    assert r.unsupported_ops == [], r.unsupported_ops
    closed = closed_form_for(vit, spec.img_size, num_classes=NUM_CLASSES)
    assert r.parts["backbone"] + r.parts["head"] == closed, (method, name, r.parts, closed)
    if method not in ("lookwhere", "dps", "ips", "saliency"):  # the others have no selector at their no-op budget
        assert r.macs == closed


@pytest.mark.parametrize("k", [1, 4])
def test_random_macs_at_k_are_the_closed_form(family, k):
    name, vit, spec, x = family
    enc = _build("random", spec, k).build(vit)
    r = count_macs(TaskModel(enc, _head(spec)).eval(), x[:1])
    assert r.macs == closed_form_for(vit, spec.img_size, num_classes=NUM_CLASSES, num_patches=k)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_refusals_are_one_line_at_planning_time(family, method):
    name, vit, spec, x = family
    cls = METHODS.get(method)
    budget = NOOP[method].budget(spec)
    if (spec.family, method) not in REFUSED:
        cls(spec, budget)  # planning passes
        assert spec.family in cls.families
        return
    with pytest.raises(ConfigError) as err:
        cls(spec, budget)
    msg = str(err.value)
    assert "\n" not in msg and f"family '{spec.family}'" in msg
    assert f"supports families {', '.join(cls.families)}" in msg
    # the same line from the planner's own spec (built on the meta device from the name)
    with pytest.raises(ConfigError, match="supports families"):
        cls(spec_of(name, spec.img_size), budget)


@pytest.mark.parametrize("method", METHOD_NAMES)
@torch.no_grad()
def test_reducing_budget_runs(family, method):
    name, vit, spec, x = family
    if (spec.family, method) in REFUSED:
        pytest.skip("refused")
    cls = METHODS.get(method)
    grid = cls.budget_grid(spec)
    budget = grid[len(grid) // 2] if grid else cls.default_budget(spec)
    out = cls(spec, budget).build(vit).eval()(x)
    assert out.grid == (spec.grid if method != "lowres" else out.grid) and out.prefix.shape[1] == spec.num_prefix
    assert torch.isfinite(out.patches).all() and out.patches.shape[1] <= spec.num_patches + 1


def test_spec_of_builds_the_family_on_the_meta_device():
    for name, (fam, _) in FAMILIES.items():
        check_backbone_name(name)
        spec = spec_of(name, (224, 224))  # a multiple of 14 and of 16
        assert spec.family == fam, name


@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "vit_base_r50_s16_224",
                                  "vit_small_patch16_rope_mixed_224", "resnet50"])
def test_unsupported_timm_models_are_refused_in_one_line(name):
    with pytest.raises(UnknownNameError) as err:
        check_backbone_name(name)
    msg = str(err.value)
    assert "\n" not in msg and "supports" in msg and "vit, vit-noclass, eva, eva-noclass" in msg


def test_classifier_pool_token_on_a_backbone_without_class_token_is_one_line():
    from lwbench.config import resolve_config
    from lwbench.errors import ConfigError
    from lwbench.runner import Plan

    with pytest.raises(ConfigError, match=r"no class token, so head.pool=token .* head.pool=avg"):
        Plan(resolve_config("full", "traffic_signs", backbone="vit_base_patch16_siglip_224", source="synthetic",
                            sets=["head.pool=token"]))
    Plan(resolve_config("full", "traffic_signs", backbone="vit_base_patch16_siglip_224", source="synthetic",
                        sets=["head.pool=avg"]))


def test_flops_and_create_model_pool_patches_on_a_backbone_without_class_token():
    import lwbench
    from lwbench.flops_report import flops_report

    rep = flops_report("tome", "vit_base_patch16_siglip_224", (32, 32), budget="r=1")
    assert rep["gmacs"] > 0 and not rep["unsupported_ops"]
    model = lwbench.create_model("full", "vit_base_patch16_siglip_224", 32, num_classes=3)
    assert model.head.pool == "avg" and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
