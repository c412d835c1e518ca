"""The sweep file, typed: :class:`SweepSpec` and its ``launch:`` section, and :func:`expand`, its points.

A sweep file is a grid of methods x budgets x tasks x seeds x regimes::

    profile: quick          # optional; a profile given by the caller (``--profile``) wins
    source: synthetic       # optional; the caller's ``--source`` wins
    tasks: [traffic_signs, billiards]
    seeds: [0]
    methods:
      full: null            # no budget knob
      lowres: default       # the method's default grid for this backbone/size
      random: [k=8, k=16, k=32]
    set: [teacher.steps=4]  # --set overrides for every point (the caller's own --set items win)
    regimes: [off_the_shelf, finetuned]   # optional (default [auto]); a trainable method runs finetuned only
    launch: {gpus_per_job: 1}             # optional: how --launcher submitit asks for its jobs

Both sections are option dataclasses built with :func:`lwbench.options.build`, so an unknown key, a wrong type or
an out-of-range value gets the message ``--set`` gives for the run's own keys. Only what spans fields or needs
the registry (task and method names, a budget's key) is checked here by hand. Every problem of a file is listed in
one error before any point runs.

:func:`expand` is the one place that decides precedence: defaults < the file's profile, source and ``set`` < the
caller's flags < the caller's ``--set``; the caller passes only what its user gave.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lwbench.config import REGIMES, RunConfig, load_yaml, resolve_config
from lwbench.errors import ConfigError, UnknownNameError
from lwbench.options import build, close_key, option
from lwbench.sweeps.points import problem_list

SOURCES = next(f for f in dataclasses.fields(RunConfig) if f.name == "source").metadata["choices"]
_NO_BUDGET = (None, "none")  # budgets meaning "run once, without a budget knob"


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How ``--launcher submitit`` requests the jobs of one sweep (the file's ``launch:``; ``--slurm-*`` flags win)."""

    partition: str | None = option(None, "SLURM partition of the jobs")
    gpus_per_job: int = option(0, "GPUs per job", min=0)
    cpus_per_job: int | None = option(None, "CPU cores per job (null: the cluster's default)", min=1)
    timeout_min: int = option(240, "time limit of each job in minutes", min=1)
    array_parallelism: int = option(8, "jobs running at once (SLURM's array limit; a window on the local executor)",
                                    min=1)
    slurm_opts: dict[str, str] = option(default_factory=dict, help="any other sbatch option, e.g. constraint: a100")

    def executor_parameters(self) -> dict[str, Any]:
        """Parameters for ``AutoExecutor.update_parameters``: generic keys for every cluster, ``slurm_*`` keys
        that the local executor ignores."""
        p: dict[str, Any] = {"timeout_min": int(self.timeout_min), "gpus_per_node": int(self.gpus_per_job),
                             "tasks_per_node": 1, "nodes": 1,
                             "slurm_array_parallelism": int(self.array_parallelism)}
        if self.cpus_per_job:
            p["cpus_per_task"] = int(self.cpus_per_job)
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.slurm_opts:
            p["slurm_additional_parameters"] = dict(self.slurm_opts)
        return p


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep file, checked and normalised (:func:`parse_spec`): tasks and seeds without repeats, each method's
    budgets ``None`` (one point, no knob), ``"default"`` (its default grid) or a list of ``key=value``."""

    profile: str | None = option(None, "profile name or a profile YAML's path (the caller's --profile wins)")
    source: str | None = option(None, "real | synthetic | auto (the caller's --source wins)", choices=SOURCES)
    tasks: list[str] = option(default_factory=list, help="registered task names")
    seeds: list[int] = option(default_factory=lambda: [0], help="one point per seed", min=0)
    methods: dict[str, str | list[str] | None] = option(
        default_factory=dict, help="method -> null | default | [key=value, ...]")
    set: list[str] = option(default_factory=list, help="--set items for every point")
    regimes: list[str] = option(default_factory=lambda: ["auto"], help="regimes of the training-free methods",
                                choices=REGIMES)
    launch: LaunchOptions = option(default_factory=LaunchOptions)


def _listed(name: str, value: Any) -> Any:
    """A scalar where the field takes a list means a one-item list (``tasks: traffic_signs``, ``seeds: 3``)."""
    hint = typing.get_type_hints(SweepSpec)[name]
    if typing.get_origin(hint) is list and value is not None and not isinstance(value, (list, tuple, Mapping)):
        return [value]
    return value


def _method_names_hint(value: Any) -> str:
    names = [value] if isinstance(value, str) else [n for n in value if isinstance(n, str)]
    form = ", ".join(f"{n}: {'null' if _budget_key(n) is None else 'default'}" for n in names[:4])
    return (f"'methods' must be a mapping of method name to budgets, not a list; write e.g. methods: "
            f"{{{form or 'full: null, tome: default'}}} (null: no budget knob, default: the method's default grid, "
            f"or a list like [k=8, k=16])")


def _budget_key(name: str) -> str | None:
    """The method's budget key (``"k"``, ``"r"``, ...), None without a knob or when it cannot be loaded."""
    from lwbench.registry import METHODS

    try:
        return getattr(METHODS.get(name), "budget_key", None)
    except Exception:  # unknown or broken: reported elsewhere
        return None


