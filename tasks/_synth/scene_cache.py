"""Rendered synthetic scenes kept on disk as one uint8 array per split, so that training draws them instead of
drawing them again: rendering a 240x320 traffic scene with PIL costs 10-15 ms, a third of a teacher step's time
and half of a LookWhere distillation step's on 2 cores, and every epoch of every stage redrew the same images.

The array is the exact ``uint8`` image ``render`` returned (the float tensor is made from it as before), so a
cached scene and a freshly drawn one are bit-for-bit equal (tested): cached or not, training sees the same
numbers. The key is everything the pixels depend on (scene settings, seed, split, count, the generator's version
and Pillow's), so another setting or another Pillow draws afresh. Written whole and atomically under a lock; a
damaged file is drawn again. ``$LWBENCH_CACHE/scenes`` holds them (about 230 KB per 240x320 image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("lwbench")


def _key_name(key: dict[str, Any]) -> str:
    import PIL

    blob = json.dumps({**key, "pillow": PIL.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(path: Path, n: int, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return arr if arr.shape == (n, *shape, 3) and arr.dtype == np.uint8 else None


def scenes(key: dict[str, Any], n: int, shape: tuple[int, int], render: Callable[[int], Any],
           what: str = "scenes") -> np.ndarray:
    """``(n, H, W, 3)`` uint8 (memory-mapped): ``render(i)`` (a PIL image or array) for every ``i``, drawn once."""
    from tqdm.auto import tqdm

    from lwbench.locks import stage_lock
    from lwbench.logs import is_quiet
    from lwbench.paths import cache_dir

    folder = cache_dir() / "scenes"
    path = folder / f"{_key_name(key)}.npy"
    arr = _load(path, n, shape) if path.is_file() else None
    if arr is not None:
        return arr
    with stage_lock(folder, what, quiet=is_quiet()):
        arr = _load(path, n, shape) if path.is_file() else None  # drawn meanwhile by the process we waited for
        if arr is not None:
            return arr
        if path.is_file():
            log.warning("%s: %s is damaged or stale; drawing it again", what, path)
        log.info("%s: drawing %d images once into the scene cache (%s)", what, n, path)
        out = np.empty((n, *shape, 3), dtype=np.uint8)
        for i in tqdm(range(n), desc=f"drawing {what}", unit="img", disable=is_quiet() or None, leave=False):
            out[i] = np.asarray(render(i), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, out)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return np.load(path, mmap_mode="r")
