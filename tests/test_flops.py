"""GMACs: the closed form, fvcore with our handles and torch's FlopCounterMode must agree exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lwbench.backbones import create_backbone
from lwbench.errors import BudgetError
from lwbench.flops_report import flops_report, format_flops_report
from lwbench.measure.flops import (
    closed_form_for,
    closed_form_vit_macs,
    count_macs,
    mean_macs_over,
    torch_counter_macs,
)
from lwbench.method import Overhead
from lwbench.registry import METHODS


def _img(hw, seed=0):
    return torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name,hw",
    [
        ("lw_vit_test_p8", (64, 64)),
        ("lw_vit_test_p8", (48, 80)),  # non-square
        ("lw_vit_test_p14", (56, 98)),
        ("vit_small_patch16_224", (160, 256)),  # CLS only, no registers, no LayerScale; resized pos embed
        ("vit_small_patch14_reg4_dinov2", (224, 224)),  # CLS + 4 registers, LayerScale
    ],
)
def test_three_counters_agree_on_plain_backbones(name, hw):
    vit = create_backbone(name, hw).eval()
    x = _img(hw)
    closed = closed_form_for(vit, hw)
    report = count_macs(vit, x)
    assert report.counter == "fvcore"
    assert report.macs == closed
    assert torch_counter_macs(vit, x) == closed
    assert report.unsupported_ops == []
    # Attention is counted (stock fvcore drops it): depth * N^2 * (dqk + dv) per head, summed over heads.
    n = (hw[0] // vit.patch_embed.patch_size[0]) * (hw[1] // vit.patch_embed.patch_size[0]) + vit.num_prefix_tokens
    assert report.by_operator["scaled_dot_product_attention"] == len(vit.blocks) * n * n * 2 * vit.embed_dim
    # Elementwise work is listed, not counted.
    assert {"aten::layer_norm", "aten::gelu", "aten::add"} <= set(report.uncounted_ops)


def test_closed_form_known_numbers():
    # ViT-B/14 DINOv2 with 4 registers at 224: 256 patches + 5 prefix tokens, 12 blocks, d=768, h=3072.
    n, d, h = 261, 768, 3072
    block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * h
    assert closed_form_vit_macs(12, d, h, n, 256, 14) == 256 * d * 3 * 14 * 14 + 12 * block == 23_539_156_992
    assert closed_form_vit_macs(12, d, h, n, 256, 14, num_classes=1000) == 23_539_156_992 + 768_000


@pytest.mark.parametrize("k", [8, 16])
def test_random_method_matches_closed_form_at_k(k):
    d = flops_report("random", "lw_vit_test_p8", 64, budget=f"k={k}", num_classes=10)
    vit = create_backbone("lw_vit_test_p8", 64)
    expected = closed_form_vit_macs(depth=2, dim=32, mlp_hidden=64, num_tokens=k + 5, num_patches=k, patch=8,
                                    num_classes=10)
    assert d["gmacs"] * 1e9 == pytest.approx(expected, abs=0.5)
    assert d["torch_counter_gmacs"] * 1e9 == pytest.approx(expected, abs=0.5)
    assert d["closed_form_gmacs"] * 1e9 == closed_form_for(vit, 64, num_classes=10)
    assert d["tokens"] == k
    assert d["parts_gmacs"]["overhead"] == 0 and d["parts_gmacs"]["head"] * 1e9 == pytest.approx(320)


def test_full_vit_b14_reg4_at_224_is_23_54_gmacs():
    d = flops_report("full", "vit_base_patch14_reg4_dinov2", 224)
    assert d["gmacs"] == pytest.approx(23.54, rel=0.005)
    assert d["gmacs"] == pytest.approx(d["closed_form_gmacs"], rel=1e-12)
    assert d["torch_counter_gmacs"] == pytest.approx(d["gmacs"], rel=1e-12)
    assert d["params_m"] == pytest.approx(86.5, abs=0.1)
    assert d["tokens"] == 256 and d["budget"] == "-"
    text = format_flops_report(d)
    assert "GMACs (multiply-accumulates)" in text and "23.54" in text


class _Scorer(Overhead):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)  # 4 tokens x 12 x 3 = 144 MACs

    def forward(self, t):
        return self.fc(t)


class _ToyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)  # 4 x 6 x 12 = 288
        self.scorer = _Scorer()
        self.nested = nn.Sequential(_Scorer())  # an Overhead inside a plain module: 144
        self.body = nn.Linear(12, 12)  # 4 x 12 x 12 = 576

    def forward(self, x):
        t = self.embed(x)
        s = self.scorer(t) + self.nested(t)
        return self.body(t), s


class _ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _ToyEncoder()
        self.head = nn.Linear(12, 5)  # 12 x 5 = 60 (mean-pooled)

    def forward(self, x):
        t, s = self.encoder(x)
        return self.head(t.mean(1)) + s.sum()


@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_overhead_head_backbone_split_on_toy_model(counter):
    model = _ToyModel()
    r = count_macs(model, torch.randn(1, 4, 6), counter=counter)
    assert r.counter == counter
    assert r.parts == {"overhead": 288, "head": 60, "backbone": 288 + 576}
    assert r.macs == 288 + 576 + 288 + 60
    assert r.params == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)


def test_counts_are_per_image():
    vit = create_backbone("lw_vit_test_p8", 32)
    one = count_macs(vit, _img((32, 32))).macs
    assert count_macs(vit, torch.randn(3, 3, 32, 32)).macs == one


class _DataDependent(nn.Module):
    """Keeps as many tokens as the first pixel row has positive values: cost depends on the image."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        k = int((x[0, 0, 0] > 0).sum())
        return self.fc(x[0, 0, :k]).sum()


