"""Details that must match the official code on identical weights (known answers): position-embedding
resampling without antialias, DynamicViT's floor token counts, densify's tie rule, LookWhere's where-target
queries on teachers without registers. (The selector's antialias option is tested in test_lookwhere.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lwbench.backbones import create_backbone, resample_pos_embed
from lwbench.tokens import TokenOutput, densify

REAL = Path(__file__).resolve().parents[2] / "shared" / "real" / "vit_small_patch14_dinov2.imgfocus.safetensors"


# -- position embeddings --------------------------------------------------------------------------------------
def test_resample_is_plain_bicubic_without_antialias_and_keeps_the_prefix():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 8 * 8, 6)
    out = resample_pos_embed(pe, (4, 6), (8, 8), num_prefix_tokens=1)
    grid = pe[:, 1:].reshape(1, 8, 8, 6).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(out[:, :1], pe[:, :1])
    assert torch.allclose(out[:, 1:], plain.permute(0, 2, 3, 1).reshape(1, 24, 6))
    smooth = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False, antialias=True)
    assert (plain - smooth).abs().max() > 0.1  # timm's default (antialiased) would be another embedding
    assert resample_pos_embed(pe, (8, 8), (8, 8), 1) is pe


def test_weights_at_another_size_load_through_the_plain_resample(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = create_backbone("lw_vit_test_p8", (64, 64))  # 8x8 grid
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_backbone("lw_vit_test_p8", (32, 48), weights=path)  # 4x6 grid: a downsizing
    prefix = dst.pos_embed.shape[1] - 24
    want = resample_pos_embed(src.pos_embed.detach(), (4, 6), (8, 8), prefix)
    assert torch.allclose(dst.pos_embed, want)


@pytest.mark.skipif(not REAL.exists(), reason="../shared/real is absent")
def test_real_dinov2_at_224_uses_the_reference_resample():
    """Real ViT-S/14 (37x37 grid) at 224 px: the embedding is the plain bicubic resample of the checkpoint's, not
    timm's antialiased one (its README: that one moves the 224 px features by up to 1.05)."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    sd = load_file(str(REAL))
    vit = create_backbone("vit_small_patch14_dinov2", (224, 224), weights=REAL)
    want = resample_pos_embed(sd["pos_embed"], (16, 16), (37, 37), 1)
    assert torch.allclose(vit.pos_embed, want, atol=1e-6)
    timm_default = resample_abs_pos_embed(sd["pos_embed"], (16, 16), (37, 37), num_prefix_tokens=1)
    assert (timm_default - want).abs().max() > 1e-3


# -- DynamicViT -------------------------------------------------------------------------------------------------
def test_dynamicvit_keeps_floor_of_n_rho_s_tokens():
    from lwbench.methods.dynamicvit import keep_counts

    assert keep_counts(196, 0.7, 3) == [137, 96, 67]  # the official int(196 * 0.7 ** s)
    assert keep_counts(196, 0.5, 3) == [98, 49, 24]
    assert keep_counts(3, 0.1, 2) == [1, 1]  # never below one token


# -- densify ----------------------------------------------------------------------------------------------------
def _tie_case(where_map=None):
    """A 1x7 grid, tokens at cells 2 and 4 (features 2 and 4), one neighbour: cell 3 is equally far from both."""
    patches = torch.tensor([[[2.0], [4.0]]])
    out = TokenOutput(prefix=torch.zeros(1, 1, 1), patches=patches, positions=torch.tensor([[2, 4]]), grid=(1, 7))
    if where_map is not None:
        out.aux["where_map"] = where_map
    return densify(out, num_neighbors=1)[0, :, 0]


def test_densify_ties_go_to_the_first_token_in_selection_score_order():
    assert _tie_case()[3].item() == 2.0  # no scores: token order
    scores = torch.zeros(1, 7)
    scores[0, 4] = 1.0  # the token at cell 4 was selected first
    assert _tie_case(scores)[3].item() == 4.0
    scores[0, 2] = 2.0
    assert _tie_case(scores)[3].item() == 2.0
    dense = _tie_case(scores)
    assert dense[2].item() == 2.0 and dense[4].item() == 4.0 and dense[0].item() == 2.0 and dense[6].item() == 4.0


# -- LookWhere's where-target ----------------------------------------------------------------------------------
def test_where_target_is_the_cls_row_on_teachers_without_registers():
    from lwbench.method import BackboneSpec
    from lwbench.registry import get_method

    lw = get_method("lookwhere")
    spec = dict(name="t", img_size=(224, 224), patch=14, depth=12, embed_dim=384, num_heads=6)
    plain = lw(BackboneSpec(**spec, num_prefix=1), 32)
    reg = lw(BackboneSpec(**spec, num_prefix=5), 32)
    assert plain.queries() == "cls" and reg.queries() == "patch"  # auto: the paper's default only with registers
    assert plain.resolved_options()["attn_queries"] == "cls"  # in the run id and the row
    assert lw(BackboneSpec(**spec, num_prefix=1), 32, attn_queries="patch").queries() == "patch"  # asked for


# -- ADE20K at the annotation's resolution ------------------------------------------------------------------------
def test_ade20k_miou_is_computed_at_the_original_label_resolution(tmp_path):
    """A 64x64 label of class 1 with a one-pixel column of class 2 (an odd column: nearest resizing to 32x32 drops
    it). A model that predicts class 1 everywhere gets, at the original resolution, IoU 63/64 and 0: mIoU 49.2; on
    the resized label the column is gone and it would get 100."""
    import numpy as np
    from PIL import Image

    from lwbench.stats import statistic
    from lwbench.tasks.ade20k import ADE20K

    root = tmp_path / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
        lab = np.full((64, 64), 2, np.uint8)  # raw id 2 -> class 1
        lab[:, 33] = 3  # raw id 3 -> class 2
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / sub / "ADE_1.jpg")
        Image.fromarray(lab, "L").save(root / "annotations" / sub / "ADE_1.png")

    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 150, x.shape[-2] // 4, x.shape[-1] // 4)
            out[:, 1] = 1.0
            return out

    found = {}
    for res in ("original", "resized"):
        ade = ADE20K(data_root=tmp_path, img_size=32, label_resolution=res)
        found[res] = ade.evaluate(Constant(), ade.loader("test", batch_size=1))
    assert found["original"]["miou"] == pytest.approx(100 * (63 / 64 + 0) / 2)
    assert found["resized"]["miou"] == pytest.approx(100.0)
    assert found["original"]["label_resolution"] == "original"
    per_image = found["original"]["per_image"]["miou"]
    assert per_image.shape == (1, 2, 150) and statistic("miou")(per_image) == pytest.approx(found["original"]["miou"])
    with pytest.raises(Exception, match="label_resolution must be original or resized"):
        ADE20K(data_root=tmp_path, img_size=32, label_resolution="half")
