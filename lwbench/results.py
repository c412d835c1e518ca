"""The results store: one JSON file per run, read back as a pandas frame.

A run is identified by the hash of its resolved config (:func:`lwbench.schema.config_hash`), so re-running the
same config finds its row and is skipped (unless ``--force``), and any number of processes can write side by
side without a shared index file to corrupt. Each file is written to a temp file in the same folder, fsync'ed
and ``os.replace``'d into place: a reader sees either no row or a whole row, and a killed writer leaves only a
dot-temp file that reading ignores. What a row holds is :mod:`lwbench.schema`; how rows are printed is
:mod:`lwbench.tables`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lwbench.logs import log
from lwbench.paths import temp_beside
from lwbench.schema import FIELD_NAMES, FLOAT_FIELDS, REQUIRED, ResultError, jsonable, type_problem, validate_row

if TYPE_CHECKING:
    import pandas as pd

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the store -------------------------------------------------------------------------------------------


class ResultStore:
    """Rows under ``root/<task>/<method>/<run_id>.json``.

    Example:
        >>> store = ResultStore(Path("results"))
        >>> if not store.has(run_id) or force:
        ...     store.write(row)
        >>> df = store.frame(task="traffic_signs")
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._warned: set[Path] = set()

    # -- paths ---------------------------------------------------------------------------------------
    def path_for(self, row: Mapping[str, Any]) -> Path:
        for key in ("task", "method", "run_id"):
            value = row.get(key)
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ResultError(f"result field {key}={value!r} is not usable in a file name "
                                  f"(letters, digits, _ . + - only)")
        return self.root / row["task"] / row["method"] / f"{row['run_id']}.json"

    def _files(self, task: str | None = None, method: str | None = None) -> list[Path]:
        if not self.root.is_dir():
            return []
        pattern = f"{task or '*'}/{method or '*'}/*.json"
        return sorted(p for p in self.root.glob(pattern) if not p.name.startswith("."))

    # -- reading -----------------------------------------------------------------------------------------
    def _load(self, path: Path) -> dict[str, Any] | None:
        """The row in ``path``, or None (with one warning line per file) if it is unreadable, not a row, or has
        a field of the wrong type. Checking types here, once, means every reader (tables, CSV, JSON, report,
        plots, ``has``) skips the same files with the same line, instead of one crashing deep in pandas and
        another quietly showing the row as "not measured"."""
        try:
            with open(path, encoding="utf-8") as f:
                row = json.load(f)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            self._skip(path, f"unreadable ({err})", "delete it or rerun that config with --force")
            return None
        problem = type_problem(row)
        if problem:
            self._skip(path, problem, "fix or delete the file")
            return None
        for key in FLOAT_FIELDS:
            if key in row and row[key] is None:
                row[key] = math.nan
        return row

    def _skip(self, path: Path, why: str, fix: str) -> None:
        """One warning line per file and store: ``<path>: <why>; skipped (<fix>)``."""
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s: %s; skipped (%s)", path, why, fix)

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The row of ``run_id``, or None when there is none (or only a damaged one)."""
        if not _NAME_RE.match(run_id or ""):
            return None
        for path in sorted(self.root.glob(f"*/*/{run_id}.json")) if self.root.is_dir() else []:
            row = self._load(path)
            if row is not None and row.get("run_id") == run_id:
                return row
        return None

    def has(self, run_id: str) -> bool:
        """True if a complete row for ``run_id`` exists; a damaged file counts as absent, so the run is redone."""
        return self.get(run_id) is not None

    def rows(self, task: str | None = None, method: str | None = None, **equals: Any) -> list[dict[str, Any]]:
        """All readable rows, optionally filtered; ``equals`` filters any field (``source="real"``, ``seed=0``).

        A filter value may be a single value or a list/tuple/set of accepted values.
        """
        out = []
        for path in self._files(task, method):
            row = self._load(path)
            if row is None:
                continue
            if all(_matches(row.get(k), v) for k, v in equals.items()):
                out.append(row)
        return out

    def frame(self, task: str | None = None, method: str | None = None, keep_config: bool = False,
              **equals: Any) -> pd.DataFrame:
        """Rows as a ``pandas.DataFrame`` with the :data:`FIELDS` columns first.

        The nested ``config`` is dropped, or kept as a JSON string with ``keep_config=True``.
        Sorted by task, source, method, gmacs.
        """
        return rows_to_frame(self.rows(task, method, **equals), keep_config=keep_config)

    # -- per-image outcomes (paired comparisons) -----------------------------------------------------------
    def per_image_path(self, row: Mapping[str, Any]) -> Path:
        """``<run_id>.per_image.npz`` beside the row: the test images' outcomes in evaluation order."""
        return self.path_for(row).with_suffix(".per_image.npz")

    def write_per_image(self, row: Mapping[str, Any], arrays: Mapping[str, Any]) -> Path | None:
        """Store ``{metric: per-image array}`` atomically beside ``row`` (written before the row, so a row
        never points at a missing file); ``None`` when there is nothing to store."""
        import numpy as np

        if not arrays:
            return None
        path = self.per_image_path(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path.parent, str(row["run_id"]), suffix=".npz.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def per_image(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The per-image arrays of ``row`` (``{}`` when none were stored or the file is unreadable)."""
        import numpy as np

        path = self.per_image_path(row)
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            if path.exists():
                log.warning("%s: unreadable per-image file (%s); rerun the point with --force", path, err)
            return {}

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, row: Mapping[str, Any]) -> Path:
        """Validate and store ``row`` atomically (replacing an older row of the same run_id); returns its path."""
        row = dict(row)
        row.setdefault("created_at", _now_iso())
        validate_row(row)
        path = self.path_for(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(jsonable(row), indent=1, sort_keys=False, allow_nan=False, ensure_ascii=False) + "\n"
        tmp = temp_beside(path.parent, path.stem)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(path.parent)
        self._warned.discard(path)
        return path


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); harmless no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return value in wanted
    return value == wanted


# -- frames ---------------------------------------------------------------------------------------------------


def rows_to_frame(rows: Iterable[Mapping[str, Any]], keep_config: bool = False) -> pd.DataFrame:
    import pandas as pd

    records = []
    for row in rows:
        rec = dict(row)
        if "config" in rec:
            if keep_config:
                rec["config"] = json.dumps(jsonable(rec["config"]), sort_keys=True)
            else:
                del rec["config"]
        records.append(rec)
    known = [c for c in FIELD_NAMES if keep_config or c != "config"]
    extra = sorted({k for rec in records for k in rec} - set(known))
    df = pd.DataFrame.from_records(records, columns=known + extra)
    for col in FLOAT_FIELDS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return sort_frame(df)


def sort_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Task, then source (real before synthetic), then method, then cost."""
    keys = [c for c in ("task", "source", "method", "gmacs", "budget_value") if c in df.columns]
    if not keys or df.empty:
        return df.reset_index(drop=True)
    return df.sort_values(keys, kind="stable", na_position="last").reset_index(drop=True)
