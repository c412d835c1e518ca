"""lwbench: benchmark LookWhere and token-reduction / token-selection methods for ViTs.

The Python API mirrors the command line::

    import lwbench
    row = lwbench.run(method="lookwhere", task="traffic_signs", budget="k=28", seed=1, **{"eval.limit": 64})
    failures = lwbench.sweep("configs/sweeps/quick.yaml", profile="quick", results="out/")
    lwbench.list_methods()
    cfg = lwbench.configure("lookwhere", "traffic_signs", "k=28", **{"train.lr": 1e-4})  # no run
    model = lwbench.create_model("tome", "vit_small_patch16_224", 224, "r=8")

Heavy imports (torch, timm) happen inside the functions, so ``import lwbench`` is cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lwbench.registry import METHODS, TASKS, register_method, register_task

try:
    __version__ = version("lwbench")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"



def configure(method: str, task: str, budget: str | None = None, profile: str = "quick", **overrides: Any):
    """The resolved :class:`lwbench.config.RunConfig`: ``overrides`` are the command line's flags (``seed=1``,
    ``source="synthetic"``, ``img_size=(240, 320)``) or dotted ``--set`` keys (``**{"train.lr": 1e-4}``,
    ``**{"method.distill.steps": 100}``), applied in that order."""
    from lwbench.config import FLAGS, resolve_config

    flags = {k: v for k, v in overrides.items() if k in FLAGS}
    sets = [f"{k}={_text(v)}" for k, v in overrides.items() if k not in FLAGS]
    return resolve_config(method, task, budget, profile=profile, sets=sets, **flags)


def _text(value: Any) -> str:
    import json

    return json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)


def run(method: str, task: str, budget: str | None = None, profile: str = "quick", **overrides: Any) -> dict:
    """Run one benchmark point (as ``lwbench run``) and return its result row (a flat dict, schema in
    ``results/README.md``); a done run id returns the stored row."""
    from lwbench.logs import setup
    from lwbench.runner import run as run_config

    cfg = configure(method, task, budget, profile, **overrides)
    setup(quiet=cfg.quiet)
    return run_config(cfg)


def sweep(file: str, profile: str | None = None, shard: str | None = None, phase: str = "all",
          **overrides: Any) -> list[tuple[str, str]]:
    """Run a sweep file (as ``lwbench sweep FILE``) and return its failures as (point, one-line reason).
    ``profile`` (when given) wins over the file's ``profile:`` line; ``overrides`` as for :func:`configure`
    (flags such as ``results="out/"``, dotted keys such as ``**{"eval.limit": 64}``) win over its ``set:``."""
    from lwbench.config import FLAGS
    from lwbench.logs import setup
    from lwbench.sweeps import run_sweep

    flags = {"profile": profile, **{k: v for k, v in overrides.items() if k in FLAGS}}
    sets = [f"{k}={_text(v)}" for k, v in overrides.items() if k not in FLAGS]
    setup(quiet=bool(overrides.get("quiet")))
    return run_sweep(file, flags, sets, shard=shard, phase=phase)


def list_methods() -> list[str]:
    """Registered method names (built-ins and plugins)."""
    return METHODS.names()


def list_tasks() -> list[str]:
    return TASKS.names()


def create_model(method: str, backbone: str, img_size, budget: str | None = None, num_classes: int = 1000,
                 weights: str | None = None, **opts: Any):
    """``method`` at ``budget`` around a timm ``backbone`` (random init, or a local ``weights`` file) with a
    linear classifier: an ``nn.Module`` mapping images to logits (``.encoder`` returns a ``TokenOutput``).
    Untrained: use it to count FLOPs, time, or wrap your own training; ``lwbench.run`` trains and evaluates."""
    from lwbench.models import build_model

    return build_model(method, backbone, img_size, budget, num_classes, weights=weights, opts=opts).model


__all__ = ["__version__", "run", "sweep", "configure", "list_methods", "list_tasks", "create_model", "METHODS", "TASKS",
           "register_method", "register_task"]
