"""The result row's schema and identity: the fields a row has, how a config becomes its run id, what is storable.

One declaration (:data:`FIELDS`) that the store (:mod:`lwbench.results`), the tables (:mod:`lwbench.tables`),
the runner and ``results/README.md`` are all checked against, and one hash (:func:`config_hash`) that names
a run, so a row's identity does not depend on who stores or prints it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from lwbench.errors import LwbenchError

# The row schema, declared once: (name, type, meaning). Order = column order of frames and CSV files.
# results/README.md's table is tested against it, and so is every key the runner writes (tests/test_schema.py).
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("run_id", "str", "= config_hash; also the file name"),
    ("config_hash", "str", "hash of the resolved config without HASH_EXCLUDE (see config_hash())"),
    ("replicate_id", "str", "hash of the config without its seed: rows that differ only in seed share it"),
    ("teacher_id", "str", "hash of what the task-trained backbone depends on (its cache folder)"),
    ("method", "str", "registered method name"),
    ("budget", "str", "'k=64', 'r=8', ... or '-' for methods without a budget"),
    ("budget_key", "str", "'k', 'r', 'keep_rate', 'size', ... or '-'"),
    ("budget_value", "float", "the budget's number, NaN for none"),
    ("task", "str", "registered task name"),
    ("source", "str", "'real' or 'synthetic'"),
    ("backbone", "str", "timm model name"),
    ("img_size", "str", "'HxW' of the high-res input"),
    ("profile", "str", "'quick', 'paper', ..."),
    ("seed", "int", "seed of initialisation, training and data order"),
    ("metric", "str", "name of the task's headline metric ('top1', 'miou')"),
    ("metric_value", "float", "value of that metric (%, higher is better); never NaN"),
    ("metric_ci_low", "float", "lower end of the 95% bootstrap interval of metric_value over test images"),
    ("metric_ci_high", "float", "upper end of that interval"),
    ("metric_se", "float", "bootstrap standard error of metric_value"),
    ("bootstrap_resamples", "int", "resamples behind the interval (0: none, interval NaN)"),
    ("bootstrap_seed", "int", "seed of the resampling"),
    ("regime", "str", "'off_the_shelf' (no training on top of the teacher) or 'finetuned' (train.* at the budget)"),
    ("teacher_steps", "int", "training steps of the task-trained backbone (0: used as loaded)"),
    ("teacher_probe_steps", "int", "head-only steps on the frozen backbone before those (teacher_steps 0: the "
                                   "teacher is a linear probe)"),
    ("init", "str", "where the backbone's weights came from before the teacher: 'scratch' (random), "
                    "'weights:<sha256[:12]>' (a file) or 'timm:<name>' (timm's published weights)"),
    ("pretrain_steps", "int", "steps of the method's stages before fine-tuning (LookWhere's distillation), else 0"),
    ("finetune_steps", "int", "task fine-tuning steps on top of the teacher at this budget (0: off the shelf)"),
    ("finetune_recipe", "str", "steps, lr, batch, warm-up of that fine-tuning ('-': none); equal across a comparison"),
    ("top1", "float", "top-1 accuracy (%), NaN for segmentation"),
    ("top5", "float", "top-5 accuracy (%), NaN when not applicable"),
    ("miou", "float", "mean IoU (%), NaN for classification"),
    ("pixel_acc", "float", "pixel accuracy (%), NaN for classification"),
    ("n_eval", "int", "number of evaluation images"),
    ("object_recall", "float", "share of object cells among the processed cells, mean over test images with objects"),
    ("object_recall_chance", "float", "what a random choice of as many cells would get"),
    ("where_target_recall", "float", "LookWhere: object recall of the teacher's where-target's top-k cells"),
    ("where_target_chance", "float", "k / cells"),
    ("selection_warning", "str", "the distillation guard's warning, or empty"),
    ("gmacs", "float", "total GMACs per image (multiply-accumulates, 1 MAC = 2 FLOPs)"),
    ("gmacs_overhead", "float", "GMACs of selection (selector, scorer, matching), part of gmacs"),
    ("gmacs_backbone", "float", "GMACs of the (reduced) backbone, part of gmacs"),
    ("gmacs_head", "float", "GMACs of the task head, part of gmacs"),
    ("params_m", "float", "parameters in millions (all modules used at inference)"),
    ("tokens_mean", "float", "mean number of patch tokens actually processed (after selection/merging)"),
    ("flops_counter", "str", "counter of gmacs: 'fvcore' or 'torch' (fallback when tracing fails)"),
    ("flops_images", "int", "test images gmacs is averaged over (batch 1 each)"),
    ("flops_check_gmacs", "float", "torch.utils.flop_counter's count of the same forwards (NaN when not run)"),
    ("flops_unsupported_ops", "str", "ops that ran with no MAC formula (empty: none)"),
    ("flops_uncounted_ops", "str", "elementwise ops left uncounted by convention"),
    ("latency_ms", "float", "median latency at batch 1 (ms)"),
    ("latency_iqr_ms", "float", "interquartile range of that latency (ms)"),
    ("latency_runs", "int", "timed measurements behind latency_ms"),
    ("throughput", "float", "median throughput at throughput_batch (images/s)"),
    ("throughput_iqr", "float", "interquartile range of that throughput (images/s)"),
    ("throughput_batch", "int", "batch size actually used for throughput (after OOM decay)"),
    ("throughput_runs", "int", "timed measurements behind throughput"),
    ("timing_protocol", "str", "'paired' (interleaved with the reference in one process, lwbench/measure/paired.py) "
                               "or '' (older rows: one model per process, no speed-up)"),
    ("reference_run_id", "str", "run id of the `full` point this row's speed is relative to (same backbone, size, "
                                "teacher, regime, dtype, threads, device)"),
    ("reference_gmacs", "float", "GMACs per image of that reference"),
    ("gmac_ratio", "float", "reference_gmacs / gmacs: how many times fewer MACs than the reference"),
    ("speedup", "float", "batch-1 speed-up over the reference: its median latency / this one's, both timed in "
                         "randomised alternating blocks in one process on the same images"),
    ("speedup_ci_low", "float", "lower end of the 95% bootstrap interval of speedup (rounds of blocks resampled)"),
    ("speedup_ci_high", "float", "upper end of that interval"),
    ("speedup_reliable", "bool", "that interval is narrow enough to read (ci_high / ci_low <= 1.25) and it was timed "
                                 "on enough rounds free of other processes' load (not timing_contended)"),
    ("conversion", "float", "speedup / gmac_ratio: the share of the MAC saving that became batch-1 time"),
    ("reference_latency_ms", "float", "the reference's median batch-1 latency in the same pairing (ms)"),
    ("throughput_speedup", "float", "throughput / the reference's, at throughput_batch, timed the same way"),
    ("throughput_speedup_ci_low", "float", "lower end of the 95% interval of throughput_speedup"),
    ("throughput_speedup_ci_high", "float", "upper end of that interval"),
    ("throughput_speedup_reliable", "bool", "that interval is narrow enough to read (ci_high / ci_low <= 1.25)"),
    ("throughput_conversion", "float", "throughput_speedup / gmac_ratio"),
    ("reference_throughput", "float", "the reference's median throughput in the same pairing (images/s)"),
    ("timing_rounds", "int", "interleaved rounds (a block of each model, in random order) behind speedup"),
    ("timing_quiet_rounds", "int", "of those, rounds in which no other process took cores the timed threads needed"),
    ("timing_contended", "bool", "fewer than measure.min_runs quiet rounds: the speed-up comes from contended rounds "
                                 "and may not be the quiet machine's (speedup_reliable is then false)"),
    ("timing_batches", "str", "JSON, every batch size timed: {\"8\": {\"speedup\", \"ci_low\", \"ci_high\", \"ms\", "
                              "\"reference_ms\", \"rounds\"} or {\"error\": \"out of memory\"}}"),
    ("attention_kernel", "str", "attention kernel(s) that ran in one timed batch-1 call, from the profiler's op names: "
                                "'cpu_flash', 'flash', 'efficient', 'cudnn', 'math' (SDPA's unfused path), 'matmul' "
                                "(attention written as matmuls), '+'-joined when several, 'none' when no attention"),
    ("reference_attention_kernel", "str", "the same for the reference"),
    ("peak_mem_mb", "float", "peak memory of inference (MiB, weights included), see mem_kind"),
    ("mem_kind", "str", "'cuda_allocated_growth' ('cuda_max_allocated' in rows before 2026-12-06) or "
                                 "'cpu_peak_rss_delta'"),
    ("memory_exact", "bool", "the peak belongs to this forward alone (peak counters reset / fresh process)"),
    ("measure_isolated", "bool", "timed and measured in a fresh subprocess"),
    ("isolation_error", "str", "why the subprocess measurement fell back to this process (empty: it did not)"),
    ("measure_warmup", "int", "untimed warm-up calls before timing"),
    ("measure_min_run_time", "float", "seconds each timed measurement lasted at least"),
    ("measure_min_runs", "int", "minimum timed measurements asked for"),
    ("memory_batch", "int", "batch size of the peak-memory forward"),
    ("other_load", "float", "cores kept busy by other processes while this row was timed (psutil)"),
    ("machine_busy", "bool", "other_load competed with the timed threads: latency/throughput are suspect"),
    ("teacher_source", "str", "where the teacher came from: 'trained' (by lwbench on this machine), 'shipped' "
                              "(the copy lwbench ships for this teacher id) or 'none' (teacher.steps=0)"),
    ("teacher_train_time_s", "float", "training time of the task-trained backbone this run starts from (s)"),
    ("method_train_time_s", "float", "training time of this method's own stages (s)"),
    ("train_time_s", "float", "teacher_train_time_s + method_train_time_s"),
    ("eval_time_s", "float", "wall time of evaluation (s)"),
    ("wall_time_s", "float", "wall time of this invocation (s)"),
    ("device", "str", "'cpu' or 'cuda'"),
    ("device_name", "str", "CPU model or GPU name"),
    ("threads", "int", "torch intra-op threads"),
    ("omp_wait_policy", "str", "OMP_WAIT_POLICY of the timing process (default: OpenMP's own; lwbench/openmp.py)"),
    ("cpu_count", "int", "logical CPUs of the machine"),
    ("dtype", "str", "inference dtype of the timed model ('float32', 'bfloat16', ...)"),
    ("autocast", "str", "mixed precision of the run's training, evaluation and timing: 'none' or 'bfloat16'"),
    ("compile", "str", "torch.compile mode of the timed calls: 'none' (eager), 'default', 'reduce-overhead' or "
                       "'max-autotune'; accuracy and MACs are always eager"),
    ("compile_time_s", "float", "seconds torch.compile took before timing (NaN when eager)"),
    ("attention_backend", "str", "fused-attention kernel available (SDPA flash/mem-efficient/math)"),
    ("float32_matmul_precision", "str", "torch.get_float32_matmul_precision(): 'highest' (PyTorch's default, no TF32), "
                                        "'high' or 'medium'; lwbench leaves it as the user set it"),
    ("allow_tf32", "bool", "torch.backends.cuda.matmul.allow_tf32: float32 CUDA matmuls may use TF32"),
    ("cudnn_benchmark", "bool", "torch.backends.cudnn.benchmark: cuDNN autotunes convolution algorithms"),
    ("torch_version", "str", "torch.__version__"),
    ("timm_version", "str", "timm.__version__"),
    ("cuda_version", "str", "torch.version.cuda on CUDA, else null"),
    ("python_version", "str", "platform.python_version()"),
    ("lwbench_version", "str", "lwbench.__version__"),
    ("platform", "str", "platform.platform()"),
    ("git_sha", "str", "commit of the lwbench checkout (None if not a git checkout)"),
    ("git_dirty", "bool", "uncommitted changes in that checkout"),
    ("machine_id", "str", "stable id of the host"),
    ("created_at", "str", "ISO 8601 UTC time the row was written"),
    ("config", "dict", "the whole resolved config (the only nested field)"),
    ("status", "str", "'ok'"),
)
FIELD_NAMES: tuple[str, ...] = tuple(name for name, _, _ in FIELDS)
FLOAT_FIELDS = frozenset(name for name, kind, _ in FIELDS if kind == "float")
INT_FIELDS = frozenset(name for name, kind, _ in FIELDS if kind == "int")

# A row without these cannot be placed, identified or plotted.
REQUIRED: tuple[str, ...] = ("run_id", "config_hash", "method", "budget", "task", "source", "backbone", "img_size",
                             "profile", "seed", "metric", "metric_value", "config", "status")
SOURCES = ("real", "synthetic")
# Text columns a row is grouped, sorted and labelled by: a stored row must have them as strings.
_IDENTITY = frozenset({"run_id", "config_hash", "method", "budget", "task", "source", "metric"})

# Top-level config keys that steer a run but cannot change its result; they stay out of the hash. Everything
# else is in it by default. ``weights`` is the weights *path*: its content enters as ``weights_sha256``.
HASH_EXCLUDE = frozenset({"results", "force", "quiet", "retrain_teacher", "weights", "debug", "verbose", "dry_run",
                          "results_dir", "progress"})
HASH_LEN = 12


class ResultError(LwbenchError, ValueError):
    """A row that must not be stored (missing fields, NaN metric, inconsistent ids); nothing is written."""


# -- hashing ----------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: tuples -> lists, numpy/torch scalars -> Python, Path -> str, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        try:
            return jsonable(obj.item())
        except (ValueError, TypeError):
            pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable id of a resolved config: sha1 of its sorted-key JSON, first 12 hex digits.

    Only the config goes in, never measured values, so the same config run twice (on any machine)
    maps to the same file and is skipped. Keys in :data:`HASH_EXCLUDE` (``force``, ``quiet``, ...)
    are left out at the top level. Tuples and lists hash alike, and so do NaN and None, so a config
    hashes the same before and after a JSON round trip.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config_hash needs a mapping, got {type(config).__name__}")
    clean = jsonable({k: v for k, v in config.items() if k not in HASH_EXCLUDE})
    text = json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha1(text.encode()).hexdigest()[:HASH_LEN]


# -- validation -------------------------------------------------------------------------------------


def validate_row(row: Mapping[str, Any]) -> None:
    """Raise :class:`ResultError` unless ``row`` is storable (see ``results/README.md``)."""
    missing = [k for k in REQUIRED if k not in row]
    ident = f"{row.get('method', '?')} {row.get('budget', '?')} on {row.get('task', '?')}"
    if missing:
        raise ResultError(f"result row for {ident} lacks required field(s) {', '.join(missing)}")
    if not isinstance(row["config"], Mapping):
        raise ResultError(f"result row for {ident}: 'config' must be a dict, got {type(row['config']).__name__}")
    for key, value in row.items():
        if key != "config" and not (value is None or isinstance(value, (str, bool, int, float))
                                    or (hasattr(value, "item") and getattr(value, "ndim", 0) == 0)):
            raise ResultError(f"result row for {ident}: field {key!r} must be a scalar (rows are flat), "
                              f"got {type(value).__name__}")
    if row["source"] not in SOURCES:
        raise ResultError(f"result row for {ident}: source must be one of {', '.join(SOURCES)}, "
                          f"got {row['source']!r}")
    value = _as_float(row["metric_value"])
    if value is None or not math.isfinite(value):
        raise ResultError(f"refusing to store {ident}: {row['metric']} = {row['metric_value']!r} is not a finite "
                          f"number (diverged training or a bug in evaluation); nothing was written")
    named = _as_float(row.get(row["metric"])) if isinstance(row["metric"], str) else None
    if named is not None and math.isfinite(named) and not math.isclose(named, value, rel_tol=1e-9, abs_tol=1e-12):
        raise ResultError(f"result row for {ident}: metric_value {value} differs from {row['metric']} {named}")
    if row["run_id"] != row["config_hash"]:
        raise ResultError(f"result row for {ident}: run_id {row['run_id']!r} must equal config_hash "
                          f"{row['config_hash']!r}")
    expected = config_hash(row["config"])
    if row["config_hash"] != expected:
        raise ResultError(f"result row for {ident}: config_hash {row['config_hash']!r} does not match its config "
                          f"(expected {expected!r}); compute it with lwbench.schema.config_hash(config)")


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def type_problem(row: Mapping[str, Any]) -> str:
    """What is wrong with the types of a stored row's fields (``"seed is 'x', not a whole number"``), or ``""``.

    Only the fields present are checked, against the schema's kind (:data:`FIELDS`), so older rows that lack
    later columns still load; ``None`` is a field not measured. These are the types :meth:`ResultStore.write`
    produces and the frame, table, report and plot code computes with: a hand-edited or foreign file that
    breaks them is skipped by the reader rather than crashing it.
    """
    for name, kind, _ in FIELDS:
        if name not in row:
            continue
        v = row[name]
        if name == "metric_value":  # never NaN (validate_row), and what every table and plot is about
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            what = "a number"
        elif kind == "dict":
            ok, what = isinstance(v, dict), "a JSON object"
        elif name in _IDENTITY:  # grouped, sorted and compared as text by every table and plot
            ok, what = isinstance(v, str), "a string"
        elif v is None:
            continue
        elif kind == "float":
            ok, what = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        elif kind == "int":
            ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
            what = "a whole number"
        elif kind == "bool":
            ok, what = isinstance(v, bool) or (type(v) is int and v in (0, 1)), "true or false"
        else:  # other text columns: any scalar a table can show, never a list or an object
            ok, what = not isinstance(v, (list, dict)), "a string"
        if not ok:
            return f"{name} is {_short(v)}, not {what}"
    return ""


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A row's nested config (a dict or its JSON text) as ``{"train.steps": 100, "eval.limit": None, ...}``: the keys
    ``--where`` selects on, and the settings tables and the mixing checks compare."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return {}
    if not isinstance(config, Mapping):
        return {prefix.rstrip("."): config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, inf, text, a bool): how tables, exports and the
    mixing checks read a row's optional numbers."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
