"""The results store: one JSON file per run, read back as a pandas frame, printed as tables.

A run is identified by the hash of its resolved config, so re-running the same config finds its
row and is skipped (unless ``--force``), and any number of processes can write side by side
without a shared index file to corrupt. Each file is written to a temp file in the same folder,
fsync'ed and ``os.replace``'d into place: a reader sees either no row or a whole row, and a
killed writer leaves only a dot-temp file that reading ignores. The schema is documented in
``results/README.md``; :data:`FIELDS` is its machine-readable twin.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lwbench.errors import LwbenchError
from lwbench.logs import log
from lwbench.paths import temp_beside

if TYPE_CHECKING:
    import pandas as pd

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

# Metrics stored in percent, and how table headers and plot axes name them.
METRIC_LABELS = {"top1": "top1 (%)", "top5": "top5 (%)", "miou": "mIoU (%)", "pixel_acc": "pixel acc (%)"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ResultError(LwbenchError, ValueError):
    """A row that must not be stored (missing fields, NaN metric, inconsistent ids); nothing is written."""


# -- hashing ----------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: tuples -> lists, numpy/torch scalars -> Python, Path -> str, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalar
        try:
            return _jsonable(obj.item())
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
    clean = _jsonable({k: v for k, v in config.items() if k not in HASH_EXCLUDE})
    text = json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha1(text.encode()).hexdigest()[:HASH_LEN]


def metric_label(metric: str) -> str:
    """Header/axis label of a metric, with its unit: ``top1`` -> ``top1 (%)``."""
    return METRIC_LABELS.get(metric, metric)


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
        text = json.dumps(_jsonable(row), indent=1, sort_keys=False, allow_nan=False, ensure_ascii=False) + "\n"
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
                          f"(expected {expected!r}); compute it with lwbench.results.config_hash(config)")


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


# -- frames and formatting ------------------------------------------------------------------------------------


def rows_to_frame(rows: Iterable[Mapping[str, Any]], keep_config: bool = False) -> pd.DataFrame:
    import pandas as pd

    records = []
    for row in rows:
        rec = dict(row)
        if "config" in rec:
            if keep_config:
                rec["config"] = json.dumps(_jsonable(rec["config"]), sort_keys=True)
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


# Compact columns of table/md output: (column, header, decimals), in this order. The metric column's header is per
# group; ``{tb}`` is the block's throughput batch. The speed-up columns lead the timing (a ratio to `full` timed paired
# in one process reproduces on a shared machine, an absolute time does not) and appear only in blocks that have them;
# the absolute medians follow. The task is the block's heading, not a column.
_COMPACT: tuple[tuple[str, str, int], ...] = (
    ("method", "method", -1),
    ("budget", "budget", -1),
    ("regime", "regime", -1),
    ("source", "source", -1),
    ("metric_value", "", 2),
    ("hard_value", "hard subset [95% CI]", 1),
    ("finetune_steps", "ft steps", 0),
    ("object_recall", "object recall", 2),
    ("gmacs", "GMACs (MACs)", 3),
    ("speedup", "speed-up bs1 [95% CI]", 2),
    ("conversion", "conv bs1", 2),
    ("throughput_speedup", "speed-up {tb} [95% CI]", 2),
    ("throughput_conversion", "conv {tb}", 2),
    ("attention_kernel", "attn", -1),
    ("latency_ms", "ms bs1 [IQR]", 2),
    ("throughput", "img/s{tb}", 1),
    ("peak_mem_mb", "peak mem (MB)", 1),
    ("tokens_mean", "tokens", 1),
    ("method_train_time_s", "method train (s)", 1),
)
# The metric on the hard subset (the test images lowres at its default size gets wrong), added to a frame by
# lwbench.report.with_hard_subset; averaged over seeds like the metric.
HARD_SUBSET_FIELDS = ("hard_value", "hard_ci_low", "hard_ci_high")
# Columns shown only in a block where some row has a value: (column, the column that decides).
_ONLY_IF_ANY = {"hard_value": "hard_value", "speedup": "speedup", "conversion": "speedup",
                "throughput_speedup": "throughput_speedup",
                "throughput_conversion": "throughput_speedup", "attention_kernel": "attention_kernel"}
# A speed-up interval whose high end is more than this many times its low end is too wide to read. The row's
# ``speedup_reliable`` says so; this is the same rule (lwbench.measure.paired.RELIABLE_RATIO, kept equal by a test)
# for rows or frames that lack that field.
WIDE_RATIO = 1.25
# The method every speed-up is relative to.
REFERENCE_METHOD = "full"
# ``mem_kind`` values whose peak is approximate: CPU peak RSS moves with the allocator's state.
APPROXIMATE_MEM_KINDS = frozenset({"cpu_peak_rss_delta"})
# Settings that say nothing about how a row was obtained: left out of the "differs" column.
_NOT_SETTINGS = ("results", "force", "quiet", "teacher_id")
FORMATS = ("table", "csv", "md", "json")


def source_label(source: Any) -> str:
    """How a source is shown to people: synthetic rows are SYNTHETIC, loudly."""
    return "SYNTHETIC" if source == "synthetic" else str(source)


def _cell(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals < 0:
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if decimals == 3:  # GMACs span 1e-3 (test models) to 1e2 (ViT-L at 518 px): 3 significant digits
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:#.3g}"
    return f"{x:.{decimals}f}"


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per replicate group (``replicate_id``: rows that differ only in their seed), numeric columns
    averaged, with ``metric_std`` (sample std over seeds, NaN for one), ``n_seeds`` and ``seeds``; the metric's
    interval columns become the mean of the seeds' intervals. Rows without a replicate id stay as they are."""
    import pandas as pd

    if df.empty or "replicate_id" not in df.columns:
        return df.assign(metric_std=math.nan, n_seeds=1)
    df = df.copy()
    own = [f"\0row{i}" for i in range(len(df))]
    key = df["replicate_id"].where(df["replicate_id"].map(lambda v: isinstance(v, str) and bool(v)), own)
    out = []
    for _, g in df.groupby(key, sort=False):
        first = g.iloc[0].copy()
        for col in g.columns:
            if col in FLOAT_FIELDS or col in HARD_SUBSET_FIELDS:
                first[col] = pd.to_numeric(g[col], errors="coerce").mean()
            elif col.endswith("speedup_reliable"):  # the mean of the seeds' speed-ups is readable if each one was
                known = [_flag(v) for v in g[col] if _flag(v) is not None]
                first[col] = all(known) if known else None
        first["metric_std"] = float(g["metric_value"].std(ddof=1)) if len(g) > 1 else math.nan
        first["n_seeds"] = int(g["seed"].nunique()) if "seed" in g.columns else len(g)
        first["seeds"] = ",".join(str(int(v)) for v in sorted(g["seed"].dropna().unique())) if "seed" in g else ""
        out.append(first)
    return sort_frame(pd.DataFrame(out).reset_index(drop=True))


