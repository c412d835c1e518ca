"""What is in the cache (trained teachers, method checkpoints) and how to drop one entry.

Everything under :func:`lwbench.paths.cache_dir` can be regenerated, but a teacher costs an hour of
CPU: a damaged or unwanted entry should go on its own, not with the whole cache. Entries are
``teachers/<teacher_id>`` (the task-trained backbone, and under ``methods/`` the stages every budget of
a method shares) and ``runs/<run_id>`` (one config's own training stages). A stage folder is one
:func:`lwbench.training.loop.train_loop` checkpoint folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lwbench.errors import ConfigError

KINDS = {"teachers": "teacher", "runs": "run"}
# config.json keys shown first in a summary, when present
_SUMMARY_KEYS = ("method", "budget", "task", "source", "backbone", "img_size", "weights", "profile", "seed")


@dataclass(frozen=True)
class CacheEntry:
    """One teacher or run folder.

    Attributes:
        id: the folder name (teacher_id / run_id, a config hash).
        kind: "teacher" or "run".
        path: the folder.
        size_bytes: everything under it.
        status: "done" when every stage in it finished, "partial" when one has a checkpoint but no
            ``done.json`` (killed, or training now), "empty" when it holds no stage.
        stages: stage folders relative to ``path`` ("." for the folder itself), sorted.
        summary: a few ``key=value`` of its ``config.json`` ("" without one).
        config: its ``config.json``, or None.
        modified: the newest file's mtime (seconds since the epoch).
    """

    id: str
    kind: Literal["teacher", "run"]
    path: Path
    size_bytes: int
    status: Literal["done", "partial", "empty"]
    stages: tuple[str, ...] = ()
    summary: str = ""
    config: dict[str, Any] | None = field(default=None, compare=False)
    modified: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "stages": list(self.stages)}


def _root(root: Path | None) -> Path:
    if root is not None:
        return Path(root)
    from lwbench.paths import cache_dir

    return cache_dir()


def _summary(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    scalar = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool)) and v != ""}
    keys = [k for k in _SUMMARY_KEYS if k in scalar] or list(scalar)[:6]
    return " ".join(f"{k}={scalar[k]}" for k in keys)


def _scan(folder: Path) -> tuple[int, float, list[Path], list[Path]]:
    """(size, newest mtime, stage folders, finished stage folders) under ``folder``."""
    size, newest, stages, done = 0, 0.0, [], []
    for dirpath, _, files in os.walk(folder):
        here = Path(dirpath)
        if "state.json" in files or "done.json" in files:
            stages.append(here)
            if "done.json" in files:
                done.append(here)
        for name in files:
            try:
                st = (here / name).lstat()
            except OSError:  # removed while we walk
                continue
            size += st.st_size
            newest = max(newest, st.st_mtime)
    return size, newest, stages, done


def _entry(folder: Path, kind: str) -> CacheEntry:
    size, newest, stages, done = _scan(folder)
    config = None
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            loaded = json.loads(cfg.read_text())
            config = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            config = None
    status = "empty" if not stages else "done" if len(done) == len(stages) else "partial"
    rel = tuple(sorted(str(s.relative_to(folder)) for s in stages))
    return CacheEntry(id=folder.name, kind=kind, path=folder, size_bytes=size, status=status, stages=rel,
                      summary=_summary(config), config=config, modified=newest)


def list_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every ``teachers/*`` and ``runs/*`` folder of the cache (``root``, default ``cache_dir()``), teachers
    first, each kind sorted by id."""
    root = _root(root)
    out = []
    for sub, kind in KINDS.items():
        base = root / sub
        if base.is_dir():
            out += [_entry(p, kind) for p in sorted(base.iterdir(), key=lambda p: p.name) if p.is_dir()]
    return out


def resolve(path_or_id: str | Path, root: Path | None = None) -> Path:
    """The folder ``path_or_id`` names: a path inside the cache, or a teacher/run id (or a unique prefix
    of one, as ``lwbench cache ls`` prints them). Raises ``ConfigError`` for anything else."""
    root = _root(root)
    text = str(path_or_id)
    if not text.strip():  # "" joined to a kind folder is the kind folder: `cache rm "$UNSET"` must not empty it
        raise ConfigError(f"an empty cache id ('{text}') names no entry; give a teacher or run id "
                          "(lwbench cache ls lists them)")
    as_path = Path(text).expanduser()
    if as_path.is_absolute() or os.sep in text or (os.altsep and os.altsep in text) or text in (".", ".."):
        in_root = root / as_path  # "runs/<id>/finetune": relative to the cache when it is there
        return _inside(in_root if not as_path.is_absolute() and in_root.exists() else as_path, root)
    exact = [root / sub / text for sub in KINDS if (root / sub / text).is_dir()]
    if not exact:
        exact = [p for sub in KINDS if (root / sub).is_dir() for p in sorted((root / sub).iterdir())
                 if p.is_dir() and p.name.startswith(text)]
    if not exact:
        if as_path.exists():  # a relative folder name in the working directory
            return _inside(as_path, root)
        raise ConfigError(f"no teacher or run '{text}' in the cache {root}; see: lwbench cache ls")
    if len(exact) > 1:
        raise ConfigError(f"'{text}' matches {len(exact)} cache entries "
                          f"({', '.join(f'{p.parent.name}/{p.name}' for p in exact[:4])}); give more of the id")
    return exact[0]


