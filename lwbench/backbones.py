"""ViT backbones from timm, at any image size, with weights from a file, timm's hub, or none.

lwbench never copies a timm forward body: methods get a plain ``timm`` VisionTransformer (or RoPE
``Eva``) and wrap it. Which timm models are supported is decided by the class of the model built on
the meta device (:func:`lwbench.vit.family_of`), not by its name: every ``VisionTransformer``
(``deit_*``, ``vit_*`` AugReg / MAE / CLIP / SigLIP / DINOv2) and ``Eva`` (``vit_*_dinov3``, ``eva02_*``).

The quick profile's CPU-sized backbones are registered here as ordinary timm models
(``lw_vit_*``), shaped like DINOv2 with registers (CLS + 4 registers, LayerScale, position
embeddings for patches only), so every method exercises the same prefix/LayerScale paths on
the small models as on ``vit_*_patch14_reg4_dinov2``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from lwbench.errors import BudgetError, CheckpointError, UnknownNameError

if TYPE_CHECKING:
    from lwbench.method import BackboneSpec

# name -> VisionTransformer kwargs. Widths/depths sized from CPU measurements (see configs/profiles/quick.yaml).
_LW_CONFIGS: dict[str, dict] = {
    # 2 blocks, 32 wide: unit tests only.
    "lw_vit_test_p8": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "lw_vit_test_p14": dict(patch_size=14, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0),
    # quick-profile teachers.
    "lw_vit_nano_p16": dict(patch_size=16, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0),
    "lw_vit_micro_p16": dict(patch_size=16, embed_dim=160, depth=6, num_heads=4, mlp_ratio=4.0),
    "lw_vit_tiny_p16": dict(patch_size=16, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
}
_DINO_LIKE = dict(class_token=True, reg_tokens=4, no_embed_class=True, init_values=1e-5, global_pool="token")


def _make_lw(name: str):
    def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
        if pretrained:
            raise CheckpointError(f"{name} has no published weights; pass --weights PATH or train it (quick profile)")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        cfg = {**_DINO_LIKE, **_LW_CONFIGS[name], **kwargs}
        cfg.setdefault("img_size", 224)
        return VisionTransformer(**cfg)

    fn.__name__ = name
    fn.__module__ = __name__
    return fn


for _n in _LW_CONFIGS:
    if _n not in timm.list_models(_n):
        setattr(sys.modules[__name__], _n, register_model(_make_lw(_n)))


# timm name patterns of the supported families, for listings and "did you mean" hints; support itself is
# decided per model by its class (check_backbone_name), so a listed name may still be refused.
_LISTED = ("vit_*", "deit_*", "deit3_*", "eva02_*")


def known_backbones() -> list[str]:
    """timm names of the families lwbench supports (VisionTransformer, RoPE Eva) and lwbench's own."""
    return sorted(set(timm.list_models(list(_LISTED))) | set(_LW_CONFIGS))


@functools.lru_cache(maxsize=256)
def _meta_facts(name: str) -> tuple[str | None, int, str | None]:
    """``(family or None, patch size, why it is refused or None)`` of ``name`` at its default size, built on the
    meta device (no weights allocated)."""
    from lwbench.vit import family_of, family_problem

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as exc:  # a model timm cannot build on the meta device is no backbone of ours either
        return None, 0, f"a model timm cannot build without weights ({type(exc).__name__})"
    why = family_problem(model)
    pe = getattr(model, "patch_embed", None)
    patch = int(pe.patch_size[0]) if pe is not None and hasattr(pe, "patch_size") else 0
    return (None if why else family_of(model)), patch, why


def patch_size_of(name: str) -> int:
    if name in _LW_CONFIGS:
        return _LW_CONFIGS[name]["patch_size"]
    check_backbone_name(name)
    return _meta_facts(name)[1]


def _as_hw(img_size) -> tuple[int, int]:
    from lwbench.sizes import as_hw

    return as_hw(img_size)


def check_backbone_name(name: str) -> None:
    if name in _LW_CONFIGS:
        return
    if timm.is_model(name):
        why = _meta_facts(name)[2]
        if why:
            from lwbench.vit import FAMILIES

            raise UnknownNameError(
                f"backbone '{name}' is {why}; lwbench supports timm VisionTransformer and RoPE Eva models, families "
                f"{', '.join(FAMILIES)} (e.g. deit_small_patch16_224, vit_base_patch16_siglip_224, "
                f"vit_small_patch16_dinov3, eva02_tiny_patch14_224)")
        return
    known = known_backbones()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownNameError(
        f"unknown backbone '{name}'.{hint} Known: timm's VisionTransformer and Eva models (deit_*, vit_*, "
        f"vit_*_dinov3, eva02_*; see `timm.list_models`) and {', '.join(_LW_CONFIGS)}"
    )