def metric_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """``94.1 [93.2, 95.0]`` (the 95% interval over test images), or ``94.1 ± 0.4 (3 seeds)`` for a mean over
    seeds, or the bare value when neither is known."""
    v = r.get("metric_value", math.nan)
    if v is None or v != v:
        return "-"
    n = r.get("n_seeds", 1)
    n = 1 if n is None or n != n else int(n)
    if n > 1:
        return f"{v:.{decimals}f} ± {r.get('metric_std', math.nan):.{decimals}f} ({n} seeds)"
    lo, hi = r.get("metric_ci_low", math.nan), r.get("metric_ci_high", math.nan)
    if lo is None or hi is None or lo != lo or hi != hi:
        return f"{v:.{decimals}f}"
    return f"{v:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


def hard_subset_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """The metric on the hard subset (``lwbench.report.with_hard_subset``) with its 95% interval, the mean over
    seeds when several were aggregated, ``-`` when the row has none."""
    v = _finite(r.get("hard_value"))
    if v is None:
        return "-"
    n = r.get("n_seeds", 1)
    if n is not None and n == n and int(n) > 1:
        return f"{v:.{decimals}f} ({int(n)} seeds)"
    lo, hi = _finite(r.get("hard_ci_low")), _finite(r.get("hard_ci_high"))
    if lo is None or hi is None:
        return f"{v:.{decimals}f}"
    return f"{v:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, text, a bool)."""
    x = _as_float(value)
    return x if x is not None and math.isfinite(x) else None


