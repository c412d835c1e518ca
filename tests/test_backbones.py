"""Backbones: local weight files at another resolution, non-square sizes, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lwbench.backbones import create_backbone
from lwbench.errors import CheckpointError


def test_local_weights_resampled_to_another_size(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("lw_vit_test_p14", 56)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_backbone("lw_vit_test_p14", (42, 70), weights=path)  # 3x5 grid, non-square
    assert dst.pos_embed.shape[1] == 15
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert dst.forward_features(torch.randn(1, 3, 42, 70)).shape == (1, 5 + 15, 48)
    same = create_backbone("lw_vit_test_p14", 56, weights=path)
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(same.eval().forward_features(x), src.eval().forward_features(x))


def test_weights_that_do_not_fit_are_named(tmp_path):
    sd = create_backbone("lw_vit_test_p14", 56).state_dict()
    del sd["blocks.1.attn.qkv.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.attn\.qkv\.weight.*unexpected extra\.weight"):
        create_backbone("lw_vit_test_p14", 56, weights=path)
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("lw_vit_test_p14", 56, weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_backbone("lw_vit_test_p14", 56, weights=tmp_path / "junk.pth")


@pytest.mark.parametrize("name,size", [("vit_small_patch14_reg4_dinov2", (98, 126)),
                                       ("vit_base_patch14_reg4_dinov2", (28, 42))])
def test_dinov2_with_registers_any_size(name, size):
    vit = create_backbone(name, size)
    assert vit.num_prefix_tokens == 5
    out = vit.forward_features(torch.randn(1, 3, *size))
    assert out.shape[1] == 5 + (size[0] // 14) * (size[1] // 14)
