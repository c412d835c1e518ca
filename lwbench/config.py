"""Profiles and the one typed run configuration, :class:`RunConfig`.

A run's configuration exists in one shape: a frozen dataclass resolved once, with the precedence of
lm-evaluation-harness: dataclass defaults < profile YAML (``defaults``, then ``tasks.<task>``, then
``methods.<method>``) < sweep file < command-line flags < ``--set key=value``. Every value is coerced to
its field's type and range-checked by :mod:`lwbench.options`, and an unknown key fails naming the
closest valid one. Every stage (teacher, the method's fit, evaluation, measurement, the row) reads
this object; nothing reads a raw profile dict.

The run id is the hash of the whole resolved config (:meth:`lwbench.runner.Plan.identity`) minus the
short list :data:`lwbench.schema.HASH_EXCLUDE` (output paths, verbosity, the weights *path*, whose
content enters as ``weights_sha256`` instead), so a field added here is part of the identity by default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lwbench.errors import ConfigError, UnknownNameError
from lwbench.options import build, close_key, flat_keys, option, set_nested, to_dict


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
            close = difflib.get_close_matches(name, profile_names(), n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"unknown profile '{name}'.{hint} Known: {', '.join(profile_names())} "
                                   "(or a path to a profile .yaml)")
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



# -- the run's sections ------------------------------------------------------------------------------------
ATTN_QUERIES = ("patch", "cls")
#: How a row's model was obtained from the task-trained backbone (``RunConfig.regime``; ``auto`` resolves per method).
REGIMES = ("auto", "off_the_shelf", "finetuned")
POOLS = ("token", "max", "avg", "token+max")
DTYPES = ("float32", "bfloat16", "float16")
# torch.compile modes of the timed model ("none": eager). Compiled and eager timings are different numbers: the
# mode is a row column, in the run id when not "none", and plots split lines by it.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# float16 autocast is not offered: training under it needs a gradient scaler, and bfloat16 is the CPU's fast path.
AUTOCAST = ("none", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage: AdamW, linear warm-up then cosine (``lwbench/training/loop.py``)."""

    steps: int = option(300, "optimizer steps", min=0)
    batch_size: int = option(32, "images per step", min=1)
    lr: float = option(3e-4, "peak learning rate", min=0, min_exclusive=True)
    weight_decay: float = option(0.05, "AdamW weight decay (weight matrices only)", min=0)
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    grad_clip: float | None = option(1.0, "gradient-norm clip (null: none)", min=0, min_exclusive=True)
    workers: int = option(0, "DataLoader worker processes", min=0)


def _inheriting(base: type, section: str) -> Callable[[type], type]:
    """Class decorator: the decorated class becomes a frozen dataclass with every field of ``base``, in its order,
    each optional and None by default ("inherit ``<section>.<field>``"), with ``base``'s range and help.

    Derived rather than written out so the overriding class cannot drift from the section it overrides: a field
    added to ``base`` is settable here too, with the same checks. The dict :func:`lwbench.options.to_dict` makes
    of an instance (hashed into every run id through the method's options) has ``base``'s keys in ``base``'s order.
    """

    def derive(cls: type) -> type:
        hints = typing.get_type_hints(base)
        cls.__annotations__ = {f.name: hints[f.name] | None for f in dataclasses.fields(base)}
        for f in dataclasses.fields(base):
            meaning = re.sub(r"\s*\(null: [^)]*\)", "", f.metadata.get("help", ""))  # None says "inherit" here
            help_text = f"{meaning} (null: {section}.{f.name})"
            setattr(cls, f.name, dataclasses.field(default=None, metadata={**f.metadata, "help": help_text}))
        return dataclass(frozen=True)(cls)

    return derive


