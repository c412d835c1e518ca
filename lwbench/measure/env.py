"""Where a number was measured: hardware, versions, threads, dtype, attention backend, float32 matmul
precision (TF32) and cuDNN autotuning, code version.

Every result row carries this, so that points measured on different machines or code versions
are never compared silently. ``git_sha``/``git_dirty`` describe the lwbench checkout itself: git
runs in the package's own directory, not the current working directory (a user running lwbench
from inside their own repository must not get that repository's commit).

Numeric policy: lwbench leaves PyTorch's defaults for TF32 and cuDNN autotuning alone (float32 matmul
precision ``"highest"``, i.e. no TF32 in matmuls; ``torch.backends.cudnn.benchmark`` False) unless the
user sets them, and records in every row what was in force (``float32_matmul_precision``,
``allow_tf32``, ``cudnn_benchmark``). TF32 can make float32 matmuls several times faster on Ampere and
newer GPUs at a small cost in precision, so a TF32 row and a non-TF32 row are two numeric regimes, not
one comparison. (PyTorch's default lets cuDNN *convolutions* use TF32, ``torch.backends.cudnn.allow_tf32``
True: in a ViT that is only the patch embedding.) The values are read in the process that writes the
row; the isolated timing worker is a fresh process, so a setting made through the Python API (rather
than an environment variable such as ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``) reaches it only if it is
passed on explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_id() -> str:
    """A stable, non-identifying id of this host (hash of the hostname)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """``{"git_sha", "git_dirty"}`` of the checkout lwbench is imported from; both None when it is not
    a git checkout (an installed wheel), even if an unrelated repository encloses site-packages."""
    sha = _git("rev-parse", "HEAD")
    # The package must be tracked by that repository, or it is someone else's repository.
    if sha is None or _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"git_sha": None, "git_dirty": None}
    status = _git("status", "--porcelain")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def attention_backend(device: str | torch.device = "cpu") -> str:
    """What timm's attention uses: fused ``sdpa`` (and, on CUDA, which kernels are enabled) or eager math."""
    from timm.layers import use_fused_attn

    if not use_fused_attn():
        return "eager (timm fused_attn off)"
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        b = torch.backends.cuda
        kernels = [n for n, on in (("flash", b.flash_sdp_enabled()), ("mem_efficient", b.mem_efficient_sdp_enabled()),
                                   ("cudnn", b.cudnn_sdp_enabled()), ("math", b.math_sdp_enabled())) if on]
        return "sdpa(" + ",".join(kernels) + ")"
    return "sdpa"


def numerics() -> dict[str, Any]:
    """The float32 matmul precision and cuDNN autotuning in force (process-wide flags; reading them does not
    initialise CUDA). lwbench sets none of them: see the module docstring."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def environment(
    device: str | torch.device = "cpu",
    threads: int | None = None,
    dtype: str | torch.dtype = "float32",
) -> dict[str, Any]:
    """The measurement environment as a flat dict (keys are result-row columns).

    Only a CUDA ``device`` queries the CUDA runtime."""
    import timm

    device = torch.device(device) if not isinstance(device, torch.device) else device
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "cuda_version": torch.version.cuda if device.type == "cuda" else None,
        "python_version": platform.python_version(),
        "lwbench_version": _dist_version(),  # as lwbench.__version__ reads it; the package face is not imported here
        "threads": int(threads) if threads is not None else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": dtype_name,
        "attention_backend": attention_backend(device),
        **numerics(),
        "platform": platform.platform(),
        "machine_id": machine_id(),
        **git_info(),
    }


def _dist_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lwbench")
    except Exception:
        return None


__all__ = ["environment", "git_info", "machine_id", "device_name", "cpu_name", "attention_backend", "numerics",
           "PACKAGE_DIR"]
