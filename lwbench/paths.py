"""Where lwbench keeps things: results (the user's) and caches (regenerable)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

# Below this many free bytes a write that failed is taken to have failed for want of space, whatever the library
# said: torch.save reports a full disk as "unexpected pos 576 vs 534", safetensors as an I/O SafetensorError.
NEARLY_FULL_BYTES = 4 << 20


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


def free_bytes(folder: Path) -> int | None:
    """Free space on the file system of ``folder`` (or its nearest existing parent); None when unknown."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def out_of_space(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether ``exc`` (or what caused it) is a write that failed because the disk of ``folder`` is full.

    ``ENOSPC``/``EDQUOT`` and the libraries' own words for them count; so does any other I/O-looking failure
    when ``folder``'s disk has under :data:`NEARLY_FULL_BYTES` left (torch.save names no cause)."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(chain)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        chain = chain.__cause__ or chain.__context__
    if folder is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    free = free_bytes(folder)
    return free is not None and free < NEARLY_FULL_BYTES

