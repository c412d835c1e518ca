"""The one image-size normaliser: ``224``, ``"224"``, ``"240x320"``, ``[240, 320]``, ``(240, 320)`` -> ``(H, W)``."""

from __future__ import annotations

from typing import Any

from lwbench.errors import ConfigError


def as_hw(value: Any, what: str = "image size") -> tuple[int, int]:
    """``(H, W)`` as ints; one line naming ``what`` for anything that is not one or two whole numbers."""
    parts = value.lower().replace(",", "x").split("x") if isinstance(value, str) else value
    if isinstance(parts, (int, float)) and not isinstance(parts, bool):
        parts = [parts]
    try:
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be S or HxW (e.g. 224 or 240x320), got {value!r}") from None
    if len(vals) not in (1, 2) or any(not v.is_integer() or v <= 0 for v in vals):
        raise ConfigError(f"{what} must be S or HxW with positive whole numbers (e.g. 224 or 240x320), got {value!r}")
    h = int(vals[0])
    return (h, int(vals[-1]))


__all__ = ["as_hw"]
