"""Where lwbench keeps things: results (the user's) and caches (regenerable)."""

from __future__ import annotations

import os
import tempfile
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


def temp_beside(folder: Path, name: str, suffix: str = ".tmp") -> Path:
    """A fresh hidden file ``.<name>.XXXX.tmp`` in ``folder`` (created): two writers of one folder never share
    a temporary name; its mode is an ordinary new file's (``0666`` less the umask, as ``open`` gives), not
    mkstemp's 0600, which would hide results, plots and a shared cache from colleagues."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_text_atomic(file: Path, text: str) -> None:
    """Write ``file`` through a temporary file and ``os.replace``: a reader sees the old or the new text,
    never half of it, and a killed writer leaves only a hidden temporary file."""
    file = Path(file)
    tmp = temp_beside(file.parent, file.name)
    try:
        tmp.write_text(text)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def results_dir() -> Path:
    """The results store. ``$LWBENCH_RESULTS`` overrides; default ``./results``."""
    return Path(os.environ.get("LWBENCH_RESULTS", "results"))
