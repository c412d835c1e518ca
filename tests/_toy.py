"""Small models and a toy task shared by the method tests (imported as ``_toy``, like ``fixtures``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from timm.models.vision_transformer import VisionTransformer
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


def cls_only_vit():
    """A seeded 3-block timm ViT with only a CLS prefix and LayerScale 0.5 on a 5x7 grid (35 patches), and its spec:
    the layout the official merging codes assume, for tests that run them written out naively."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=(40, 56), patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                            num_classes=0, init_values=0.5).eval()
    return vit, BackboneSpec.of(vit, "cls_only", (40, 56))


def recording_ctx(vit, regime: str, calls: list):
    """A stand-in FitContext for ``Method.fit``: the task-trained ``vit`` with a 3-class head, the ``regime``, and a
    ``finetune`` that records ``(tag, every parameter trainable)`` in ``calls`` and returns the model untrained."""
    return SimpleNamespace(
        teacher=SimpleNamespace(encoder=SimpleNamespace(vit=vit), head=torch.nn.Linear(vit.embed_dim, 3)),
        regime=regime,
        finetune=lambda model, tag, **kw: calls.append((tag, all(p.requires_grad for p in model.parameters())))
        or model,
    )


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
