"""Typed options: dataclasses whose fields carry a default, a range and help text, and one coercer.

Every configurable thing in lwbench (the run's sections ``teacher``, ``finetune``, ``eval``,
``measure``, ``head``; each method's options and training stages) is a frozen dataclass built
with :func:`build`. One coercer serves YAML and ``--set`` alike, so ``1e-5`` and ``0.00001`` are the
same float, ``"5"`` is the int 5, ``steps=abc`` fails naming the key, and an unknown key fails
naming the closest valid one (as lm-evaluation-harness does), instead of landing in a key that
nothing reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from lwbench.errors import ConfigError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, choices: tuple | None = None, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with help text and a valid range: ``steps: int = option(300, "optimizer steps", min=0)``."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def close_key(key: str, valid: list[str]) -> str:
    """`` did you mean 'x'?`` for the closest valid key, or ``""``."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union_args(hint: Any) -> tuple | None:
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return typing.get_args(hint)
    return None


def type_name(hint: Any) -> str:
    args = _union_args(hint)
    if args:
        return " | ".join(type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "section"
    origin = typing.get_origin(hint)
    if origin in (tuple, list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(hint) if a is not Ellipsis)}]"
    return getattr(hint, "__name__", str(hint))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, None, unions, tuple/list/dict of them, a dataclass from a
    mapping), or :class:`ConfigError` naming ``key``. Never silently changes a value's meaning: ``5.5`` is not
    an int, ``True`` is not an int, ``"abc"`` is not a float, NaN and infinities are refused."""
    args = _union_args(hint)
    if args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {type_name(hint)}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: is a section ({', '.join(f.name for f in dataclasses.fields(hint))}); "
                              f"set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
        return build(hint, value, where=key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: {value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        number = _number(value, key, "an integer")
        if not number.is_integer():
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return _number(value, key, "a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    origin = typing.get_origin(hint)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: {_short(value)} is not a mapping")
        return {coerce(k, key_hint, key): coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        items = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        if origin is tuple and items and items[-1] is not Ellipsis and len(items) != len(value):
            raise ConfigError(f"{key}: needs {len(items)} values, got {list(value)!r}")
        elem = (lambda i: items[0]) if (origin is list or (items and items[-1] is Ellipsis)) else (lambda i: items[i])
        out = [coerce(v, elem(i), f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {type_name(hint)}")


def _number(value: Any, key: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not {what}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    """A field's range and choices hold for its value, or for each item of a list (``seeds[1]: -1 must be >= 0``)."""
    meta = f.metadata
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_range(item, f, f"{key}[{i}]")
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        names = [str(c) for c in choices]
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}{close_key(str(value), names)}")
    if isinstance(value, (int, float)):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            raise ConfigError(f"{key}: {value!r} must be {'>' if meta.get('min_exclusive') else '>='} {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{key}: {value!r} must be <= {hi}")


def build(cls: type, values: Mapping[str, Any] | None = None, where: str = "", base: Any = None) -> Any:
    """An instance of dataclass ``cls`` from ``values`` (on top of ``base``, an instance, or the defaults):
    unknown keys are refused with the closest valid key, every value is coerced and range-checked."""
    values = dict(values or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = [k for k in values if k not in fields]
    if unknown:
        valid = sorted(flat_keys(cls))
        k = unknown[0]
        value = values[k]
        while isinstance(value, Mapping) and value:  # match the dotted key the user typed: distil.steps
            sub = next(iter(value))
            k, value = f"{k}.{sub}", value[sub]
        close = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix}{k}'{hint} (valid keys of {where or cls.__name__}: "
                          f"{', '.join(valid)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        hint = hints[name]
        value = values[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            current = getattr(base, name) if base is not None else None
            kwargs[name] = build(hint, value, where=f"{prefix}{name}", base=current)
            continue
        value = coerce(value, hint, f"{prefix}{name}")
        _check_range(value, f, f"{prefix}{name}")
        kwargs[name] = value
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def flat_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of ``cls``, sections expanded: ``["steps", "lr", "distill.steps", ...]``."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += flat_keys(hint, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def describe(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` rows for ``lwbench list methods --opts M`` and ``config show``."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        current = getattr(instance, f.name) if instance is not None else (
            f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory is not _MISSING
                                                         else None))
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.", current)
            continue
        meta = f.metadata
        rng = ""
        if meta.get("choices"):
            rng = f" ({'|'.join(map(str, meta['choices']))})"
        elif meta.get("min") is not None or meta.get("max") is not None:
            lo = meta.get("min")
            rng = f" ({'>' if meta.get('min_exclusive') else '>='} {lo})" if meta.get("max") is None else \
                f" ({lo}..{meta['max']})"
        rows.append((f"{prefix}{f.name}", type_name(hint), repr(current), (meta.get("help") or "") + rng))
    return rows


def to_dict(instance: Any) -> dict[str, Any]:
    """A plain nested dict (tuples become lists) of a dataclass instance, for hashing and JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(instance)


def set_nested(tree: dict, dotted: str, value: Any) -> dict:
    """``tree`` with ``a.b.c = value`` (sections created); a non-section in the way is an error."""
    node = tree
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    return tree


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


def split_list(text: str | typing.Sequence[str] | None) -> list[str]:
    """``"a,b, c"`` (or a list of such, as repeated flags give) -> ``["a", "b", "c"]``, order kept, repeats dropped:
    how comma-separated command-line lists (methods, budgets, run ids) are read."""
    if not text:
        return []
    items = [text] if isinstance(text, str) else list(text)
    return list(dict.fromkeys(p.strip() for item in items for p in str(item).split(",") if p.strip()))


__all__ = ["option", "split_list", "coerce", "build", "flat_keys", "describe", "to_dict", "set_nested", "close_key",
           "NoOptions"]
