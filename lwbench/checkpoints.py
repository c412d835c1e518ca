"""Checkpoint layouts a user arrives with -> timm ``VisionTransformer`` keys, and the variant check.

A researcher's ViT weights come in one of a few layouts; lwbench reads them all into timm's
keys before loading (:func:`lwbench.backbones.load_backbone_weights`):

- **timm** state dicts (``blocks.N.attn.qkv``, ``pos_embed``, ``reg_token``): as they are.
- **the original DINOv2 release** (``facebookresearch/dinov2`` ``torch.hub`` files): ``mask_token``,
  ``register_tokens`` and a position embedding that always has a CLS row. timm's DINOv2 models *with*
  registers keep no CLS row (``no_embed_class``), so that row is folded into ``cls_token`` as timm's own
  converter does; here it is done before the grid is resampled, so resampling stays lwbench's
  (bicubic, no antialias, as DINOv2 itself interpolates).
- **Hugging Face** ``Dinov2Model`` / ``Dinov2WithRegistersModel`` and ``ViTModel`` safetensors
  (``embeddings.*``, ``encoder.layer.N.*`` as the Hub's files are written, or transformers 5's ``layers.N.*`` /
  ``q_proj`` names; optionally under ``dinov2.`` / ``vit.`` when saved from a
  ``*ForImageClassification`` model): separate query/key/value matrices concatenated into ``qkv``.
  HF's ``ViTModel`` uses LayerNorm eps 1e-12 where timm's ViTs use 1e-6; the features then differ at
  the 1e-5 level, which is why the equivalence tests state their tolerance.
- **the official LookWhere file** (``{"selector": ..., "extractor": ...}``): its extractor is a timm
  state dict; as ``--weights`` it is the backbone (LookWhere itself reads the whole file through
  ``--set method.weights=PATH``).

A file that still does not fit fails in one line that names the variant the backbone expects and the
one the file holds (width, depth, patch, registers), with the ``--backbone`` to use when it can tell.
"""

from __future__ import annotations

import logging
import re

import torch

from lwbench.errors import CheckpointError

log = logging.getLogger("lwbench")

_SIZE_NAMES = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}


def layout_of(sd: dict[str, torch.Tensor]) -> str:
    """``timm`` | ``dinov2`` (original release) | ``hf-dinov2`` | ``hf-vit`` | ``lookwhere`` | ``unknown``."""
    if "selector" in sd and "extractor" in sd:
        return "lookwhere"
    keys = list(sd)
    stripped = {_strip_hf_prefix(k) for k in keys}
    if "embeddings.patch_embeddings.projection.weight" in stripped:
        return "hf-dinov2" if any(".layer_scale1." in k or k.endswith("embeddings.mask_token") for k in keys) \
            else "hf-vit"
    if "mask_token" in sd or "register_tokens" in sd:
        return "dinov2"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    return "unknown"


