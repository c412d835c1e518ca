"""Checkpoint layouts -> timm ``VisionTransformer`` keys (placeholder, filled in below)."""

from __future__ import annotations


def to_timm_layout(sd: dict, model) -> dict:
    return sd
