"""One process at a time per training stage folder.

Two runs of a sweep (two shells, two shards on one machine) can reach the same teacher or the same
shared distillation stage at once. Without a lock both train it and overwrite each other's
checkpoints; with it the second waits, then finds the finished result and reuses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


@contextlib.contextmanager
def stage_lock(folder: Path, what: str, quiet: bool = False) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``folder/.lock`` (parents created) for the ``with`` block.

    Tries without blocking first; if another process holds the lock, prints one line
    (``lwbench: waiting for another process training <what> in <folder>``, unless ``quiet``) and
    blocks until it is released. The kernel drops the lock when its holder exits, even on ``kill -9``,
    so a crashed run never leaves a stale lock behind (the empty ``.lock`` file stays; it means nothing).

    flock locks belong to an open file, not to a process: a second ``stage_lock`` on the same folder
    from another thread waits too, and a nested one in the same thread deadlocks. Where ``fcntl`` does
    not exist (Windows) this is a no-op: concurrent runs of one stage are not prevented there.

    Yields the lock file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                logging.getLogger("lwbench").info("waiting for another process training %s in %s", what, folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock


def is_held(folder: Path) -> bool:
    """True if a process holds the :func:`stage_lock` of ``folder`` now (always False without ``fcntl``)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


__all__ = ["stage_lock", "is_held", "LOCK_NAME"]