@_inheriting(TrainConfig, "train")
class Stage:
    """A method's training stage: :class:`TrainConfig`'s fields, any left null inheriting the run's ``train``
    section (resolved before hashing, so the stored config always holds the numbers that were used)."""

    def resolved(self, base: TrainConfig) -> Stage:
        """This stage with every unset value taken from ``base`` (the run's ``train`` section)."""
        return Stage(**{k: (v if v is not None else getattr(base, k)) for k, v in to_dict(self).items()})


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    """The task-trained backbone every method starts from (``lwbench/training/teacher.py``)."""

    steps: int = option(0, "optimizer steps of the whole backbone + head (0: the backbone stays as loaded; the head "
                        "then trains alone for probe_steps, a linear probe)", min=0)
    probe_steps: int = option(0, "head-only steps on the frozen backbone before those (pretrained weights: a random "
                              "head's first gradients would otherwise reach the features; with steps=0 the teacher "
                              "is this linear probe)", min=0)
    probe_lr: float = option(1e-3, "peak learning rate of the head-only steps", min=0, min_exclusive=True)
    dense_weight: float = option(0.0, "per-patch object loss weight (tasks with object boxes)", min=0)
    attn_weight: float = option(0.0, "attention-on-objects loss weight", min=0)
    attn_queries: str = option("cls", "query rows of that attention", choices=ATTN_QUERIES)
    attn_blocks: str = option("last", "blocks the attention loss trains: the last one (LookWhere's where-target), "
                              "or every block (also the CLS attention EViT/top-k/ATS prune by)",
                              choices=("last", "all"))
    autocast: str = option("none", "mixed precision of the teacher's training steps (the run's autocast does not "
                           "apply: a shipped or cached float32 teacher serves bfloat16 runs too). Part of the "
                           "teacher id only when not none", choices=AUTOCAST)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = option(64, "evaluation batch size", min=1)
    limit: int | None = option(None, "evaluate N test images, a random subset drawn from the seed, the same for every "
                                     "method (null: all)", min=1)
    bootstrap: int = option(1000, "bootstrap resamples of the test images for the 95% interval (0: none)", min=0)
    bootstrap_seed: int = option(0, "seed of the bootstrap resampling", min=0)


@dataclass(frozen=True)
class MeasureConfig:
    """The measurement protocol; every field is stored in the row (``lwbench/measure/contract.py``)."""

    throughput_batch: int = option(32, "batch size of the throughput measurement", min=1)
    paired: bool = option(True, "time the method against the run's `full` reference in one process, in randomised "
                          "alternating blocks, and report the speed-up with its interval (lwbench/measure/paired.py); "
                          "false: the method alone, no speed-up")
    batches: tuple[int, ...] = option((), "further batch sizes whose paired speed-up is timed besides 1 and "
                                      "throughput_batch (the timing_batches column), e.g. [8, 128]")
    max_run_time: float = option(20.0, "seconds a paired timing may go on while its speed-up interval is wider than "
                                 "1.25x (a busy machine buys more rounds)", min=0, min_exclusive=True)
    warmup: int = option(5, "untimed warm-up calls before timing", min=0)
    min_run_time: float = option(1.0, "seconds each timed measurement lasts at least", min=0, min_exclusive=True)
    min_runs: int = option(10, "timed measurements of latency (throughput: min(min_runs, 5))", min=1)
    memory_batch: int = option(1, "batch size of the peak-memory forward", min=1)
    dtype: str = option("float32", "inference dtype of the timed model", choices=DTYPES)
    compile: str = option("none", "torch.compile mode of the timed model: none (eager), default, reduce-overhead "
                          "or max-autotune; accuracy and MACs stay eager. Part of the run id only when not none",
                          choices=COMPILE_MODES)
    isolate: bool = option(True, "time in a fresh subprocess (peak memory of this model alone)")
    flops_images: int = option(4, "test images the GMACs are averaged over (batch 1 each)", min=1)
    counter: str = option("fvcore", "MAC counter reported", choices=("fvcore", "torch"))
    flop_tolerance: float = option(0.01, "refuse a count when the second counter sees this much more work",
                                   min=0)