def test_mean_macs_over_averages_data_dependent_costs():
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 0, :2] = 1  # 2 tokens kept -> 2 x 8 x 16 = 256
    b = torch.zeros(1, 1, 8, 8)
    b[0, 0, 0, :6] = 1  # 6 tokens -> 768
    model = _DataDependent()
    assert count_macs(model, a).macs == 256 and count_macs(model, b).macs == 768
    r = mean_macs_over(model, [torch.cat([a, b])])
    assert r.macs == 512 and r.images == 2


class _Products(nn.Module):
    def forward(self, x, w, a, b):
        out = (x @ w).sum()  # broadcast matmul (2,3,4,5)@(5,6): 2*3*4*6*5 = 720
        out = out + torch.bmm(a, b).sum() + torch.baddbmm(torch.zeros(2, 4, 3), a, b).sum()  # 120 each
        out = out + torch.einsum("bij,bjk->bik", a, b).sum()  # 120
        out = out + torch.addmm(torch.zeros(4, 3), a[0], b[0]).sum() + (a[0] @ b[0, :, 0]).sum()  # 60 + 20
        return out


def test_matrix_product_handles_exact():
    args = (torch.randn(2, 3, 4, 5), torch.randn(5, 6), torch.randn(2, 4, 5), torch.randn(2, 5, 3))
    r = count_macs(_Products(), args)
    assert r.counter == "fvcore" and r.unsupported_ops == []
    assert r.macs == 720 + 3 * 120 + 60 + 20


class _Kron(nn.Module):
    def forward(self, x):
        return torch.kron(x, x).sum()


def test_unknown_ops_are_reported_not_hidden():
    r = count_macs(_Kron(), torch.randn(4, 4))
    assert r.unsupported_ops == ["aten::kron"]


class _ShapesAsInts(nn.Module):
    """Python that jit tracing breaks (a traced shape is a 0-dim tensor): counted by the torch fallback."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        rows = [torch.full((x.shape[0],), n) if not isinstance(n, torch.Tensor) else n]
        return self.fc(x).sum() + torch.stack(rows, dim=1).sum()


def test_untraceable_model_falls_back_to_torch_counter():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = count_macs(_ShapesAsInts(), torch.randn(1, 3, 4))
    assert r.counter == "torch" and r.macs == 3 * 4 * 4
    assert any("fvcore could not trace" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_is_fully_counted(method):
    """Each registered method: no op with work goes uncounted, and both counters agree (total and split)."""
    try:
        d = flops_report(method, "lw_vit_test_p8", 64, num_classes=10)
    except BudgetError as exc:  # default budget impossible on the tiny grid
        pytest.skip(str(exc))
    assert d["unsupported_ops"] == []
    assert 0 < d["gmacs"] <= 1.5 * d["closed_form_gmacs"]
    parts = d["parts_gmacs"]
    assert sum(parts.values()) == pytest.approx(d["gmacs"], rel=1e-9)
    if d["counter"] == "fvcore":
        assert d["torch_counter_gmacs"] == pytest.approx(d["gmacs"], rel=1e-9)
