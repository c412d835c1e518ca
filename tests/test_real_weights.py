"""Real pretrained weights on real photos (``../shared/real``; skipped when absent): loading and resampling at the
sizes users ask for, the no-op budgets reproduce plain timm, and off-the-shelf reductions keep the features a
broken reduction would lose. Random weights cannot catch a reduction that merges or drops the wrong tokens: on a
random ViT every token looks alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
WEIGHTS = REAL / "vit_small_patch14_dinov2.imgfocus.safetensors"
NAME = "vit_small_patch14_dinov2"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/real not present")


def _photos(hw: tuple[int, int]) -> torch.Tensor:
    from lwbench.registry import get_task
    from lwbench.tasks._imageio import read_image

    task = get_task("image_folder").__new__(get_task("image_folder"))  # only its eval transform
    task.img_size, task.opts = hw, {"resize": "crop", "crop_pct": 1.0, "interpolation": "bicubic", "augment": False}
    tf = task.transform(train=False)
    return torch.stack([tf(read_image(p)) for p in sorted((REAL / "photos").iterdir())])


@pytest.fixture(scope="module")
def vit224():
    from lwbench.backbones import create_backbone

    return create_backbone(NAME, 224, weights=WEIGHTS).eval()


@pytest.fixture(scope="module")
def photos224():
    return _photos((224, 224))


@pytest.mark.parametrize("hw", [(448, 448), (448, 672), (518, 518)])
def test_loads_at_user_sizes_as_timm_does_without_antialias(hw):
    """lwbench's load at any size = timm's own model with the checkpoint's pos_embed resampled bicubic without
    antialias (the source model's interpolation); at 518 px (the checkpoint's grid) nothing is resampled."""
    from safetensors.torch import load_file

    from lwbench.backbones import create_backbone, resample_pos_embed

    ours = create_backbone(NAME, hw, weights=WEIGHTS)
    sd = load_file(str(WEIGHTS))
    ref = timm.create_model(NAME, pretrained=False, num_classes=0, img_size=hw)
    grid = (hw[0] // 14, hw[1] // 14)
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], grid, (37, 37), 1)
    ref.load_state_dict(sd)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    if hw == (518, 518):
        assert torch.equal(ours.pos_embed, load_file(str(WEIGHTS))["pos_embed"])


@pytest.mark.parametrize("method,budget", [("full", None), ("tome", "r=0"), ("evit", "keep_rate=1.0"),
                                           ("topk", "keep_rate=1.0"), ("random", "k=256")])
def test_noop_budgets_reproduce_timm(vit224, photos224, method, budget):
    import lwbench

    model = lwbench.create_model(method, NAME, 224, budget, num_classes=4, weights=str(WEIGHTS))
    with torch.no_grad():
        out = model.encoder(photos224)
        ref = vit224.forward_features(photos224)
    assert torch.equal(torch.cat([out.prefix, out.patches], 1), ref)


def _cls_cosine(vit224, photos224, method: str, budget: str) -> float:
    import lwbench

    torch.manual_seed(0)
    model = lwbench.create_model(method, NAME, 224, budget, num_classes=4, weights=str(WEIGHTS))
    with torch.no_grad():
        got = model.encoder(photos224).prefix[:, 0]
        ref = vit224.forward_features(photos224)[:, 0]
    return F.cosine_similarity(got, ref).mean().item()


def test_tome_r8_keeps_the_cls_features_and_a_random_merge_would_not(vit224, photos224, monkeypatch):
    """ToMe r=8 on the real photos: CLS cosine 0.9993 to the unreduced model (measured); the same merge with the
    partners chosen by noise instead of key similarity measured 0.944, so 0.99 separates them."""
    good = _cls_cosine(vit224, photos224, "tome", "r=8")
    assert good >= 0.99, good
    import lwbench.methods.tome as tome

    real_match = tome.BipartiteMatcher.match

    def random_match(self, metric, r):  # the same merge, partners chosen by noise instead of key similarity
        noise = torch.randn(metric.shape, generator=torch.Generator().manual_seed(1), dtype=metric.dtype)
        return real_match(self, noise, r)

    monkeypatch.setattr(tome.BipartiteMatcher, "match", random_match)
    broken = _cls_cosine(vit224, photos224, "tome", "r=8")
    assert broken < good - 0.02, (broken, good)


def test_evit_keep_07_keeps_the_cls_features(vit224, photos224, monkeypatch):
    """EViT at keep 0.7 (the CLS attention's top tokens, the rest fused) keeps the CLS features close (measured
    0.947); the same pruning keeping the *least* attended tokens measured 0.620."""
    good = _cls_cosine(vit224, photos224, "evit", "keep_rate=0.7")
    import lwbench.methods.evit as evit

    real_select = evit.select_attentive
    monkeypatch.setattr(evit, "select_attentive", lambda x, attn, *a, **k: real_select(x, -attn, *a, **k))
    inverted = _cls_cosine(vit224, photos224, "evit", "keep_rate=0.7")
    assert good >= 0.93, good
    assert inverted < good - 0.02, (inverted, good)
