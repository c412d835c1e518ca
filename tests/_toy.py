"""Small models and a toy task shared by the method tests (imported as ``_toy``, like ``fixtures``)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lwbench.backbones import create_backbone
from lwbench.config import TrainConfig
from lwbench.heads import ClassifierHead, TaskModel
from lwbench.method import BackboneSpec, freeze
from lwbench.methods.full import FullEncoder
from lwbench.task import Task
from lwbench.training.context import FitContext

# Backbones on a 5x7 patch grid: the tiny test model and the real DINOv2 layout (CLS + 4 registers).
GRID_5X7_CASES = [("lw_vit_test_p8", (40, 56)), ("vit_small_patch14_reg4_dinov2", (70, 98))]
# The tiny model at the toy task's size (4x6 grid) and the real DINOv2 layout.
BACKBONE_CASES = [("lw_vit_test_p8", (32, 48)), ("vit_small_patch14_reg4_dinov2", (70, 98))]


def make(name: str = "lw_vit_test_p8", size=(32, 48)):
    """A seeded backbone in eval mode and its spec."""
    torch.manual_seed(0)
    vit = create_backbone(name, size).eval()
    return vit, BackboneSpec.of(vit, name, size)


class ToyTask(Task):
    name = "toy"
    num_classes = 2
    sources = ("synthetic",)
    default_img_size = (32, 48)

    def check_layout(self, root):
        pass

    def dataset(self, split, train=False):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return TensorDataset(torch.randn(8, 3, *self.img_size, generator=g), torch.randint(0, 2, (8,), generator=g))


def toy_ctx(vit, tmp_path, steps=2) -> FitContext:
    teacher = freeze(TaskModel(FullEncoder(vit), ClassifierHead(vit.embed_dim, 2))).eval()
    defaults = TrainConfig(steps=steps, batch_size=4, lr=1e-3, weight_decay=0.05, warmup_steps=0)
    return FitContext(task=ToyTask(source="synthetic"), teacher=teacher, defaults=defaults, work_dir=tmp_path,
                      shared_dir=tmp_path / "shared", quiet=True)


def check_no_op_budget(method_at, name: str, size) -> None:
    """``method_at(spec)`` (the method at its no-op budget) gives the plain backbone's tokens, in grid order."""
    vit, spec = make(name, size)
    x = torch.randn(2, 3, *size)
    enc = method_at(spec).build(vit).eval()
    with torch.no_grad():
        out, ref = enc(x), FullEncoder(vit)(x)
    torch.testing.assert_close(out.prefix, ref.prefix, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patches, ref.patches, atol=1e-5, rtol=0)
    n = spec.num_patches
    assert torch.equal(out.positions, torch.arange(n).expand(2, n))