def _check_budgets(name: str, budgets: Any, problems: list[str]) -> Any:
    """``null`` / ``default`` / ``key=value`` items in the method's own key; the normalised budgets."""
    from lwbench.registry import METHODS

    if isinstance(budgets, str) and budgets not in ("default", "none") and "=" in budgets:
        budgets = [budgets]  # `random: k=8` means one budget
    try:
        key = METHODS.get(name).budget_key
    except UnknownNameError as exc:
        problems.append(f"methods: {exc}")
        return budgets
    except Exception:  # a broken plugin: its points fail one by one, with the reason
        return budgets
    example = f"{name}: [{key or 'k'}=8, {key or 'k'}=16]"
    if budgets in _NO_BUDGET:
        return None
    if budgets == "default":
        return None if key is None else "default"  # no knob, no grid: one point, as with null
    if not isinstance(budgets, list) or not budgets:
        problems.append(f"methods: budgets of '{name}' must be null (no budget knob), default (its default grid) or "
                        f"a list like [k=8, k=16], got {budgets!r}")
        return budgets
    if key is None:
        problems.append(f"methods: '{name}' has no budget knob; write {name}: null")
        return budgets
    for b in budgets:
        k, sep, val = b.partition("=")
        try:
            float(val)
        except ValueError:
            sep = ""
        if not sep or not k.strip():
            problems.append(f"methods: budget {b} of '{name}' must look like key=value, e.g. {example}")
            return budgets
    bad = sorted({b.partition("=")[0].strip() for b in budgets} - {key})
    if bad:
        problems.append(f"methods: '{name}' takes budgets {key}=..., not {', '.join(f'{b}=...' for b in bad)}")
    return budgets


def _cross_checks(spec: SweepSpec, problems: list[str], refused: set[str]) -> SweepSpec:
    """What one field's type cannot say: registered names, budgets in each method's key, ``set`` items' form.
    ``refused``: the fields already reported (not reported again as missing)."""
    from lwbench.registry import TASKS

    if not spec.tasks and "tasks" not in refused:
        problems.append("'tasks' is missing or empty; list the tasks to run, e.g. tasks: [traffic_signs]")
    for t in spec.tasks:
        try:
            TASKS.get(t)
        except UnknownNameError as exc:
            problems.append(f"tasks: {exc}")
        except Exception:  # a broken plugin: its points fail one by one, with the reason
            pass
    if not spec.methods and "methods" not in refused:
        problems.append("'methods' is missing or empty; map each method to its budgets, e.g. "
                        "methods: {full: null, tome: default, random: [k=8, k=16]}")
    methods = {name: _check_budgets(name, budgets, problems) for name, budgets in spec.methods.items()}
    for item in spec.set:
        if "=" not in item or not item.partition("=")[0].strip():
            problems.append(f"set: entry '{item}' must look like key=value, e.g. teacher.steps=4")
    return dataclasses.replace(spec, tasks=list(dict.fromkeys(t.strip() for t in spec.tasks)),
                               seeds=list(dict.fromkeys(spec.seeds)), methods=methods,
                               regimes=list(dict.fromkeys(spec.regimes)) or ["auto"])


