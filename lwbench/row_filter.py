"""Which stored rows a table, plot, report (or a future ``recommend``) reads: ``--where``, ``--run-ids``, ``--sweep``.

A results folder collects whatever was run into it: the README's main job, a Python example with a 50-step teacher
and 64 test images, a sweep. A figure built from all of them compares numbers that answer different questions, so
every reader of rows takes one :class:`RowFilter`:

* ``--where KEY=VALUE`` (repeatable): ``KEY`` is any row column (``seed``, ``n_eval``, ``regime``, ``teacher_id``)
  or a key of the row's resolved config, dotted as ``lwbench config show`` prints it (``train.steps``,
  ``eval.limit``, ``task_opts.scenes``; ``config.train.steps`` also works). ``KEY!=VALUE`` excludes. Values compare
  as numbers when both sides are numbers (``train.lr=5e-4`` finds 0.0005), as ``true``/``false`` for flags,
  ``none`` for missing values, else as text (case-insensitive). The same key given twice means either value
  (``--where method=full --where method=lookwhere``); different keys must all hold.
* ``--run-ids ID,ID``: those rows (a unique prefix of a run id will do).
* ``--sweep FILE``: the rows of the points the sweep file expands to (:func:`lwbench.sweeps.expand` and the
  points' run ids, :func:`lwbench.sweeps.points.run_id`), as the file alone defines them: a sweep run with extra
  flags (``--set``, ``--seed``) has other run ids.

Use it as ``select_rows(store.rows(task="traffic_signs"), where=["seed=0"])``, or build a :class:`RowFilter` once
(``RowFilter.parse(...)``) and ``.apply`` it. A key that is no column is a :class:`~lwbench.errors.ConfigError`
naming the close column names; a filter that keeps nothing says which condition emptied it and the values
present (:meth:`RowFilter.no_match`).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lwbench.errors import ConfigError, LwbenchError
from lwbench.logs import log
from lwbench.options import split_list
from lwbench.schema import FIELD_NAMES, flatten

_NONE = ("", "none", "null", "nan", "-")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
# A run id prefix shorter than this is too easy to match by accident.
MIN_PREFIX = 4


@dataclass(frozen=True)
class Condition:
    """One ``--where``: ``key=value`` (or ``key!=value`` with ``negate``), as the user wrote it."""

    key: str
    value: str
    negate: bool = False

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negate else '='}{self.value}"


def parse_where(items: Iterable[str]) -> tuple[Condition, ...]:
    """``["seed=0", "regime!=finetuned"]`` -> conditions; a malformed item is one :class:`ConfigError` line."""
    out = []
    for item in items or ():
        key, eq, value = str(item).partition("=")
        negate = key.endswith("!")
        key = key.removesuffix("!").strip()
        if not eq or not key:
            raise ConfigError(f"--where needs KEY=VALUE (or KEY!=VALUE), e.g. --where seed=0; got '{item}'")
        out.append(Condition(key, value.strip(), negate))
    return tuple(out)


def parse_run_ids(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a1b2,c3d4"`` (or a list of such) -> ``("a1b2", "c3d4")``."""
    return tuple(split_list(text))


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def matches(actual: Any, text: str) -> bool:
    """Whether a row's value equals what the user typed: numbers as numbers, flags as true/false, a missing value
    as ``none``, lists as ``240,320`` / ``[240, 320]`` / ``240x320``, anything else as case-insensitive text."""
    t = str(text).strip()
    if actual is None or (isinstance(actual, float) and math.isnan(actual)):
        return t.lower() in _NONE
    if isinstance(actual, bool) or type(actual).__name__ == "bool_":
        return t.lower() in (_TRUE if bool(actual) else _FALSE)
    if isinstance(actual, numbers.Real):
        x = _number(t)
        return x is not None and math.isclose(float(actual), x, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(actual, (list, tuple)):
        parts = [p for p in re.split(r"[,x\s]+", t.strip("[]()")) if p]
        return len(parts) == len(actual) and all(matches(a, p) for a, p in zip(actual, parts, strict=True))
    if isinstance(actual, Mapping):
        try:
            return json.loads(t) == actual
        except ValueError:
            return False
    s = str(actual)
    if s.casefold() == t.casefold():
        return True
    a, b = _number(s), _number(t)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


class _Row:
    """A row's columns and its flattened config, looked up as ``--where`` keys are."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.row = row
        self._flat: dict[str, Any] | None = None

    @property
    def flat(self) -> dict[str, Any]:
        if self._flat is None:
            self._flat = flatten(self.row.get("config") or {})
        return self._flat

    def has(self, key: str) -> bool:
        if key != "config" and key in self.row:
            return True
        return key.removeprefix("config.") in self.flat

    def get(self, key: str) -> Any:
        if key != "config" and key in self.row:
            return self.row[key]
        return self.flat.get(key.removeprefix("config."))


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every key ``--where`` accepts for these rows: the schema's fields, extra row fields and config keys."""
    keys = dict.fromkeys(c for c in FIELD_NAMES if c != "config")
    for r in rows:
        keys.update(dict.fromkeys(k for k in r if k != "config"))
        keys.update(dict.fromkeys(flatten(r.get("config") or {})))
    return list(keys)


def _values(rows: list[_Row], key: str, limit: int = 8) -> str:
    vals = sorted({_text(r.get(key)) for r in rows}, key=lambda v: (_number(v) is None, _number(v) or 0, v))
    return ", ".join(vals[:limit]) + (f" ... ({len(vals)} values)" if len(vals) > limit else "")


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple, Mapping)):
        return json.dumps(v)
    return str(v)