@dataclass(frozen=True)
class HeadConfig:
    pool: str = option("token", "classifier pooling: CLS token, max/avg over patches, or both", choices=POOLS)
    decoder: str = option("linear", "segmentation decoder: linear (BN + 1x1 conv per patch, built in) or uper "
                          "(mmseg's UPerHead on a simple feature pyramid; needs pip install 'lwbench[seg]'). Part of "
                          "the run id only when not linear", choices=("linear", "uper"))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one benchmark point. Build it with :func:`resolve_config`."""

    method: str = option("full", "registered method (lwbench list methods)")
    task: str = option("traffic_signs", "registered task (lwbench list tasks)")
    budget: str | None = option(None, "key=value, e.g. k=64 (null: the method's default)")
    profile: str = option("quick", "profile it was resolved from")
    seed: int = option(0, "seed of initialisation, training and data order", min=0)
    source: str = option("auto", "real | synthetic | auto (real when found)", choices=("auto", "real", "synthetic"))
    data_root: str | None = option(None, "folder holding the real dataset")
    backbone: str = option("lw_vit_nano_p16", "timm vit_* name (or lwbench's lw_vit_*)")
    weights: str | None = option(None, "local backbone weights file; enters the run id by its sha256")
    pretrained: bool = option(False, "start from timm's published weights (refused offline without --weights)")
    img_size: tuple[int, int] | None = option(None, "HxW of the high-res input (null: the task's default)")
    device: str = option("auto", "cpu | cuda | auto", choices=("auto", "cpu", "cuda"))
    threads: int | None = option(None, "torch intra-op threads (null: all cores)", min=1)
    regime: str = option("auto", "off_the_shelf: the method on the task-trained backbone, no training (training-free "
                         "methods); finetuned: every method fine-tuned from it with train.* at its budget; auto: "
                         "off_the_shelf for training-free methods, else finetuned", choices=REGIMES)
    autocast: str = option("none", "mixed precision of the method's training steps, the evaluation and every timed "
                           "call: none (float32) or bfloat16 (torch.autocast; fast on CPUs with AVX512-BF16 and on "
                           "recent GPUs); the teacher's is teacher.autocast. Part of the run id only when not none",
                           choices=AUTOCAST)
    head: HeadConfig = option(default_factory=HeadConfig)
    teacher: TeacherConfig = option(default_factory=TeacherConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    eval: EvalConfig = option(default_factory=EvalConfig)
    measure: MeasureConfig = option(default_factory=MeasureConfig)
    task_opts: dict = option(default_factory=dict, help="the task's options (task.<key>=...)")
    method_opts: Any = option(None, help="the method's typed options (method.<key>=...)")
    # Not part of the identity (lwbench.schema.HASH_EXCLUDE):
    results: str | None = option(None, "results folder")
    force: bool = option(False, "rerun even when the run id has a row")
    quiet: bool = option(False, "no progress or notices")
    retrain_teacher: bool = option(False, "train the teacher even when lwbench ships it for this teacher id")

    def replace(self, **changes: Any) -> RunConfig:
        import dataclasses

        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


RUN_SECTIONS = ("head", "teacher", "train", "eval", "measure")
# RunConfig fields the command line (and lwbench.run's keyword arguments) set directly, not through --set.
FLAGS = ("seed", "source", "data_root", "backbone", "weights", "pretrained", "img_size", "device", "threads", "regime",
         "autocast", "retrain_teacher", "results", "force", "quiet")
_PROFILE_KEYS = ("name", "description", "device", "threads", "defaults", "tasks", "methods", "pretrained_recipe")
# ``pretrained_recipe``: a layer applied over ``defaults`` and ``tasks.<task>`` when the backbone starts from real
# weights (``weights`` or ``pretrained``), so a pretrained backbone never gets a from-scratch learning rate. It holds
# run sections (teacher, train, ...) and may hold ``methods.<method>`` option overrides.
# Keys of RunConfig a profile's ``defaults`` / ``tasks.<t>`` blocks may set.
_LAYER_KEYS = ("backbone", "weights", "pretrained", "img_size", "device", "threads", "regime", "autocast", "seed",
               "source",
               "data_root",
               *RUN_SECTIONS, "task_opts")


def run_keys() -> list[str]:
    """Every dotted key ``--set`` accepts at the run level (sections expanded)."""
    skip = ("method", "task", "profile", "method_opts", "task_opts", "results", "force", "quiet", "budget")
    return [k for k in flat_keys(RunConfig) if k.split(".")[0] not in skip]


def _check_layer(layer: dict, where: str) -> None:
    for key in layer:
        if key not in _LAYER_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{close_key(key, list(_LAYER_KEYS))} (valid: "
                              f"{', '.join(_LAYER_KEYS)})")


def _merge_layer(raw: dict, layer: dict | None, where: str) -> dict:
    if not layer:
        return raw
    if not isinstance(layer, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(layer).__name__}")
    _check_layer(layer, where)
    return deep_merge(raw, layer)


def split_sets(sets: list[str] | None, method: str, task: str) -> tuple[dict, dict, dict]:
    """``--set`` items -> (run-level dict, method options, task options), each nested by its dots.

    ``method.x`` / ``methods.<this method>.x`` set this method's options (``methods.<other>.x`` is checked
    and skipped: a sweep file's overrides may name several methods); ``task.x`` / ``tasks.<this task>.x``
    the task's; ``defaults.x`` and plain keys (``teacher.steps``, ``train.lr``, ``measure.warmup``) the run's.
    Unknown run-level keys fail naming the closest valid key."""
    from lwbench.registry import METHODS, TASKS

    run: dict = {}
    mopts: dict = {}
    topts: dict = {}
    valid = run_keys()
    for item in sets or []:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-3), got '{item}'")
        value = parse_value(text)
        parts = key.split(".")
        if parts[0] == "method" and len(parts) > 1:
            set_nested(mopts, ".".join(parts[1:]), value)
        elif parts[0] == "methods" and len(parts) > 2:
            METHODS.get(parts[1])  # a typo in the name fails here, with a suggestion
            if parts[1] == method:
                set_nested(mopts, ".".join(parts[2:]), value)
        elif parts[0] == "task" and len(parts) > 1:
            set_nested(topts, ".".join(parts[1:]), value)
        elif parts[0] == "tasks" and len(parts) > 2:
            TASKS.get(parts[1])
            if parts[1] == task:
                _set_run(run, ".".join(parts[2:]), value, valid)
        elif parts[0] == "defaults" and len(parts) > 1:
            _set_run(run, ".".join(parts[1:]), value, valid)
        else:
            _set_run(run, key, value, valid)
    return run, mopts, topts


def _set_run(run: dict, key: str, value: Any, valid: list[str]) -> None:
    if key.startswith("task_opts."):
        set_nested(run, key, value)
        return
    if key not in valid:
        if key in RUN_SECTIONS:
            first = next(k for k in valid if k.startswith(f"{key}."))
            raise ConfigError(f"--set {key}=...: '{key}' is a section; set one of its keys, e.g. {first}=...")
        raise ConfigError(f"--set: unknown key '{key}'{close_key(key, valid)} (method options are method.<key>, "
                          f"task options task.<key>; `lwbench config keys` lists the rest)")
    set_nested(run, key, value)


def starts_from_weights(*layers: dict) -> bool:
    """Whether the backbone starts from real weights: ``weights`` or ``pretrained`` as the last layer that sets
    them says (profile < flags < ``--set``)."""
    weights, pretrained = None, False
    for layer in layers:
        if layer.get("weights") is not None:
            weights = layer["weights"]
        if layer.get("pretrained") is not None:
            pretrained = layer["pretrained"]
    return bool(weights) or pretrained in (True, "true", "True", 1)


def resolve_config(method: str, task: str, budget: str | None = None, profile: str = "quick",
                   sets: list[str] | None = None, **flags: Any) -> RunConfig:
    """The :class:`RunConfig` of one point: profile YAML < ``flags`` < ``sets``.

    ``flags`` are command-line values (``seed=1``, ``backbone=...``, ``img_size=(240, 320)``, ``source``,
    ``data_root``, ``device``, ``weights``, ``results``, ``force``, ``quiet``, and ``method_opts`` /
    ``task_opts`` dicts); ``None`` means "not given". ``sets`` are ``--set key=value`` strings, applied last.
    The method's options are typed by its ``Options`` dataclass and its stages resolved against ``train``."""
    from lwbench.registry import get_method, get_task

    method_cls = get_method(method)
    get_task(task)
    prof = load_profile(profile)
    for key in prof:
        if key not in _PROFILE_KEYS:
            raise ConfigError(f"profile {profile}: unknown key '{key}'{close_key(key, list(_PROFILE_KEYS))}")
    raw: dict = {}
    for k in ("device", "threads"):
        if prof.get(k) is not None:
            raw[k] = prof[k]
    raw = _merge_layer(raw, prof.get("defaults"), f"profile {profile}: defaults")
    raw = _merge_layer(raw, (prof.get("tasks") or {}).get(task), f"profile {profile}: tasks.{task}")
    mopts = copy.deepcopy((prof.get("methods") or {}).get(method) or {})
    flag_mopts = flags.pop("method_opts", None) or {}
    flag_topts = flags.pop("task_opts", None) or {}
    unknown = [k for k in flags if k not in FLAGS]
    if unknown:
        raise ConfigError(f"unknown option '{unknown[0]}'{close_key(unknown[0], list(FLAGS))}")
    run_sets, set_mopts, set_topts = split_sets(sets, method, task)
    if starts_from_weights(raw, flags, run_sets):
        recipe = dict(prof.get("pretrained_recipe") or {})
        mopts = deep_merge(mopts, (recipe.pop("methods", None) or {}).get(method) or {})
        raw = _merge_layer(raw, recipe, f"profile {profile}: pretrained_recipe")
    topts = dict(raw.pop("task_opts", None) or {})
    for k, v in flags.items():
        if v is not None:
            raw[k] = v
    mopts = deep_merge(mopts, flag_mopts)
    topts = {**topts, **flag_topts}
    topts = {**topts, **set_topts, **(run_sets.pop("task_opts", None) or {})}
    raw = deep_merge(raw, run_sets)
    mopts = deep_merge(mopts, set_mopts)
    raw.update(method=method, task=task, budget=budget, profile=prof["name"])
    cfg = build(RunConfig, raw)
    return cfg.replace(method_opts=method_cls.resolve_options(mopts, cfg.train), task_opts=topts)


__all__ = ["RunConfig", "TrainConfig", "TeacherConfig", "Stage", "EvalConfig", "MeasureConfig", "HeadConfig",
           "resolve_config", "split_sets", "run_keys", "load_profile", "profile_names", "parse_value", "deep_merge",
           "load_yaml"]
