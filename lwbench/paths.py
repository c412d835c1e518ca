"""Where lwbench keeps things: results (the user's) and caches (regenerable)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Synthetic datasets, trained teachers and method checkpoints. ``$LWBENCH_CACHE`` overrides."""
    root = os.environ.get("LWBENCH_CACHE")
    path = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lwbench"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, read-only file system
        from lwbench.errors import ConfigError

        in_the_way = path.exists() and not path.is_dir()
        what = "is a file, not a folder" if in_the_way else f"cannot be created ({exc.strerror})"
        raise ConfigError(f"cache folder {path} {what}; set LWBENCH_CACHE to a writable folder") from None
    return path


def results_dir() -> Path:
    """The results store. ``$LWBENCH_RESULTS`` overrides; default ``./results``."""
    return Path(os.environ.get("LWBENCH_RESULTS", "results"))