@dataclass(frozen=True)
class RowFilter:
    """Which rows to read (see the module docstring); an empty filter keeps every row.

    Example:
        >>> flt = RowFilter.parse(where=["seed=0", "train.steps=100"], run_ids="879c0b820b74,eb8ccf65ef86")
        >>> rows = flt.apply(store.rows(task="traffic_signs"))
    """

    where: tuple[Condition, ...] = ()
    run_ids: tuple[str, ...] = ()
    sweep: str | None = None

    @classmethod
    def parse(cls, where: Iterable[str] = (), run_ids: str | Sequence[str] | None = None,
              sweep: str | None = None) -> RowFilter:
        """From the command line's strings: ``--where`` items, the ``--run-ids`` text, the ``--sweep`` path."""
        return cls(parse_where(where), parse_run_ids(run_ids), str(sweep) if sweep else None)

    def __bool__(self) -> bool:
        return bool(self.where or self.run_ids or self.sweep)

    def describe(self) -> str:
        """The filter as command-line flags: ``--where seed=0 --run-ids a,b --sweep F``."""
        bits = [f"--where {c}" for c in self.where]
        if self.run_ids:
            bits.append(f"--run-ids {','.join(self.run_ids)}")
        if self.sweep:
            bits.append(f"--sweep {self.sweep}")
        return " ".join(bits)

    def check_keys(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Refuse a ``--where`` key that is no column of these rows, naming the close ones (one line)."""
        wrapped = [_Row(r) for r in rows]
        for c in self.where:
            if c.key in FIELD_NAMES or any(r.has(c.key) for r in wrapped):
                continue
            known = columns(rows)
            close = difflib.get_close_matches(c.key, known, n=5, cutoff=0.6)
            close += [k for k in known if k not in close and "." in k and k.split(".")[-1] == c.key][:3]
            hint = (f"did you mean {', '.join(close)}?" if close
                    else f"columns include {', '.join(known[:6])}, ... and config keys such as train.steps")
            raise ConfigError(f"--where {c}: no column '{c.key}' in these rows; {hint} "
                              f"(every column: lwbench results --format csv; config keys: lwbench config keys)")

    def apply(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The rows that pass, in their order. Unknown ``--where`` keys, and ``--run-ids`` that match no row (or
        several, as a prefix), are a :class:`ConfigError`."""
        rows = list(rows)
        if not self:
            return rows
        self.check_keys(rows)
        return [r.row for r in self._by_id(rows, say=True) if self._keeps(r)]  # type: ignore[misc]

    def _by_id(self, rows: list[Mapping[str, Any]], say: bool = False) -> list[_Row]:
        """The rows left by ``--run-ids`` and ``--sweep``."""
        wrapped = [_Row(r) for r in rows]
        if self.run_ids:
            ids = self._resolve_ids(rows)
            wrapped = [r for r in wrapped if r.row.get("run_id") in ids]
        if self.sweep:
            ids = set(sweep_run_ids(self.sweep))
            found = len(ids & {r.row.get("run_id") for r in wrapped})
            if say and found < len(ids):
                log.info("--sweep %s: %d of its %d points have a row here; the rest were not run (or were run "
                         "with other flags, which changes their run ids)", self.sweep, found, len(ids))
            wrapped = [r for r in wrapped if r.row.get("run_id") in ids]
        return wrapped

    def _keeps(self, r: _Row) -> bool:
        wanted: dict[str, list[str]] = {}
        for c in self.where:
            if c.negate:
                if matches(r.get(c.key), c.value):
                    return False
            else:
                wanted.setdefault(c.key, []).append(c.value)
        return all(any(matches(r.get(k), v) for v in vals) for k, vals in wanted.items())

    def _resolve_ids(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        known = [str(r.get("run_id")) for r in rows]
        out = set()
        for rid in self.run_ids:
            if rid in known:
                out.add(rid)
                continue
            hits = sorted({k for k in known if k.startswith(rid)}) if len(rid) >= MIN_PREFIX else []
            if len(hits) == 1:
                out.add(hits[0])
            elif hits:
                raise ConfigError(f"--run-ids: '{rid}' is the start of {len(hits)} run ids ({', '.join(hits[:4])}); "
                                  f"give more of it")
            else:
                raise ConfigError(f"--run-ids: no row has run id '{rid}' among the {len(rows)} rows read; "
                                  f"lwbench results --format csv lists their run ids")
        return out

    def no_match(self, rows: Iterable[Mapping[str, Any]]) -> str:
        """Why the filter keeps none of ``rows``, in one line: the first ``--where`` that empties the selection and
        the values its key has in the rows left before it, e.g. ``no row has seed=3 (seed here: 0, 1)``."""
        left = self._by_id(list(rows))
        if not left:
            return f"no row matches {self.describe()}"
        for i, c in enumerate(self.where):
            kept = [r for r in left if RowFilter(self.where[: i + 1])._keeps(r)]
            if not kept:
                after = f" once {' '.join(str(x) for x in self.where[:i])} is applied" if i else ""
                return f"no row has {c}{after} ({c.key} there: {_values(left, c.key)})"
            left = kept
        return f"no row matches {self.describe()}"


def sweep_run_ids(path: str) -> list[str]:
    """The run ids of the points a sweep file expands to (``lwbench sweep FILE --status`` lists the same); a point
    that cannot even be planned has no row and is left out."""
    from lwbench.sweeps.points import run_id
    from lwbench.sweeps.spec import expand, load_spec

    ids = []
    for cfg in expand(load_spec(path)):
        try:
            ids.append(run_id(cfg))
        except LwbenchError:
            continue
    return list(dict.fromkeys(ids))


def select_rows(rows: Iterable[Mapping[str, Any]], where: Iterable[str] = (),
                run_ids: str | Sequence[str] | None = None, sweep: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``rows`` (``ResultStore.rows()``: dicts with their ``config``) that pass ``--where`` items,
    ``--run-ids`` and ``--sweep``; see :class:`RowFilter`. What ``lwbench results``, ``plot`` and ``report`` use."""
    return RowFilter.parse(where, run_ids, sweep).apply(rows)


__all__ = ["RowFilter", "Condition", "select_rows", "parse_where", "parse_run_ids", "sweep_run_ids", "matches",
           "flatten", "columns"]