def _flag(value: Any) -> bool | None:
    """A stored bool read back from JSON, a frame or a CSV (``True``, ``np.True_``, ``"false"``); None if unknown."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return bool(value)
    except (TypeError, ValueError):
        return None


def speedup_is_wide(r: Mapping[str, Any], prefix: str = "") -> bool | None:
    """Whether the row's speed-up interval is too wide to read (the machine was too busy to time the row): its
    ``{prefix}speedup_reliable`` field when set, else the interval's ends (high / low > :data:`WIDE_RATIO`). None
    when the row has no speed-up; ``prefix`` is ``""`` for batch 1 and ``"throughput_"`` for the throughput batch."""
    if _finite(r.get(f"{prefix}speedup")) is None:
        return None
    reliable = _flag(r.get(f"{prefix}speedup_reliable"))
    if reliable is not None:
        return not reliable
    lo, hi = _finite(r.get(f"{prefix}speedup_ci_low")), _finite(r.get(f"{prefix}speedup_ci_high"))
    if lo is None or hi is None:
        return None  # no interval: nothing says it is wide
    return not (lo > 0 and hi / lo <= WIDE_RATIO)


def speedup_cell(r: Mapping[str, Any], prefix: str = "") -> str:
    """``2.31x [2.20, 2.43]`` (the speed-up over the reference with its 95% interval), ``2.3x [0.9, 5.1] (wide)``
    (one decimal fewer: the interval is too wide to read), ``2.31x`` without an interval, ``-`` without a
    speed-up (rows timed before paired timing)."""
    v = _finite(r.get(f"{prefix}speedup"))
    if v is None:
        return "-"
    wide = bool(speedup_is_wide(r, prefix))
    d = 1 if wide else 2
    lo, hi = _finite(r.get(f"{prefix}speedup_ci_low")), _finite(r.get(f"{prefix}speedup_ci_high"))
    text = f"{v:.{d}f}x" + (f" [{lo:.{d}f}, {hi:.{d}f}]" if lo is not None and hi is not None else "")
    return text + (" (wide)" if wide else "")


def conversion_of(r: Mapping[str, Any], prefix: str = "") -> float | None:
    """``{prefix}conversion`` (speed-up / GMAC ratio: the share of the MAC saving that became time), computed from
    the speed-up and ``gmac_ratio`` when the field is missing; None without a speed-up."""
    c = _finite(r.get(f"{prefix}conversion"))
    if c is not None:
        return c
    v, g = _finite(r.get(f"{prefix}speedup")), _finite(r.get("gmac_ratio"))
    return v / g if v is not None and g is not None and g > 0 else None


def attention_cell(r: Mapping[str, Any]) -> str:
    """The attention kernel that ran (``cpu_flash``), with the reference's when it ran another (``math (ref
    flash)``: part of that speed-up is the kernel's); ``-`` when not recorded."""
    k, ref = r.get("attention_kernel"), r.get("reference_attention_kernel")
    if not isinstance(k, str) or not k:
        return "-"
    return f"{k} (ref {ref})" if isinstance(ref, str) and ref and ref != k else k


def mem_cell(r: Mapping[str, Any], decimals: int = 1) -> str:
    """Peak memory, ``~``-prefixed when it is approximate (CPU peak RSS, which moves with the allocator's state)."""
    v = _finite(r.get("peak_mem_mb"))
    if v is None:
        return "-"
    return ("~" if r.get("mem_kind") in APPROXIMATE_MEM_KINDS else "") + f"{v:.{decimals}f}"


def _batches(group: pd.DataFrame) -> list[int]:
    """The throughput batch sizes of a block's rows that have a throughput figure."""
    if "throughput_batch" not in group.columns:
        return []
    timed = [c for c in ("throughput", "throughput_speedup") if c in group.columns]
    has = group[timed].apply(pd_numeric).notna().any(axis=1) if timed else group["throughput_batch"].notna()
    return sorted({int(b) for b in pd_numeric(group.loc[has, "throughput_batch"]).dropna()})


def _references(group: pd.DataFrame) -> set[int]:
    """Positions of the block's reference rows: a row another row's speed-up is relative to (its run id is their
    ``reference_run_id``), or a paired-timed `full` row without a speed-up of its own."""
    refs = {v for v in group.get("reference_run_id", []) if isinstance(v, str) and v}
    out = set()
    for i, (_, r) in enumerate(group.iterrows()):
        if _finite(r.get("speedup")) is not None:
            continue
        if r.get("run_id") in refs or (r.get("method") == REFERENCE_METHOD and r.get("timing_protocol") == "paired"):
            out.add(i)
    return out


