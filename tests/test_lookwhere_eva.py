"""LookWhere checkpoints on RoPE ``Eva`` backbones: ``describe_state_dict`` reads SwiGLU / packed-GLU MLPs, and
the official and pretraining-folder layouts load onto EVA-02 and DINOv3 extractors exactly.

timm's Eva MLP key names (timm 1.0): ``Mlp`` has ``mlp.fc1`` (h, d) / ``mlp.fc2`` (d, h) (DINOv3 small/base);
``SwiGLU`` (``scale_mlp`` or ``swiglu_align_to``: EVA-02 base/large, DINOv3 small-plus/huge) has ``mlp.fc1_g``,
``mlp.fc1_x`` (h, d), ``mlp.norm`` and ``mlp.fc2`` (d, h), no ``fc1``; ``GluMlp`` (EVA-02 tiny/small) packs gate
and value in ``mlp.fc1`` (2h, d) with ``mlp.fc2`` (d, h). The MLP width reported is h in all three.
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from lwbench.errors import CheckpointError
from lwbench.methods.lookwhere.checkpoint import (
    describe_state_dict,
    encoder_from_official,
    encoder_from_pretrain_dir,
    export_official,
    write_meta,
)
from lwbench.methods.lookwhere.model import build_encoder

SMALL = dict(depth=3, embed_dim=64, num_heads=2)
# name -> (image size: a 4 x 6 grid, MLP class, MLP width h, registers)
MODELS = {
    "eva02_tiny_patch14_224": ((56, 84), "GluMlp", 170, 0),
    "eva02_base_patch14_224": ((56, 84), "SwiGLU", 170, 0),
    "vit_small_patch16_dinov3": ((64, 96), "Mlp", 256, 4),
    "vit_small_plus_patch16_dinov3": ((64, 96), "SwiGLU", 256, 4),
}


def _model(name, seed=0):
    size = MODELS[name][0]
    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **SMALL).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    return vit


@pytest.mark.parametrize("name", list(MODELS))
def test_describe_state_dict_reads_eva_mlps(name):
    size, kind, width, regs = MODELS[name]
    vit = _model(name)
    assert type(vit.blocks[0].mlp).__name__ == kind
    sd = vit.state_dict()
    if kind == "SwiGLU":
        assert "blocks.0.mlp.fc1.weight" not in sd and sd["blocks.0.mlp.fc1_g.weight"].shape == (width, 64)
    patch = 14 if "patch14" in name else 16
    want = {"dim": 64, "patch": patch, "depth": 3, "mlp": width, "registers": regs}
    assert describe_state_dict(sd) == want
    assert want["mlp"] == vit.blocks[0].mlp.fc2.in_features and want["registers"] == vit.num_prefix_tokens - 1
    # without fc2 (a truncated file) the width still comes from fc1_g's rows (SwiGLU) or fc1's (Mlp)
    if kind != "GluMlp":
        assert describe_state_dict({k: v for k, v in sd.items() if "mlp.fc2" not in k})["mlp"] == width


def test_describe_state_dict_plain_vit_unchanged_and_errors():
    vit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0, img_size=(32, 48), depth=2,
                            embed_dim=64, num_heads=2)
    sd = vit.state_dict()
    assert describe_state_dict(sd) == {"dim": 64, "patch": 16, "depth": 2,
                                       "mlp": int(sd["blocks.0.mlp.fc1.weight"].shape[0]), "registers": 0}
    with pytest.raises(CheckpointError) as e:
        describe_state_dict({k: v for k, v in sd.items() if ".mlp." not in k})
    assert "blocks.0.mlp.fc2.weight or blocks.0.mlp.fc1_g.weight or blocks.0.mlp.fc1.weight" in str(e.value)


def _encoder(name, seed=3):
    size, patch = MODELS[name][0], (14 if "patch14" in name else 16)
    enc = build_encoder(_model(name, seed), 6, 2, 3 * patch, size)  # selector: 2 blocks on a 3 x 3 grid
    return enc.eval(), size, patch


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "eva02_base_patch14_224"])
def test_official_checkpoint_round_trip_on_eva02(name, tmp_path):
    enc, size, patch = _encoder(name)
    sd = export_official(enc)
    path = tmp_path / "lookwhere_eva02.pt"
    torch.save(sd, path)
    loaded = encoder_from_official(path, _model(name, seed=9), size, k=6).eval()  # sizes read from the file
    assert loaded.selector.depth == 2 and loaded.selector.low_size == (3 * patch, 3 * patch)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert torch.equal(a.aux["selected"], b.aux["selected"])
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.patches, b.patches)


def test_official_checkpoint_on_dinov3_needs_the_selector_size():
    """RoPE only: the file has no position embedding to read the selector's resolution from."""
    name = "vit_small_plus_patch16_dinov3"
    enc, size, patch = _encoder(name)
    sd = export_official(enc)
    with pytest.raises(CheckpointError) as e:
        encoder_from_official(sd, _model(name, seed=9), size, k=6)
    assert "selector_size" in str(e.value) and "\n" not in str(e.value)
    loaded = encoder_from_official(sd, _model(name, seed=9), size, k=6, selector_size=(3 * patch, 3 * patch)).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert torch.equal(a.aux["selected"], b.aux["selected"]) and torch.equal(a.patches, b.patches)


def test_official_checkpoint_teacher_mismatch_names_the_mlp():
    enc, size, _ = _encoder("eva02_base_patch14_224")
    sd = export_official(enc)
    other = timm.create_model("eva02_base_patch14_224", pretrained=False, num_classes=0, img_size=size, depth=3,
                              embed_dim=64, num_heads=2, mlp_ratio=2.0)
    with pytest.raises(CheckpointError) as e:
        encoder_from_official(sd, other, size, k=6)
    assert "does not match" in str(e.value) and "mlp 128" in str(e.value) and "mlp 170" in str(e.value)


def test_pretrain_folder_round_trip_on_eva02(tmp_path):
    name = "eva02_base_patch14_224"
    enc, size, patch = _encoder(name)
    write_meta(tmp_path, {"selector_depth": 2, "selector_size": [3 * patch, 3 * patch], "img_size": list(size),
                          "r": list(enc.selector.r)})
    save_file({k: v.detach().contiguous().clone() for k, v in enc.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    loaded = encoder_from_pretrain_dir(tmp_path, _model(name, seed=9), size, k=6).eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert torch.equal(a.aux["selected"], b.aux["selected"]) and torch.equal(a.patches, b.patches)
