"""Checkpoint layouts (lwbench/checkpoints.py): HF Dinov2Model / Dinov2WithRegistersModel / ViTModel, the original
DINOv2 release and the official LookWhere file load into timm's ViT and give the source model's features; a wrong
variant fails in one line naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lwbench.backbones import create_backbone, load_backbone_weights
from lwbench.checkpoints import layout_of
from lwbench.errors import CheckpointError

SMALL = dict(embed_dim=64, depth=2, num_heads=2, num_classes=0)
REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "vit_small_patch14_dinov2.imgfocus.safetensors"


def _timm(name: str, img: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img, **{**SMALL, **kw}).eval()


def _randomise(model: torch.nn.Module) -> None:
    """Random LayerScale / norm / token values: zero- or one-initialised tensors would hide a wrong mapping."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# -- Hugging Face, against transformers' own forward ------------------------------------------------------
def _hf_pair(kind: str, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=56,
                  layer_norm_eps=1e-6)
    if kind == "dinov2":
        hf = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, **common))
        name = "vit_small_patch14_dinov2"
    elif kind == "dinov2-reg":
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **common))
        name = "vit_small_patch14_reg4_dinov2"
    else:
        hf = transformers.ViTModel(transformers.ViTConfig(patch_size=16, **{**common, "image_size": 64}),
                                   add_pooling_layer=True)
        name = "vit_base_patch16_224"
    _randomise(hf)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    return hf.eval(), name, path


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-reg", "vit"])
def test_hugging_face_file_gives_transformers_features(kind, tmp_path):
    hf, name, path = _hf_pair(kind, tmp_path)
    img = 64 if kind == "vit" else 56
    vit = _timm(name, img)
    load_backbone_weights(vit, path)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got = vit.forward_features(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_hugging_face_prefixed_classifier_file(tmp_path):
    """A Dinov2ForImageClassification file: keys under ``dinov2.``, a classifier that lwbench drops."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                    image_size=56, patch_size=14, num_labels=3)
    hf = transformers.Dinov2ForImageClassification(cfg)
    _randomise(hf)
    sd = hf.state_dict()
    assert any(k.startswith("dinov2.") for k in sd) and any(k.startswith("classifier.") for k in sd)
    assert layout_of(sd) == "hf-dinov2"
    vit = _timm("vit_small_patch14_dinov2", 56)
    load_backbone_weights(vit, dict(sd))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), hf.dinov2(pixel_values=x).last_hidden_state,
                                   atol=2e-5, rtol=1e-4)


# -- the same layouts built by hand (no transformers needed) -------------------------------------------------
def _to_hf_dinov2(sd: dict) -> dict:
    """A timm DINOv2 (no registers) state dict written in HF Dinov2Model's key layout, independently of the
    converter: the names are HF's (modeling_dinov2.py)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out |= {L + f"attention.attention.query.{kind}": q, L + f"attention.attention.key.{kind}": k,
                    L + f"attention.attention.value.{kind}": v,
                    L + f"attention.output.dense.{kind}": sd[b + f"attn.proj.{kind}"],
                    L + f"norm1.{kind}": sd[b + f"norm1.{kind}"], L + f"norm2.{kind}": sd[b + f"norm2.{kind}"],
                    L + f"mlp.fc1.{kind}": sd[b + f"mlp.fc1.{kind}"], L + f"mlp.fc2.{kind}": sd[b + f"mlp.fc2.{kind}"]}
        out[L + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        out[L + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def test_hand_built_hf_dinov2_layout_round_trips(tmp_path):
    src = _timm("vit_small_patch14_dinov2", 56)
    _randomise(src)
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in _to_hf_dinov2(src.state_dict()).items()}, str(path))
    dst = _timm("vit_small_patch14_dinov2", 56)
    load_backbone_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_original_dinov2_release_with_registers(tmp_path):
    """The facebookresearch layout: register_tokens, a CLS row in pos_embed, mask_token; into timm's no-class-
    embedding register model the CLS row is folded into cls_token, so the features equal the source's."""
    src = _timm("vit_small_patch14_reg4_dinov2", 56)
    _randomise(src)
    sd = src.state_dict()
    cls_row = torch.randn(1, 1, 64)
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original |= {"register_tokens": sd["reg_token"], "cls_token": sd["cls_token"] - cls_row,
                 "pos_embed": torch.cat([cls_row, sd["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 64)}
    assert layout_of(original) == "dinov2"
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    dst = _timm("vit_small_patch14_reg4_dinov2", 56)
    load_backbone_weights(dst, path)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x), atol=1e-6, rtol=1e-6)


def test_wrong_variant_names_both_in_one_line(tmp_path):
    src = _timm("vit_small_patch14_dinov2", 56)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(_timm("vit_small_patch14_reg4_dinov2", 56), path)
    msg = str(err.value)
    assert "\n" not in msg and "no registers" in msg and "4 registers" in msg
    with pytest.raises(CheckpointError, match="3 blocks"):
        load_backbone_weights(_timm("vit_small_patch14_dinov2", 56, depth=3), path)


def test_official_lookwhere_file_as_backbone_weights(tmp_path):
    ext = _timm("vit_small_patch14_reg4_dinov2", 56)
    _randomise(ext)
    path = tmp_path / "lookwhere_dinov2.pt"
    torch.save({"selector": {"backbone": {}, "head": {}}, "extractor": ext.state_dict()}, path)
    dst = _timm("vit_small_patch14_reg4_dinov2", 56)
    load_backbone_weights(dst, path)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ext.state_dict().items())


@pytest.mark.skipif(not REAL.is_file(), reason="../shared/real not present")
def test_real_checkpoint_into_register_variant_is_one_line():
    with pytest.raises(CheckpointError) as err:
        create_backbone("vit_small_patch14_reg4_dinov2", 224, weights=REAL)
    assert str(err.value) == ("weights are a ViT-S/14 (384 wide, 12 blocks, no registers), but backbone "
                              "vit_small_patch14_reg4_dinov2 is a ViT-S/14 (384 wide, 12 blocks, 4 registers): "
                              "use --backbone vit_small_patch14_dinov2")
