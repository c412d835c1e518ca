"""Profiles and the resolved run configuration.

Precedence, as in lm-evaluation-harness: command line > ``--config`` YAML > profile YAML > defaults,
with ``--set a.b=c`` overrides on top. The resolved configuration is saved in every result row, and
its hash (over what determines the result, not over paths or verbosity) is the run id.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lwbench.errors import ConfigError, UnknownNameError


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lwbench.configs").joinpath("profiles").iterdir()
                  if p.name.endswith(".yaml"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def load_profile(name: str) -> dict:
    """A profile by name (``quick``, ``paper``) or a path to a profile YAML."""
    if name.endswith((".yaml", ".yml")):
        data = load_yaml(name)
    else:
        if name not in profile_names():
            raise UnknownNameError(f"unknown profile '{name}'. Known: {', '.join(profile_names())}")
        text = resources.files("lwbench.configs").joinpath("profiles", f"{name}.yaml").read_text()
        data = yaml.safe_load(text)
    data.setdefault("name", Path(name).stem)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """``--set`` values: YAML scalars/lists (``3``, ``1e-3``, ``true``, ``[240, 320]``), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; a number was meant
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return value


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """Apply ``a.b=c`` overrides."""
    cfg = copy.deepcopy(cfg)
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-3), got '{item}'")
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = parse_value(value)
    return cfg


def task_profile(profile: dict, task: str) -> dict:
    """The profile's settings for ``task``: its ``defaults`` block merged with ``tasks.<task>``."""
    base = profile.get("defaults", {})
    return deep_merge(base, profile.get("tasks", {}).get(task, {}))