def _strip_hf_prefix(key: str) -> str:
    for prefix in ("dinov2.", "vit.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def from_original_dinov2(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The ``facebookresearch/dinov2`` layout -> timm's (registers to ``reg_token``, the CLS row of the position
    embedding folded into ``cls_token`` for timm's no-class-embedding register models, SwiGLU ``w12/w3`` names)."""
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    regs = out.pop("register_tokens", None)
    if regs is not None:
        out["reg_token"] = regs
    wants_cls_row = not getattr(model, "no_embed_class", False)
    if not wants_cls_row and "pos_embed" in out and "cls_token" in out:
        pe = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pe[:, :1]
        out["pos_embed"] = pe[:, 1:]
    renamed = {}
    for k, v in out.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block_chunks > 0 (the giant release)
        renamed[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    return renamed


_HF_LAYER = {  # HF per-layer suffix -> timm per-block suffix (qkv handled apart)
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",  # transformers 4 / 5 names
    # Dinov2Model
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
    # ViTModel
    "layernorm_before": "norm1", "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


def from_hugging_face(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``ViTModel`` keys -> timm's. Pooler and classifier
    weights (``pooler.*``, ``classifier.*``) are dropped: lwbench trains its own task head."""
    sd = {_strip_hf_prefix(k): v for k, v in sd.items()
          if not k.startswith(("classifier.", "pooler.")) and ".pooler." not in k}
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$", k)
        if m:
            layers.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = v
            continue
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v
        elif k == "embeddings.register_tokens":
            out["register_tokens"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        else:
            raise CheckpointError(f"Hugging Face checkpoint: key '{k}' has no timm counterpart; lwbench reads "
                                  "Dinov2Model, Dinov2WithRegistersModel and ViTModel files")
    for i, parts in sorted(layers.items()):
        for kind in ("weight", "bias"):
            qkv = [parts.pop(f"attention.attention.{n}.{kind}", None) for n in ("query", "key", "value")]  # v4 names
            if all(t is None for t in qkv):  # transformers 5 names
                qkv = [parts.pop(f"attention.{n}_proj.{kind}", None) for n in ("q", "k", "v")]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            elif any(t is not None for t in qkv):
                raise CheckpointError(f"Hugging Face checkpoint: layer {i} lacks some of query/key/value {kind}")
        for j in (1, 2):
            ls = parts.pop(f"layer_scale{j}.lambda1", None)
            if ls is not None:
                out[f"blocks.{i}.ls{j}.gamma"] = ls
        for name, t in parts.items():
            stem, kind = name.rsplit(".", 1)
            if stem not in _HF_LAYER:
                raise CheckpointError(f"Hugging Face checkpoint: key 'encoder.layer.{i}.{name}' has no timm "
                                      "counterpart; lwbench reads Dinov2Model, Dinov2WithRegistersModel and ViTModel")
            out[f"blocks.{i}.{_HF_LAYER[stem]}.{kind}"] = t
    if "mask_token" in out or "register_tokens" in out:
        return from_original_dinov2(out, model)  # same token conventions as the original release
    return out


def to_timm_layout(sd: dict, model) -> dict:
    """Any supported layout -> timm keys for ``model``, then :func:`check_variant`."""
    layout = layout_of(sd)
    if layout == "lookwhere":
        log.info("weights: an official LookWhere file; its extractor is the backbone (LookWhere itself reads the "
                 "whole file with --set method.weights=PATH)")
        sd = dict(sd["extractor"])
    elif layout in ("hf-dinov2", "hf-vit"):
        sd = from_hugging_face(sd, model)
    elif layout == "dinov2":
        sd = from_original_dinov2(sd, model)
    check_variant(sd, model)
    return sd


# -- the variant check -----------------------------------------------------------------------------------
def describe(sd: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """Width, depth, patch, registers and class-token facts of a timm-layout state dict (None: not a ViT)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return {"dim": int(w.shape[0]), "patch": int(w.shape[-1]), "depth": (max(blocks) + 1) if blocks else 0,
            "registers": int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
            "cls": int("cls_token" in sd), "layerscale": int(any(".ls1." in k for k in sd))}


def describe_model(model) -> dict[str, int] | None:
    return describe({k: v for k, v in model.state_dict().items()})


def variant_str(a: dict[str, int]) -> str:
    size = _SIZE_NAMES.get(a["dim"], f"{a['dim']}-wide")
    regs = f"{a['registers']} registers" if a["registers"] else "no registers"
    extra = "" if a["cls"] else ", no class token"
    return f"ViT-{size}/{a['patch']} ({a['dim']} wide, {a['depth']} blocks, {regs}{extra})"


def suggest_backbone(found: dict[str, int], name_hint: str = "") -> str | None:
    """A timm DINOv2 name for a DINOv2-shaped checkpoint (the usual mix-up: with vs without registers)."""
    size = {384: "small", 768: "base", 1024: "large", 1536: "giant"}.get(found["dim"])
    if size is None or found["patch"] != 14 or not found["layerscale"]:
        return None
    return f"vit_{size}_patch14_reg{found['registers']}_dinov2" if found["registers"] else f"vit_{size}_patch14_dinov2"


def check_variant(sd: dict[str, torch.Tensor], model) -> None:
    """One line naming the expected and the found variant when the architectures differ (the key-level
    message of :func:`~lwbench.backbones.load_backbone_weights` is for finer mismatches)."""
    found, want = describe(sd), describe_model(model)
    if found is None or want is None:
        return
    keys = ("dim", "patch", "depth", "registers", "cls")
    if all(found[k] == want[k] for k in keys):
        return
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    hint = suggest_backbone(found)
    use = f": use --backbone {hint}" if hint and hint != name else ""
    raise CheckpointError(f"weights are a {variant_str(found)}, but backbone {name} is a {variant_str(want)}{use}")