def check_img_size(img_size, patch: int, what: str = "image size") -> tuple[int, int]:
    h, w = _as_hw(img_size)
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise BudgetError(
            f"{what} {h}x{w} is not divisible by the patch size {patch}; use a multiple of {patch} "
            f"(e.g. {max(patch, round(h / patch) * patch)}x{max(patch, round(w / patch) * patch)})"
        )
    return h, w


def create_backbone(
    name: str,
    img_size,
    weights: str | Path | None = None,
    pretrained: bool = False,
) -> VisionTransformer:
    """Build a timm ViT for ``img_size`` (int or (H, W), any multiple of the patch size).

    Args:
        weights: a local state-dict file (.safetensors, .pth, .pt); position embeddings are resampled
            to ``img_size`` with timm's own filter. Mismatched keys are an error naming them.
        pretrained: ask timm for its published weights (needs the hub or a warm HF cache). When they
            cannot be fetched the model stays randomly initialised and a notice is printed.
    """
    check_backbone_name(name)
    patch = patch_size_of(name)
    hw = check_img_size(img_size, patch)
    kwargs = dict(num_classes=0, img_size=hw)
    if pretrained and weights is None:
        try:
            # Load at the checkpoint's own size, then resample the position embedding ourselves: timm's loader
            # resamples with antialiasing, the official LookWhere and DINOv2 code without (resample_pos_embed).
            native = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # offline, no cache: never train from scratch under a pretrained name
            raise CheckpointError(
                f"pretrained weights for {name} are not available ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); pass --weights PATH (a local "
                f"state dict), put them in the timm/Hugging Face cache (HF_HOME), or use --profile quick, which "
                f"trains its own teacher") from None
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_backbone_weights(model, native.state_dict())
        return model
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def spec_of(name: str, img_size) -> BackboneSpec:
    """The :class:`~lwbench.method.BackboneSpec` of ``name`` at ``img_size`` without allocating weights (the model
    is built on the meta device), so validating a run costs no throwaway ViT."""
    from lwbench.method import BackboneSpec

    check_backbone_name(name)
    hw = check_img_size(img_size, patch_size_of(name))
    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=hw)
    return BackboneSpec.of(vit, name, hw)


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file (or of every file in a checkpoint folder, by relative name), so weights
    enter a run's identity by content: a retrained file at the same path is a new run. Memoised per
    (path, size, mtime) within the process."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for p in files:
            if path.is_dir():
                h.update(str(p.relative_to(path)).encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file {path} is empty (0 bytes): an interrupted download or copy? "
                              "Fetch it again or pass another --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError() of a truncated .pth has no message: name the error instead
        reason = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
        hint = " (the file ends early: truncated?)" if isinstance(exc, EOFError) else ""
        raise CheckpointError(f"cannot read weights file {path}: {reason}{hint}") from exc
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def resample_pos_embed(posemb: torch.Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """``(1, P + H*W, D)`` position embedding on an ``old_hw`` grid -> on ``new_hw``: bicubic, align_corners False,
    **without** antialiasing, as the official LookWhere code and DINOv2's ``interpolate_pos_encoding`` do (timm's
    loader antialiases: at 224 px the extractor's patch outputs then differed from the official ones by up to
    0.15). The ``P`` prefix rows (CLS) are kept as they are."""
    import torch.nn.functional as F

    if tuple(new_hw) == tuple(old_hw):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_hw[0], old_hw[1], d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], d).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def _resample_to(model: VisionTransformer, sd: dict) -> dict:
    """``sd`` with its ``pos_embed`` resampled to ``model``'s grid (a square checkpoint grid, the published
    ones all are); timm's filter then finds nothing left to resample."""
    pe = sd.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.shape == own.shape or pe.ndim != 3:
        return sd
    new_hw = tuple(int(g) for g in model.patch_embed.grid_size)
    prefix = own.shape[1] - new_hw[0] * new_hw[1]
    old_cells = pe.shape[1] - prefix
    side = int(round(old_cells ** 0.5))
    if prefix < 0 or side * side != old_cells:
        return sd  # not a square grid with the same prefix: leave it to timm's filter
    return {**sd, "pos_embed": resample_pos_embed(pe, new_hw, (side, side), prefix)}


def load_backbone_weights(model: VisionTransformer, weights, strict: bool = True) -> None:
    """Load a timm-format ViT state dict (file or dict), resampling position embeddings (:func:`resample_pos_embed`)."""
    from lwbench.checkpoints import to_timm_layout

    sd = read_state_dict(weights) if not isinstance(weights, dict) else weights
    sd = to_timm_layout(dict(sd), model)  # HF Dinov2Model / ViTModel, original DINOv2 -> timm keys; variant check
    sd = _resample_to(model, sd)
    sd = {k: v for k, v in checkpoint_filter_fn(dict(sd), model).items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.startswith("head."))
    unexpected = sorted(k for k in sd if k not in own)
    shape = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or shape):
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shape:
            pairs = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shape]
            parts.append("shape mismatch " + _few(pairs))
        raise CheckpointError("weights do not fit the backbone: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in sd.items() if k in own and sd[k].shape == own[k].shape}, strict=False)


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