def parse_spec(data: Any, path: str = "<sweep>") -> SweepSpec:
    """A sweep file's mapping as a :class:`SweepSpec`, or one :class:`ConfigError` listing every problem."""
    if isinstance(data, SweepSpec):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"sweep file {path}: must hold a mapping with keys "
                          f"{', '.join(f.name for f in dataclasses.fields(SweepSpec))}")
    problems: list[str] = []
    values: dict[str, Any] = {}
    fields = list(SweepSpec.__dataclass_fields__)
    refused: set[str] = set()
    for key, value in data.items():  # key by key, so that one error lists every problem
        if key not in fields:  # the file's own top-level keys: named as written, not as a dotted path into its value
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            refused.update(close)  # `methds:` is not also reported as a missing `methods:`
            problems.append(f"unknown key '{key}'{close_key(str(key), fields)} (valid keys of a sweep file: "
                            f"{', '.join(fields)})")
            continue
        value = _listed(key, value)
        try:
            if key == "methods" and isinstance(value, (list, str)):
                raise ConfigError(_method_names_hint(value))
            build(SweepSpec, {key: value}, where="")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        values[key] = value
    spec = _cross_checks(build(SweepSpec, values), problems, refused=refused | (set(data) - set(values)))
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"sweep file {path}: {problems[0]}")
        raise problem_list(f"sweep file {path} has {len(problems)} problems (nothing was run):", problems)
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    """The sweep file at ``path``, checked (:func:`parse_spec`)."""
    return parse_spec(load_yaml(path), str(path))


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None for no shard."""
    if not shard:
        return None
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got '{shard}'")
    return i, n


def expand(spec: SweepSpec | Mapping, flags: Mapping[str, Any] | None = None, sets: Sequence[str] = (),
           shard: str | None = None) -> list[RunConfig]:
    """The sweep's points as resolved :class:`RunConfig` objects, only shard ``i/n``'s (every n-th from i).

    Precedence: defaults < the file's ``profile``, ``source`` and ``set`` < ``flags`` < ``sets``. ``flags`` holds
    what the caller's user gave (``profile``, ``seed``, ``regime`` and the keys of
    :data:`lwbench.config.FLAGS`); a key left out or None means "not given". A ``seed`` or ``regime`` given there
    replaces the file's list. Default grids are resolved against each task's backbone and image size."""
    from lwbench.config import FLAGS
    from lwbench.registry import get_method
    from lwbench.runner import Plan

    spec = parse_spec(spec)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(FLAGS) - {"profile"})
    if unknown:
        raise ConfigError(f"expand: unknown flag '{unknown[0]}' (valid: profile, {', '.join(FLAGS)})")
    profile = flags.pop("profile", None) or spec.profile or "quick"
    seeds = [int(flags.pop("seed"))] if "seed" in flags else spec.seeds
    regimes = [flags.pop("regime")] if "regime" in flags else spec.regimes
    if spec.source and "source" not in flags:
        flags["source"] = spec.source
    sets = [*spec.set, *sets]
    span = parse_shard(shard)
    points = []
    for seed in seeds:
        for task in spec.tasks:
            for method, budgets in spec.methods.items():
                free = get_method(method).training_free
                # a trainable method has no off-the-shelf form: it runs once, fine-tuned, whatever the list says
                mine = list(dict.fromkeys(r if free or r == "auto" else "finetuned" for r in regimes))
                if budgets == "default":
                    quiet = {**flags, "quiet": True}
                    plan = Plan(resolve_config(method, task, None, profile, sets, seed=seed, **quiet))
                    budgets = [f"{plan.method_cls.budget_key}={b:g}" for b in plan.method_cls.budget_grid(plan.spec)]
                for regime in mine:
                    for budget in [None] if budgets in _NO_BUDGET else budgets:
                        points.append(resolve_config(method, task, budget, profile, sets, seed=seed, regime=regime,
                                                     **flags))
    if span:
        i, n = span
        points = points[i::n]
    return points


def launch_options(spec: SweepSpec, flags: Mapping[str, Any] | None = None) -> LaunchOptions:
    """The file's ``launch:`` section with the caller's launch flags on top (same keys, None = not given;
    ``slurm_opts`` items are added to the file's)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    extra = dict(flags.pop("slurm_opts", None) or {})
    opts = build(LaunchOptions, flags, where="launch", base=spec.launch)
    if extra:
        opts = dataclasses.replace(opts, slurm_opts={**opts.slurm_opts, **extra})
    return opts


def parse_slurm_opts(items: Sequence[str] | None) -> dict[str, str]:
    """``--slurm-opt key=value`` items; a malformed one is refused in one line."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--slurm-opt must be key=value (an sbatch option without its dashes), got '{item}'")
        out[key.strip().lstrip("-")] = value.strip()
    return out


__all__ = ["SweepSpec", "LaunchOptions", "parse_spec", "load_spec", "expand", "parse_shard", "launch_options",
           "parse_slurm_opts", "SOURCES"]