def speed_notes(group: pd.DataFrame, shown: set[str]) -> list[str]:
    """The footnotes of a block's speed-up, attention and memory columns (``shown``: the columns in its table)."""
    notes = []
    rows = [r for _, r in group.iterrows()]
    if "speedup" in shown or "throughput_speedup" in shown:
        notes.append(f"speed-up: `{REFERENCE_METHOD}`'s median time / the row's, both timed paired in one process "
                     f"(alternating blocks, same images), with a 95% bootstrap interval over the rounds; conv = "
                     f"speed-up / GMAC ratio, the share of the MAC saving that became time (1: all of it); ms, "
                     f"img/s: the absolute medians, which move with the machine's load")
        wide = [r for r in rows if speedup_is_wide(r) or speedup_is_wide(r, "throughput_")]
        if wide:
            notes.append(f"(wide): the interval's ends are more than {WIDE_RATIO:g}x apart: the machine was too "
                         f"busy to time this row ({len(wide)} row(s); their conv is ~, one decimal); read the "
                         f"interval, not the ratio, or rerun it on a quiet machine")
        refs = _references(group)
        old = [r for i, r in enumerate(rows) if i not in refs and _finite(r.get("speedup")) is None
               and _finite(r.get("throughput_speedup")) is None]
        if old:
            notes.append(f"speed-up '-': {len(old)} row(s) timed one model per process (before paired timing, "
                         f"or not timed): no ratio to `{REFERENCE_METHOD}`, and their absolute times do not "
                         f"reproduce on a shared machine; rerun them with --force for a speed-up")
    if "attention_kernel" in shown and any("(ref " in attention_cell(r) for r in rows):
        notes.append("attn (ref X): the reference ran another attention kernel, so part of that speed-up is the "
                     "kernel's, not the method's")
    if "peak_mem_mb" in shown and any(r.get("mem_kind") in APPROXIMATE_MEM_KINDS and _finite(r.get("peak_mem_mb"))
                                      is not None for r in rows):
        notes.append("peak mem ~: CPU, approximate, allocator-dependent (weights + the growth of peak RSS during "
                     "one forward; it moves with the allocator's state)")
    return notes