def _inside(path: Path, root: Path) -> Path:
    """``path`` made absolute, if it lies inside ``root`` and is not the root or a kind folder."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a symlink is dropped itself, never its target
    real_root = Path(os.path.realpath(root))
    try:
        rel = Path(os.path.realpath(absolute.parent)).joinpath(absolute.name).relative_to(real_root)
    except ValueError:
        raise ConfigError(f"{path} is outside the lwbench cache {root}; refusing to delete it") from None
    if rel == Path(".") or rel.name in ("", ".", "..") or str(rel) in KINDS:
        raise ConfigError(f"{path} is the cache itself or all its {rel}; name one teacher or run folder")
    if not absolute.exists() and not absolute.is_symlink():
        raise ConfigError(f"{path} does not exist; see: lwbench cache ls")
    return absolute


def drop(path_or_id: str | Path, root: Path | None = None) -> Path:
    """Delete one cache entry (``teachers/<id>``, ``runs/<id>``) or one stage folder inside one, by id or path.

    Refuses paths outside the cache root (default ``cache_dir()``), the root itself, the ``teachers`` and
    ``runs`` folders, and a folder that a process is training right now (its stage lock is held).
    Returns the deleted path."""
    from lwbench.locks import LOCK_NAME, is_held

    target = resolve(path_or_id, root)
    if target.is_symlink() or target.is_file():
        target.unlink()
        return target
    busy = [Path(d) for d, _, files in os.walk(target) if LOCK_NAME in files and is_held(Path(d))]
    if busy:
        raise ConfigError(f"{busy[0]} is being trained by another process now; stop it before dropping {target}")
    shutil.rmtree(target)
    return target


# What a stage folder holds before its first checkpoint: nothing a rerun could resume from.
_BOOKKEEPING = {"config.json", ".lock"}


def prune_unfinished(folder: Path) -> bool:
    """Remove ``folder`` (a teacher or run folder a failed run created) when it holds nothing but bookkeeping
    (``config.json``, lock files, hidden temporaries) and no process is training in it: a disk that filled up
    before the first checkpoint must not leave a teacher that ``cache ls`` lists but nothing can load.
    Folders with any checkpoint are kept: the next run resumes from them. Returns whether it removed it."""
    from lwbench.locks import LOCK_NAME, is_held

    folder = Path(folder)
    if not folder.is_dir():
        return False
    for d, _, files in os.walk(folder):
        if LOCK_NAME in files and is_held(Path(d)):
            return False
        if any(f not in _BOOKKEEPING and not (f.startswith(".") and f.endswith(".tmp")) for f in files):
            return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def describe(folder: Path) -> str:
    """A cache folder in words: what it is, each stage with its steps, time and state, and its config."""
    folder = Path(folder)
    kind = KINDS.get(folder.parent.name)
    entry = _entry(folder, kind or "run") if kind else None
    base = entry.path if entry else folder
    lines = [f"{kind or 'stage'} {folder.name}  ({base})"]
    if entry:
        lines.append(f"status {entry.status}, {format_size(entry.size_bytes)}" +
                     (f"; {entry.summary}" if entry.summary else ""))
    _, _, stages, _ = _scan(folder)
    for stage in sorted(stages):
        done = stage / "done.json"
        info: dict[str, Any] = {}
        try:
            info = json.loads((done if done.is_file() else stage / "state.json").read_text())
        except (OSError, ValueError):
            pass
        state = "done" if done.is_file() else "partial"
        steps = info.get("steps", info.get("step", "?"))
        secs = info.get("elapsed_s", info.get("elapsed"))
        took = f", {float(secs):.0f} s" if isinstance(secs, (int, float)) else ""
        lines.append(f"  stage {str(stage.relative_to(folder)) or '.'}: {state}, {steps} steps{took}")
    cfg = folder / "config.json"
    if cfg.is_file():
        lines.append("config.json:")
        lines += ["  " + line for line in cfg.read_text().splitlines()]
    return "\n".join(lines)


def format_size(n: int) -> str:
    """``1.5 MB``-style size for listings."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


__all__ = ["CacheEntry", "list_entries", "resolve", "drop", "describe", "format_size", "prune_unfinished"]
