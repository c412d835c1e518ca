"""LookWhere weights from a file: the official release, or an ``lwbench pretrain lookwhere`` folder.

Official layout (``lookwhere_dinov2.pt``, a ``torch.save``d dict)::

    selector:  backbone: timm state dict of the selector ViT (first 3 blocks of vit_base_patch14_reg4_dinov2
                         at 154 px: pos_embed (1, 121, 768), no head)
               head:     w1.weight (4d, d), w1.bias, w2.weight (r*r, 4d), w2.bias   (r = 4 in the release)
    extractor: timm state dict of the full ViT at 518 px (pos_embed (1, 1369, 768))

The selector depth, its resolution and ``r`` are read from the file; position embeddings are
resampled (timm's filter) to the sizes the task asks for. lwbench's own pretraining folder holds
``model.safetensors`` (keys of :class:`LookWhereEncoder`) and ``lookwhere.json`` (the sizes it was
trained at).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from lwbench.backbones import load_backbone_weights
from lwbench.errors import CheckpointError
from lwbench.sizes import as_hw

from .model import LookWhereEncoder, build_encoder

META = "lookwhere.json"
WEIGHTS = "model.safetensors"


def _few(items, n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# -- architecture ----------------------------------------------------------------------------------
# The hidden width of block 0's MLP, by timm's layouts: ``Mlp`` (fc1 (h, d), fc2 (d, h)), ``SwiGLU`` (EVA-02's
# scale_mlp form: fc1_g and fc1_x (h, d), fc2 (d, h)) and ``GluMlp``/``SwiGLUPacked`` (gate and value packed
# in fc1 (2h, d), fc2 (d, h)). fc2's input width is h in all three; without fc2, fc1_g's rows, then fc1's.
_MLP_KEYS = ("blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc1_g.weight", "blocks.0.mlp.fc1.weight")


def _mlp_width(sd: dict[str, torch.Tensor]) -> int | None:
    for key in _MLP_KEYS:
        if key in sd:
            w = sd[key]
            return int(w.shape[1] if key.endswith("fc2.weight") else w.shape[0])
    return None


def describe_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture facts readable from a timm ViT or Eva state dict (plain, SwiGLU or packed GLU MLPs)."""
    missing = [k for k in ["patch_embed.proj.weight"] if k not in sd]
    mlp = _mlp_width(sd)
    if mlp is None:
        missing.append(" or ".join(_MLP_KEYS))
    if missing:
        raise CheckpointError(f"not a timm ViT state dict: missing {_few(missing)}")
    w = sd["patch_embed.proj.weight"]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    return {
        "dim": int(w.shape[0]),
        "patch": int(w.shape[-1]),
        "depth": max(blocks) + 1,
        "mlp": mlp,
        "registers": int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
    }


def describe_vit(vit: VisionTransformer) -> dict[str, int]:
    return describe_state_dict(vit.state_dict())


def _arch_str(a: dict[str, int]) -> str:
    return f"dim {a['dim']}, depth {a['depth']}, patch {a['patch']}, mlp {a['mlp']}, {a['registers']} registers"


def check_teacher_matches(teacher: VisionTransformer, extractor_sd: dict[str, torch.Tensor], source: str) -> None:
    have, want = describe_vit(teacher), describe_state_dict(extractor_sd)
    if have != want:
        raise CheckpointError(
            f"{source}: the teacher backbone ({_arch_str(have)}) does not match the checkpoint's extractor "
            f"({_arch_str(want)}); use the backbone the checkpoint was trained from (--backbone)")


# -- official format -------------------------------------------------------------------------------
def export_official(encoder: LookWhereEncoder) -> dict[str, Any]:
    """The encoder's weights in the official release layout (for tests and for sharing)."""
    return {
        "selector": {
            "backbone": {k: v.detach().clone() for k, v in encoder.selector.vit.state_dict().items()},
            "head": {k: v.detach().clone() for k, v in encoder.selector.head.state_dict().items()},
        },
        "extractor": {k: v.detach().clone() for k, v in encoder.extractor.vit.state_dict().items()},
    }


def read_official(src: str | Path | dict) -> tuple[dict, str]:
    if isinstance(src, dict):
        sd, name = src, "LookWhere checkpoint"
    else:
        path = Path(src)
        if not path.is_file():
            raise CheckpointError(f"LookWhere checkpoint not found: {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read LookWhere checkpoint {path}: {exc}") from exc
        name = str(path)
    missing = [k for k in ("selector", "extractor") if not isinstance(sd, dict) or k not in sd]
    if not missing:
        missing = [f"selector.{k}" for k in ("backbone", "head") if k not in sd["selector"]]
    if missing:
        raise CheckpointError(f"{name} is not an official LookWhere checkpoint: missing {_few(missing)} "
                              "(expected selector.backbone, selector.head, extractor)")
    return sd, name


def _square(n: int, what: str, name: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"{name}: {what} has {n} entries, not a square grid; cannot infer its size")
    return g