def format_results(df: pd.DataFrame, fmt: str = "table") -> str:
    """Render a results frame as ``table`` (terminal), ``md``, ``csv`` (all columns) or ``json`` (records).

    Tables have one block per (task, source) with a heading, so synthetic and real numbers are never
    mixed in one block, the source column is always shown, and synthetic rows say SYNTHETIC. The metric
    carries its 95% interval over test images; rows that differ only in their seed are aggregated into
    mean ± std over the seeds (:func:`aggregate_seeds`). The regime and the fine-tuning steps are columns,
    and a block whose fine-tuned rows used different recipes says so under the table. In a block with paired
    timings the speed-up over `full` with its 95% interval (:func:`speedup_cell`, ``(wide)`` when the interval is
    too wide to read) and the conversion (speed-up / GMAC ratio) lead the timing, at batch 1 and at the throughput
    batch, with the attention kernel that ran; the absolute medians follow, and footnotes say what ``(wide)``,
    ``-`` and ``~`` (approximate CPU memory) mean.
    """
    if fmt not in FORMATS:
        raise ResultError(f"unknown results format '{fmt}'; use one of {', '.join(FORMATS)}")
    df = df.copy()
    if "config" in df.columns:
        df["config"] = [c if isinstance(c, str) or c is None else json.dumps(_jsonable(c), sort_keys=True)
                        for c in df["config"]]
    df = sort_frame(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [_jsonable(r) for r in df.to_dict(orient="records")]
        return json.dumps(records, indent=1, allow_nan=False) + "\n"
    need = [c for c in ("method", "task", "source", "metric", "metric_value") if c not in df.columns]
    if need:
        raise ResultError(f"results frame lacks column(s) {', '.join(need)}")
    if df.empty:
        return "(no results)\n"
    df = aggregate_seeds(df)

    from tabulate import tabulate

    tablefmt = "github" if fmt == "md" else "simple"
    blocks = []
    for (task, source), group in df.groupby(["task", "source"], sort=False):
        metrics = list(dict.fromkeys(group["metric"]))
        cols = [(c, h, d) for c, h, d in _COMPACT if c in group.columns
                and (c not in _ONLY_IF_ANY or _any_value(group[_ONLY_IF_ANY[c]]))]
        # Identity columns left out of the compact set come back when they vary inside a block.
        for extra in ("backbone", "img_size", "profile", "seed", "metric"):
            if extra in group.columns and group[extra].nunique(dropna=False) > 1:
                cols.insert(2, (extra, extra, -1))
        batches = _batches(group)
        tb = f"bs{batches[0]}" if len(batches) == 1 else "thr."  # several: each cell names its batch
        headers, body = [], []
        for col, head, _ in cols:
            if col == "metric_value":
                head = (metric_label(metrics[0]) if len(metrics) == 1 else "metric value") + " [95% CI]"
            elif col == "throughput":
                head = head.format(tb=f" {tb}" if len(batches) == 1 else "")
            headers.append(head.format(tb=tb))
        group = _by_cost(group)
        differs = differing_settings(group)
        if differs:  # rows that would look identical: say what tells them apart
            cols = [*cols, ("run_id", "run id", -1), ("\0differs", "differs", -1)]
            headers += ["run id", "differs"]
        refs = _references(group)
        for i, (_, r) in enumerate(group.iterrows()):
            body.append([differs.get(i, "") if c == "\0differs" else _compact_cell(r, c, d, i in refs, len(batches) > 1)
                         for c, _, d in cols])
        align = ["right" if d >= 0 else "left" for _, _, d in cols]
        table = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True, colalign=align)
        notes = []
        if "selection_warning" in group.columns:  # the distillation guard fired for these rows: say so under them
            fired = group["selection_warning"].map(lambda v: isinstance(v, str) and v != "")
            for _, r in group[fired].iterrows():
                notes.append(f"warning: {r['method']} {r['budget']} seed {r.get('seed', '?')}: "
                             f"{r['selection_warning']}")
        notes += [f"note: {n}" for n in speed_notes(group, {c for c, _, _ in cols})]
        note = recipe_note(group)
        if note:
            notes.append(f"note: {note}")
        teachers = teacher_note(group)
        if teachers:
            notes.append(teachers)
        if notes:  # in markdown a blank line ends the table (the notes would be table rows) and "  " a line
            table += "\n\n" + "  \n".join(notes) if fmt == "md" else "\n" + "\n".join(notes)
        blocks.append(_heading(task, source, group, fmt) + table)
    return "\n\n".join(blocks) + "\n"


def _any_value(col: pd.Series) -> bool:
    """Whether a column has a value in some row (a finite number, a non-empty text)."""
    return any(_finite(v) is not None or (isinstance(v, str) and v != "") for v in col)


def _compact_cell(r: Mapping[str, Any], col: str, decimals: int, reference: bool, several_batches: bool) -> str:
    """One cell of a compact table."""
    if col == "source":
        return source_label(r[col])
    if col == "metric_value":
        return metric_cell(r, decimals)
    if col == "hard_value":
        return hard_subset_cell(r, decimals)
    if col == "latency_ms":
        return _latency_cell(r)
    if col == "peak_mem_mb":
        return mem_cell(r, decimals)
    if col == "attention_kernel":
        return attention_cell(r)
    if col in ("speedup", "throughput_speedup"):
        prefix = col.removesuffix("speedup")
        if reference and _finite(r.get(col)) is None:
            return "1x (reference)"
        text = speedup_cell(r, prefix)
        b = _finite(r.get("throughput_batch"))
        if prefix and several_batches and text != "-" and b is not None:
            text += f" @bs{int(b)}"
        return text
    if col in ("conversion", "throughput_conversion"):
        prefix = col.removesuffix("conversion")
        c = conversion_of(r, prefix)
        if c is None:
            return "-"
        return f"~{c:.1f}" if speedup_is_wide(r, prefix) else f"{c:.{decimals}f}"  # of a speed-up too wide to read
    return _cell(r[col], decimals)


def _by_cost(group: pd.DataFrame) -> pd.DataFrame:
    """A block's rows cheapest first (GMACs, then the metric, best first), the way a Pareto plot reads."""
    keys = [c for c in ("gmacs", "metric_value", "method", "budget_value") if c in group.columns]
    asc = [k != "metric_value" for k in keys]
    return group.sort_values(keys, ascending=asc, kind="stable", na_position="last").reset_index(drop=True)


