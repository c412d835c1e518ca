"""mmsegmentation decoders (UPerHead) on lwbench's token maps, without mmcv's compiled ops.

mmseg's decode heads and necks are pure PyTorch, but ``import mmseg.models`` pulls ``mmcv.ops``, whose
compiled extension (``mmcv._ext``) has no PyPI wheel: ``mmcv-lite`` ships the Python files only, and building
full mmcv from source takes ~22 minutes on 2 cores. When the real ``mmcv.ops`` cannot be imported,
:func:`import_mmseg` registers a stand-in module under that name *before* mmseg is imported. It exposes mmcv's
own pure-PyTorch ``point_sample`` / ``bilinear_grid_sample`` (loaded from mmcv-lite's ``ops/point_sample.py``)
and a ``sigmoid_focal_loss`` that refuses to run (``mmseg.models.losses`` imports it unconditionally but uses it
on CUDA only); every other name raises ``ModuleNotFoundError``, which is exactly what mmseg's optional imports
(``try: from mmcv.ops import CrissCrossAttention / except ModuleNotFoundError``) catch. Nothing lwbench builds
uses a compiled op.

Supported combination (``pip install 'lwbench[seg]'``): mmsegmentation 1.2.2, mmcv-lite 2.1.0 (or full mmcv
2.1.0, whose compiled ops are then used as they are), mmengine 0.10.7. :func:`check_versions` refuses anything
else in one line before mmseg is imported.

The decoder (:class:`UperSegHead`) follows mmseg's configs for plain ViTs (BEiT / MAE + UPerNet): the last
layer's token map, densified onto the patch grid (:func:`lwbench.tokens.densify`, the same input contract as
:class:`lwbench.heads.LinearSegHead`), goes through mmseg's ``Feature2Pyramid`` neck (the ViTDet-style simple
feature pyramid: deconvolution x4 and x2, identity, max-pool /2, i.e. strides p/4, p/2, p and 2p), then mmseg's
``UPerHead`` (PPM on the coarsest level, FPN fusion, 3x3 bottleneck); its logits (at stride p/4) are upsampled
bilinearly to the input size. BatchNorm stands in for the configs' SyncBN (one process, CPU).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lwbench.errors import LwbenchError
from lwbench.tokens import TokenOutput, densify

# (module, distributions that provide it, supported version prefix, exact version lwbench[seg] installs)
SUPPORTED = (
    ("mmseg", ("mmsegmentation",), "1.2.", "1.2.2"),
    ("mmcv", ("mmcv-lite", "mmcv"), "2.1.", "2.1.0"),
    ("mmengine", ("mmengine",), "0.10.", "0.10.7"),
)
EXTRA_MODULES = ("ftfy", "regex")  # imported by mmseg without being declared
SUPPORTED_TEXT = "mmsegmentation 1.2.2 + mmcv-lite 2.1.0 (or mmcv 2.1.x) + mmengine 0.10.x (+ ftfy, regex)"
INSTALL_HINT = "pip install 'lwbench[seg]'"
STUB_FLAG = "__lwbench_stub__"


class MmsegUnavailableError(LwbenchError, ImportError):
    """mmsegmentation (or its mmcv / mmengine) is missing or at a version lwbench does not support."""


def _version(module: str, dists: tuple[str, ...]) -> str | None:
    """Installed version of ``module`` (from its distribution's metadata, without importing it), or None."""
    if importlib.util.find_spec(module) is None:
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    mod = importlib.import_module(module)  # a source checkout without metadata
    return str(getattr(mod, "__version__", "?"))


def versions() -> dict[str, str | None]:
    """``{"mmseg": "1.2.2", "mmcv": "2.1.0", "mmengine": "0.10.7", "ftfy": ..., "regex": ...}`` (None: missing)."""
    out = {module: _version(module, dists) for module, dists, _, _ in SUPPORTED}
    for module in EXTRA_MODULES:
        out[module] = _version(module, (module,))
    return out


def version_problem(found: dict[str, str | None] | None = None) -> str | None:
    """What is wrong with the installed combination (one line), or None when it is supported."""
    found = versions() if found is None else found
    bad = []
    for module, dists, prefix, _ in SUPPORTED:
        v = found.get(module)
        if v is None:
            bad.append(f"{dists[0]} missing")
        elif not v.startswith(prefix):
            bad.append(f"{dists[0] if module != 'mmcv' else 'mmcv'} {v}")
    bad += [f"{m} missing" for m in EXTRA_MODULES if found.get(m) is None]
    if not bad:
        return None
    return (f"decoder 'uper' needs {SUPPORTED_TEXT}; found {', '.join(bad)}: install them with {INSTALL_HINT}, "
            "or use the built-in decoder=linear")


def check_versions() -> None:
    """Raise :class:`MmsegUnavailableError` (one line, naming the supported versions and the install command)
    unless a supported mmseg / mmcv / mmengine combination is installed."""
    problem = version_problem()
    if problem:
        raise MmsegUnavailableError(problem)


def available() -> bool:
    """True when a supported mmseg combination is installed (nothing imported)."""
    return version_problem() is None


# -- the mmcv.ops stand-in ------------------------------------------------------------------------------------
def _compiled_ops_importable() -> bool:
    """Try the real ``mmcv.ops``; on failure remove the half-imported ``mmcv.ops.*`` modules it left behind."""
    try:
        importlib.import_module("mmcv.ops")
        return True
    except (ImportError, OSError, RuntimeError):  # no mmcv._ext (mmcv-lite), or an ABI mismatch (undefined symbol)
        for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
            del sys.modules[name]
        mmcv = sys.modules.get("mmcv")
        if mmcv is not None and "ops" in vars(mmcv):
            delattr(mmcv, "ops")
        return False


def _load_point_sample() -> types.ModuleType:
    """mmcv-lite's ``mmcv/ops/point_sample.py`` (torch only) loaded as a private module, outside ``mmcv.ops``."""
    import mmcv

    path = Path(mmcv.__file__).parent / "ops" / "point_sample.py"
    name = "lwbench._mmcv_point_sample"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise MmsegUnavailableError(f"mmcv has no {path}; reinstall it with {INSTALL_HINT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _compiled_only(name: str):
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MmsegUnavailableError(f"mmcv.ops.{name} needs mmcv's compiled ops, which mmcv-lite lacks "
                                    "(lwbench's decoders never call it); install full mmcv 2.1.0 to use it")
    refuse.__name__ = name
    return refuse


def _make_stub() -> types.ModuleType:
    stub = types.ModuleType("mmcv.ops", "lwbench's stand-in for mmcv.ops (mmcv-lite: no compiled ops)")
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv.ops", None)
    setattr(stub, STUB_FLAG, True)
    ps = _load_point_sample()
    stub.point_sample = ps.point_sample
    stub.bilinear_grid_sample = ps.bilinear_grid_sample
    stub.sigmoid_focal_loss = _compiled_only("sigmoid_focal_loss")

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"mmcv.ops.{name} is a compiled op: mmcv-lite has none (lwbench's stand-in)",
                                  name=f"mmcv.ops.{name}")

    stub.__getattr__ = __getattr__
    return stub


def ensure_mmcv_ops() -> str:
    """Make ``mmcv.ops`` importable: ``"compiled"`` when mmcv's own is, else ``"stub"`` (the stand-in installed).

    Idempotent; must run before the first ``import mmseg``."""
    current = sys.modules.get("mmcv.ops")
    if current is not None:
        return "stub" if getattr(current, STUB_FLAG, False) else "compiled"
    if _compiled_ops_importable():
        return "compiled"
    import mmcv

    stub = _make_stub()
    sys.modules["mmcv.ops"] = stub
    mmcv.ops = stub
    return "stub"


def ops_kind() -> str | None:
    """``"compiled"``, ``"stub"`` or None (``mmcv.ops`` not set up yet)."""
    current = sys.modules.get("mmcv.ops")
    if current is None:
        return None
    return "stub" if getattr(current, STUB_FLAG, False) else "compiled"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def import_mmseg() -> types.ModuleType:
    """``mmseg.models`` after the version check and, where needed, the ``mmcv.ops`` stand-in."""
    check_versions()
    if "mmseg.models" in sys.modules:
        return sys.modules["mmseg.models"]
    try:
        ensure_mmcv_ops()
    except ImportError as exc:  # mmcv itself (cv2, numpy ABI) does not import
        raise MmsegUnavailableError(f"cannot import mmcv: {_first_line(exc)}; reinstall with {INSTALL_HINT}") from exc
    # mmcv.cnn.bricks.transformer warns that mmcv-lite lacks deformable attention; torch.utils.cpp_extension, which
    # mmengine imports, logs "No CUDA runtime is found" on CPU machines with CUDA_HOME set. Neither concerns us.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("mmseg.models")
    except ImportError as exc:
        raise MmsegUnavailableError(f"cannot import mmseg.models ({ops_kind()} mmcv.ops): {_first_line(exc)}; "
                                    f"lwbench supports {SUPPORTED_TEXT} ({INSTALL_HINT})") from exc
    finally:
        cpp_log.setLevel(level)


# -- the decoder ----------------------------------------------------------------------------------------------
PYRAMID_SCALES = (4, 2, 1, 0.5)  # Feature2Pyramid: strides p/4, p/2, p, 2p


def build_uper(dim: int, num_classes: int, channels: int | None = None, pool_scales: tuple[int, ...] = (1, 2, 3, 6),
               dropout: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """mmseg's ``Feature2Pyramid`` neck and ``UPerHead`` for a ViT of width ``dim``: ``(neck, head)``.

    ``channels`` (UPerHead's inner width) defaults to ``dim``, as mmseg's BEiT / MAE UPerNet configs do
    (768 for ViT-B). Weights are initialised as mmseg does (``init_weights``: conv_seg ~ N(0, 0.01))."""
    import_mmseg()
    from mmseg.models.decode_heads import UPerHead
    from mmseg.models.necks import Feature2Pyramid

    norm = dict(type="BN", requires_grad=True)
    neck = Feature2Pyramid(embed_dim=dim, rescales=list(PYRAMID_SCALES), norm_cfg=norm)
    with warnings.catch_warnings():  # build_loss deprecation, avg_non_ignore: about mmseg's own loss, unused here
        warnings.simplefilter("ignore", UserWarning)
        head = UPerHead(in_channels=[dim] * len(PYRAMID_SCALES), in_index=list(range(len(PYRAMID_SCALES))),
                        pool_scales=tuple(pool_scales), channels=int(channels or dim), dropout_ratio=dropout,
                        num_classes=num_classes, norm_cfg=norm, align_corners=False)
    _quiet_init(head)
    return neck, head


def _quiet_init(module: nn.Module) -> None:
    """mmengine's ``init_weights`` (it logs every initialised parameter through its MMLogger at INFO)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        module.init_weights()
    finally:
        logger.setLevel(level)


class UperSegHead(nn.Module):
    """UPerNet decoder on the densified last-layer tokens: Feature2Pyramid + mmseg's UPerHead, logits upsampled
    to ``size``. Called like every lwbench head: ``head(TokenOutput, size) -> (B, classes, H, W)``."""

    decoder = "uper"

    def __init__(self, dim: int, num_classes: int, channels: int | None = None):
        super().__init__()
        self.neck, self.decode = build_uper(dim, num_classes, channels)

    def forward(self, out: TokenOutput, size: tuple[int, int] | None = None) -> torch.Tensor:
        dense = densify(out)  # (B, N, D)
        h, w = out.grid
        fmap = dense.transpose(1, 2).reshape(dense.shape[0], -1, h, w)
        if min(h, w) < 2:
            raise LwbenchError(f"decoder 'uper' needs a patch grid of at least 2x2 (its pyramid max-pools by 2), "
                               f"got {h}x{w}; use a larger img_size or decoder=linear")
        feats = self.neck([fmap] * len(PYRAMID_SCALES))
        logits = self.decode(list(feats))
        if size is not None:
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


__all__ = ["SUPPORTED", "MmsegUnavailableError", "check_versions", "version_problem", "versions", "available",
           "ensure_mmcv_ops", "ops_kind", "import_mmseg", "build_uper", "UperSegHead"]