def encoder_from_official(src: str | Path | dict, teacher: VisionTransformer, img_size, k: int,
                          selector_size=None) -> LookWhereEncoder:
    """Build a :class:`LookWhereEncoder` on ``teacher``'s architecture from the official layout.

    ``selector_size`` defaults to the checkpoint's own (the released selector was never trained at
    another size); the extractor's position embedding is resampled to ``img_size``."""
    sd, name = read_official(src)
    sel_sd, head_sd, ext_sd = dict(sd["selector"]["backbone"]), dict(sd["selector"]["head"]), dict(sd["extractor"])
    check_teacher_matches(teacher, ext_sd, name)
    arch = describe_state_dict(sel_sd)
    sel_arch = {k: v for k, v in describe_vit(teacher).items() if k != "depth"}
    if {k: v for k, v in arch.items() if k != "depth"} != sel_arch or arch["depth"] > len(teacher.blocks):
        raise CheckpointError(f"{name}: selector.backbone ({_arch_str(arch)}) is not a prefix of the teacher "
                              f"({_arch_str(describe_vit(teacher))})")
    head_missing = [f"selector.head.{k}" for k in ("w1.weight", "w1.bias", "w2.weight", "w2.bias") if k not in head_sd]
    if head_missing:
        raise CheckpointError(f"{name}: missing {_few(head_missing)}")
    n_pre = 0 if teacher.no_embed_class else teacher.num_prefix_tokens
    r = _square(head_sd["w2.weight"].shape[0], "selector.head.w2", name)
    if "pos_embed" in sel_sd:
        g_low = _square(sel_sd["pos_embed"].shape[1] - n_pre, "selector.backbone.pos_embed", name)
        if selector_size is None:
            selector_size = g_low * arch["patch"]
    elif getattr(teacher, "pos_embed", None) is not None:
        raise CheckpointError(f"{name}: missing selector.backbone.pos_embed")
    elif selector_size is None:  # RoPE only (DINOv3): nothing in the file records the selector's resolution
        raise CheckpointError(f"{name}: the selector has no position embedding (RoPE-only backbone), so the file "
                              "does not record its resolution; set lookwhere's selector_size")
    enc = build_encoder(teacher, k, arch["depth"], selector_size, img_size, r=r)
    for part, module, weights in (("selector.backbone", enc.selector.vit, sel_sd),
                                  ("extractor", enc.extractor.vit, ext_sd)):
        try:
            load_backbone_weights(module, weights)
        except CheckpointError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise CheckpointError(f"{name}: {part} does not fit: {detail}") from None
    own = enc.selector.head.state_dict()
    bad = [f"selector.head.{k} {tuple(head_sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if head_sd[k].shape != v.shape]
    extra = [f"selector.head.{k}" for k in head_sd if k not in own]
    if bad or extra:
        raise CheckpointError(f"{name}: " + "; ".join(
            ([f"shape mismatch {_few(bad)}"] if bad else []) + ([f"unexpected {_few(extra)}"] if extra else [])))
    enc.selector.head.load_state_dict(head_sd)
    return enc


# -- lwbench pretraining folders ----------------------------------------------------------------------
def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def encoder_from_pretrain_dir(path: str | Path, teacher: VisionTransformer, img_size, k: int) -> LookWhereEncoder:
    """Load an ``lwbench pretrain lookwhere`` output folder (or its ``model.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_file, weights = folder / META, (path if path.suffix == ".safetensors" else folder / WEIGHTS)
    if not meta_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a LookWhere pretraining folder: needs {META} and {WEIGHTS}")
    meta = json.loads(meta_file.read_text())
    enc = build_encoder(teacher, k, int(meta["selector_depth"]), meta["selector_size"], meta["img_size"],
                        r=meta["r"])
    sd = load_file(str(weights))
    own = enc.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own)
                   if sd[k].shape != own[k].shape)
    if missing or unexpected or shape:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                     if unexpected else [])
        parts += [f"shape mismatch {_few(shape)}"] if shape else []
        raise CheckpointError(f"{weights} does not fit teacher {_arch_str(describe_vit(teacher))}: " + "; ".join(parts))
    enc.load_state_dict(sd)
    hw = as_hw(img_size)
    if tuple(enc.extractor.vit.patch_embed.img_size) != tuple(hw):
        enc.extractor.vit.set_input_size(img_size=tuple(hw))
        enc.selector.high_grid = tuple(int(g) for g in enc.extractor.vit.patch_embed.grid_size)
    return enc


def load_weights(path: str | Path, teacher: VisionTransformer, img_size, k: int,
                 selector_size=None) -> LookWhereEncoder:
    """Official ``.pt``/``.pth`` file, or an lwbench pretraining folder / ``.safetensors`` file."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        return encoder_from_pretrain_dir(p, teacher, img_size, k)
    return encoder_from_official(p, teacher, img_size, k, selector_size=selector_size)