def _latency_cell(r: Mapping[str, Any]) -> str:
    """``9.28 [0.41]``: the median and its interquartile range, so a reader sees the spread of the timing."""
    v, iqr = r.get("latency_ms", math.nan), r.get("latency_iqr_ms", math.nan)
    if v is None or v != v:
        return "-"
    try:
        iqr = float(iqr)
    except (TypeError, ValueError):
        iqr = math.nan
    return f"{v:.2f}" if iqr != iqr else f"{v:.2f} [{iqr:.2f}]"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            return {}
    if not isinstance(d, Mapping):
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def differing_settings(group: pd.DataFrame) -> dict[int, str]:
    """For rows (positions in ``group``) that share method, budget, regime and seeds and so would look the same
    in a table, the settings in which each differs from the others of its kind, e.g. ``train.lr=0.0005``; the
    whole config is compared when the frame holds it, else the row's recipe and teacher columns."""
    ident = [c for c in ("method", "budget", "regime", "seeds", "seed") if c in group.columns]
    if not ident or len(group) < 2:
        return {}
    keys = ["|".join(str(v) for v in row) for row in group[ident].itertuples(index=False)]
    out: dict[int, str] = {}
    for _, idx in group.groupby(keys, sort=False).indices.items():
        if len(idx) < 2:
            continue
        if "config" in group.columns:
            flats = [_flat(group["config"].iloc[i]) for i in idx]
        else:
            cols = [c for c in ("finetune_recipe", "teacher_id", "teacher_steps", "pretrain_steps", "autocast",
                                "init", "backbone", "img_size") if c in group.columns]
            flats = [{c: group[c].iloc[i] for c in cols} for i in idx]
        names = sorted({k for f in flats for k in f if not k.startswith(_NOT_SETTINGS)})
        varying = [k for k in names if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
        for i, f in zip(idx, flats, strict=True):
            shown = ", ".join(f"{k}={f.get(k)}" for k in varying[:4]) + (" ..." if len(varying) > 4 else "")
            out[int(i)] = shown or "(same settings: a rerun)"
    return out


def teacher_note(d: pd.DataFrame) -> str:
    """The teacher's training time, said once under the table instead of added to every row's train time."""
    if "teacher_id" not in d.columns or "teacher_train_time_s" not in d.columns:
        return ""
    bits = []
    for tid, g in d.groupby("teacher_id", sort=False):
        secs = pd_numeric(g["teacher_train_time_s"]).max()
        src = ", ".join(sorted({str(v) for v in g.get("teacher_source", []) if isinstance(v, str) and v}))
        if isinstance(tid, str) and tid and secs == secs:
            bits.append(f"{tid} ({secs:.0f} s of training{', ' + src if src else ''})")
    return ("teacher (shared by these rows, not in 'method train'): " + "; ".join(bits)) if bits else ""


def pd_numeric(s):
    import pandas as pd

    return pd.to_numeric(s, errors="coerce")


def recipe_note(d: pd.DataFrame) -> str:
    """Says when the fine-tuned rows of a comparison were not fine-tuned alike (``finetune_recipe``) or
    start from different teachers; ``""`` when they are equal-effort."""
    bits = []
    if "finetune_recipe" in d.columns and "regime" in d.columns:
        ft = d[d["regime"] == "finetuned"]
        recipes = ft.groupby("finetune_recipe")["method"].apply(lambda m: sorted(set(m)))
        if len(recipes) > 1:
            bits.append("fine-tuned with different recipes: " + "; ".join(
                f"{', '.join(ms)}: {rec}" for rec, ms in recipes.items()))
    if "teacher_id" in d.columns and d["teacher_id"].nunique() > 1:
        bits.append(f"{d['teacher_id'].nunique()} different teachers")
    return "not equal-effort: " + " | ".join(bits) if bits else ""


def _heading(task: str, source: str, group: pd.DataFrame, fmt: str) -> str:
    bits = [f"task {task}"]
    bits.append("SYNTHETIC data (generated in-tree, not the real dataset)" if source == "synthetic"
                else f"{source} data")
    for col, name in (("backbone", ""), ("img_size", ""), ("profile", "profile "), ("device_name", "")):
        if col in group.columns:
            vals = [v for v in dict.fromkeys(group[col]) if isinstance(v, str) and v]
            if len(vals) == 1:
                bits.append(f"{name}{vals[0]}")
    bits.append("GMACs = 1e9 multiply-accumulates")
    text = " | ".join(bits)
    return f"### {text}\n\n" if fmt == "md" else f"{text}\n"
