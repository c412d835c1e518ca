"""One benchmark point: resolved :class:`~lwbench.config.RunConfig` -> validated :class:`Plan` -> task-trained
teacher -> method fit -> evaluate -> measure -> one result row.

Validation (names, budget, image size, data layout, writable output folders) happens before any
training, so a bad command fails in a second. Every expensive stage is cached and resumable: the
teacher per teacher id, the method's training per run id, and the row itself is written atomically
only when everything succeeded. The run id is the hash of :meth:`Plan.identity`: the whole resolved
config, the weights and the data by content, minus :data:`lwbench.schema.HASH_EXCLUDE`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lwbench.config import RunConfig
from lwbench.errors import ConfigError
from lwbench.logs import log
from lwbench.method import resolve_budget
from lwbench.options import to_dict
from lwbench.paths import cache_dir, free_bytes, results_dir, write_text_atomic
from lwbench.registry import get_method, get_task
from lwbench.schema import config_hash, jsonable
from lwbench.seeding import seed_everything


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, not '{name}'")
    return name


def resolve_regime(method_cls, regime: str) -> str:
    """``auto`` -> ``off_the_shelf`` for training-free methods, ``finetuned`` for the others; a trainable method
    asked for ``off_the_shelf`` fails in one line (it has nothing to apply without training)."""
    free = method_cls.training_free
    if regime in (None, "auto"):
        return "off_the_shelf" if free else "finetuned"
    if regime == "off_the_shelf" and not free:
        from lwbench.registry import training_free_methods

        free_names = ", ".join(training_free_methods())
        raise ConfigError(f"method '{method_cls.name}' needs training ({method_cls.training}); regime off_the_shelf is "
                          f"for training-free methods ({free_names}): use --regime finetuned")
    return regime


def check_writable(folder: Path, what: str, need_bytes: int = 0) -> Path:
    """``folder`` exists (created) and a file can be written in it, or one line saying which and why, before
    any work: a results folder found unwritable after an hour of training loses the hour."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file, not a folder; pick another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lwbench-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {folder} is not writable ({exc.strerror or exc}); pick another folder") from None
    free = free_bytes(folder)
    if need_bytes and free is not None and free < need_bytes:  # creating an empty file above needs no space
        from lwbench.errors import DiskFullError

        raise DiskFullError(f"{what} {folder} is on a full disk ({free} bytes free): free some space or pick a "
                            "folder on another disk")
    return folder


# Settings added after rows and teachers existed, with the value that reproduces those: left out of the ids while
# they hold it, so every earlier run id and teacher id (and the teachers lwbench ships) stay valid.
_NEUTRAL = {"autocast": "none", "compile": "none", "probe_steps": 0, "probe_lr": 1e-3, "decoder": "linear",
            # paired timing (2026-12-06): the training caches of earlier runs stay theirs; their rows, timed one
            # model per process, carry no speed-up (timing_protocol ''), and `--force` re-times them from the cache
            "paired": True, "batches": [], "max_run_time": 20.0}


def _neutral(d: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in _NEUTRAL and v == _NEUTRAL[k])}


class Plan:
    """A validated run: the task, the method and the backbone's shape resolved, nothing built or trained."""

    def __init__(self, cfg: RunConfig):
        from lwbench.backbones import check_img_size, file_sha256, patch_size_of, spec_of
        from lwbench.heads import check_decoder

        self.cfg = cfg
        self.method_cls = get_method(cfg.method)
        self.task_cls = get_task(cfg.task)
        self.device = resolve_device(cfg.device)
        self.threads = int(cfg.threads or os.cpu_count() or 1)
        self.task = self.task_cls(source=cfg.source, data_root=cfg.data_root, img_size=cfg.img_size, seed=cfg.seed,
                                  **cfg.task_opts)
        check_decoder(self.task.kind, cfg.head.decoder, self.task.name)
        self.backbone_name = cfg.backbone
        check_img_size(self.task.img_size, patch_size_of(self.backbone_name))
        self.spec = spec_of(self.backbone_name, self.task.img_size)
        if self.task.kind == "classification" and cfg.head.pool in ("token", "token+max") and \
                str(getattr(self.spec, "family", "vit")).endswith("noclass"):
            from lwbench.errors import ConfigError

            raise ConfigError(f"backbone {self.backbone_name} has no class token, so head.pool={cfg.head.pool} has "
                              "nothing to read; use --set head.pool=avg (or max)")
        opts = cfg.method_opts if cfg.method_opts is not None else self.method_cls.resolve_options({}, cfg.train)
        self.method = self.method_cls(self.spec, resolve_budget(self.method_cls, cfg.budget), opts=opts)
        self.method.check_task(self.task)
        self.regime = resolve_regime(self.method_cls, cfg.regime)
        self.weights = cfg.weights
        self.weights_sha256 = file_sha256(cfg.weights) if cfg.weights else None
        self.pretrained = cfg.pretrained
        self.profile_name = cfg.profile
        self.teacher_config = self.teacher_identity()
        self.teacher_id = config_hash(self.teacher_config)
        self.config = self.identity()
        self.run_id = config_hash(self.config)
        # The teacher id is derived from fields the config holds itself, seed included: drop both.
        self.replicate_id = config_hash({k: v for k, v in self.config.items() if k not in ("seed", "teacher_id")})

    # -- identity ------------------------------------------------------------------------------------------
    def teacher_identity(self) -> dict[str, Any]:
        """What the task-trained backbone depends on (a subset of :meth:`identity`; no method field)."""
        cfg, task = self.cfg, self.task
        return {
            "backbone": self.backbone_name, "weights_sha256": self.weights_sha256, "pretrained": self.pretrained,
            "task": task.name, "task_version": task.version, "source": task.source,
            "img_size": list(task.img_size), "task_opts": task.opts, "data": task.data_identity(),
            "head": _neutral(to_dict(cfg.head)), "teacher": _neutral(to_dict(cfg.teacher)), "seed": cfg.seed,
        }

    def identity(self) -> dict[str, Any]:
        """The whole resolved config (what ``auto`` and ``null`` became included), stored in the row; its hash
        without :data:`~lwbench.schema.HASH_EXCLUDE` is the run id, so a new RunConfig field counts by default."""
        d = self.cfg.to_dict()
        d.update(
            budget=self.method.budget_str(), method_version=self.method.version,
            method_opts=self.method.resolved_options(), task_version=self.task.version, source=self.task.source,
            data_root=d["data_root"] if self.task.source == "real" else None, data=self.task.data_identity(),
            task_opts=self.task.opts, img_size=list(self.task.img_size), device=self.device, threads=self.threads,
            weights_sha256=self.weights_sha256, teacher_id=self.teacher_id, regime=self.regime,
        )
        d = _neutral(d)
        if d["eval"]["limit"] is not None:  # a seeded random subset (lwbench.task.limited_indices), not the first N
            d["eval"]["subset"] = "random"  # images that rows before 2026-12-07 read: their run ids stay theirs
        d["teacher"] = _neutral(d["teacher"])
        d["head"] = _neutral(d["head"])
        d["measure"] = _neutral(d["measure"])
        return d

    def effort(self) -> dict[str, Any]:
        """The row's training columns: regime, teacher / pretraining / fine-tuning steps and the recipe, so a
        reader sees at once whether two rows had the same training on top of the same teacher."""
        train, method = self.cfg.train, self.method
        stage = None
        if self.regime == "finetuned":
            stage = method.finetune_stage() if method.training != "none" else train
        stage = stage.resolved(train) if hasattr(stage, "resolved") else stage
        pre = sum(int(getattr(method.opts, n).resolved(train).steps) for n in method.stage_names(method.opts)
                  if n != "finetune")
        steps = int(stage.steps) if stage is not None else 0
        recipe = (f"steps={steps} lr={stage.lr:g} batch={stage.batch_size} warmup={stage.warmup_steps}"
                  if steps else "-")
        init = (f"weights:{self.weights_sha256[:12]}" if self.weights_sha256 else
                f"timm:{self.backbone_name}" if self.pretrained else "scratch")
        return {"regime": self.regime, "teacher_steps": int(self.cfg.teacher.steps),
                "teacher_probe_steps": int(self.cfg.teacher.probe_steps), "init": init, "pretrain_steps": pre,
                "finetune_steps": steps, "finetune_recipe": recipe}


def build_teacher(plan: Plan, lock: bool = True):
    """The task-trained backbone + head every method starts from (trained once per teacher id, cached):
    ``(model, seconds it took to train, its folder)``."""
    from lwbench.backbones import create_backbone
    from lwbench.heads import TaskModel
    from lwbench.shipping import forget_shipped, install, is_shipped_copy
    from lwbench.training.teacher import is_done, load_teacher, train_teacher
    from lwbench.vit import FullEncoder

    task, cfg = plan.task, plan.cfg
    tdir = cache_dir() / "teachers" / plan.teacher_id
    steps = cfg.teacher.steps + cfg.teacher.probe_steps  # either trains: a fine-tuned teacher or a linear probe
    cached = steps > 0 and is_done(tdir)
    if cached and cfg.retrain_teacher and is_shipped_copy(tdir):
        forget_shipped(tdir)
        cached = False
    if not cached and steps > 0 and not cfg.retrain_teacher:
        cached = install(plan.teacher_id, tdir)
    seed_everything(cfg.seed)  # before the backbone's weights are drawn: one config, one teacher
    vit = create_backbone(plan.backbone_name, task.img_size, weights=plan.weights,
                          pretrained=plan.pretrained and not cached)
    model = TaskModel(FullEncoder(vit), task.make_head(vit.embed_dim, cfg.head.pool, decoder=cfg.head.decoder))
    if steps <= 0:
        log.warning("warning: teacher.steps=0 and teacher.probe_steps=0: the task head is untrained, so accuracy "
                    "will be at chance; set teacher.probe_steps=N to train a linear probe on the frozen backbone")
        return model.eval(), 0.0, tdir
    if cfg.teacher.steps == 0 and not cfg.quiet:
        log.info("notice: teacher.steps=0: the backbone stays frozen as loaded and only the task head is trained "
                 "(a linear probe, %d steps at lr %g)", cfg.teacher.probe_steps, cfg.teacher.probe_lr)
    if cached:
        load_teacher(model, tdir)
        log.info("teacher %s loaded from cache (%s)", plan.teacher_id, tdir)
        return model.eval(), _teacher_seconds(tdir), tdir
    log.info("training the task backbone ('teacher') %s on %s (%s) for %d steps; cached in %s", plan.backbone_name,
             task.name, task.source, steps, tdir)
    tdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(tdir / "config.json", json.dumps(jsonable(plan.teacher_config), indent=1))
    train_teacher(model, task, cfg.teacher, tdir, plan.device, cfg.quiet)
    return model.eval(), _teacher_seconds(tdir), tdir


def _teacher_seconds(tdir: Path) -> float:
    """Training time of a teacher folder, its linear probe (``probe/``, when it preceded fine-tuning) included."""
    from lwbench.training.teacher import is_done, training_time

    probe = tdir / "probe"
    return training_time(tdir) + (training_time(probe) if is_done(probe) else 0.0)


def run(cfg: RunConfig) -> dict:
    """Run one point and return its row (the existing row if the run id is done and not ``cfg.force``)."""
    from lwbench.results import ResultStore
    from lwbench.training.distributed import init_from_env, is_main

    if init_from_env(resolve_device(cfg.device)) > 1 and not is_main():  # torchrun: train with rank 0, then stop
        cfg = dataclasses.replace(cfg, quiet=True)
    plan = Plan(cfg)
    store = ResultStore(Path(cfg.results) if cfg.results else results_dir())
    if store.has(plan.run_id) and not cfg.force:
        log.info("%s %s on %s: already done (run %s); use --force to rerun", plan.method.name,
                 plan.method.budget_str(), plan.task.name, plan.run_id)
        return store.get(plan.run_id)
    check_writable(store.root, "results folder", need_bytes=ROW_BYTES)
    check_writable(cache_dir(), "cache folder ($LWBENCH_CACHE)", need_bytes=ROW_BYTES)
    if not cfg.force and is_main():
        recovered = recover_unsaved_row(plan.run_id, store)
        if recovered is not None:
            return recovered
    torch.set_num_threads(plan.threads)
    log.info("run %s: method=%s %s task=%s source=%s backbone=%s img=%dx%d profile=%s device=%s", plan.run_id,
             plan.method.name, plan.method.budget_str(), plan.task.name, plan.task.source, plan.backbone_name,
             *plan.task.img_size, plan.profile_name, plan.device)

    t0 = time.perf_counter()
    with _cache_space_guard(plan):
        model, teacher_time, stage_times = fit_method(plan)
        if not is_main():  # rank 0 alone evaluates, times and writes the row
            return {}

        t2 = time.perf_counter()
        metrics = evaluate(plan, model)
        per_image = metrics.pop("per_image", None) or {}
        metrics.update(interval(plan, per_image))
        eval_s = time.perf_counter() - t2
        missed = missed_objects(metrics)
        if missed:
            log.warning("%s %s: %s", plan.method.name, plan.method.budget_str(), missed)

        log.info("measuring cost (GMACs, latency, memory)")
        cost = measure_cost(plan, model)
    row = make_row(plan, metrics, cost, teacher_time=teacher_time, stage_times=stage_times, eval_s=eval_s,
                   wall_s=time.perf_counter() - t0)
    store_row(store, row, per_image)
    return row


# -- a full disk: one line, nothing half-written, nothing computed lost ------------------------------------------
ROW_BYTES = 1 << 20  # a row and its per-image file take a few KB (ImageNet's 50k test images: about 20 KB)
UNSAVED_ROWS = "unsaved_rows"


@contextlib.contextmanager
def _cache_space_guard(plan: Plan):
    """Around the work that writes into the cache (teacher, method stages, synthetic scenes): on failure, remove
    the teacher and run folders this run left with nothing resumable in them, and turn a full disk into one line.
    Stages that finished keep their checkpoints, so a rerun after freeing space resumes."""
    from lwbench.cache import format_size, prune_unfinished
    from lwbench.errors import DiskFullError
    from lwbench.paths import free_bytes, out_of_space

    try:
        yield
    except BaseException as exc:
        root = cache_dir()
        tdir = root / "teachers" / plan.teacher_id
        for folder in (root / "runs" / plan.run_id, tdir / "methods" / plan.method.name, tdir):
            prune_unfinished(folder)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and out_of_space(exc, root):
            free = free_bytes(root)
            raise DiskFullError(
                f"no space left on the disk of the cache {root} ({format_size(free or 0)} free): free some (`lwbench "
                f"cache ls`, `lwbench cache rm ID`) or set LWBENCH_CACHE to a folder on another disk; finished "
                f"stages are kept and the same command resumes them") from exc
        raise


def _unsaved_stores() -> list[Path]:
    """Where a row that the results folder could not take is kept: beside the cache, else in the temp folder."""
    folders = [Path(tempfile.gettempdir()) / f"lwbench-{UNSAVED_ROWS}"]
    try:
        folders.insert(0, cache_dir() / UNSAVED_ROWS)
    except ConfigError:
        pass
    return folders


def store_row(store, row: dict, per_image: dict) -> Path:
    """Write ``row`` and its per-image file into ``store``. When that fails (a full disk, a folder removed mid-run)
    the row is kept in an unsaved-rows store (:func:`recover_unsaved_row` stores it on the next run of the same
    command, without recomputing), no per-image file is left without its row, and the error is one line that
    says where the row is."""
    from lwbench.cache import format_size
    from lwbench.errors import DiskFullError, LwbenchError
    from lwbench.paths import free_bytes, out_of_space
    from lwbench.results import ResultStore

    try:
        store.write_per_image(row, per_image)
        path = store.write(row)
    except Exception as exc:
        if isinstance(exc, LwbenchError) and not isinstance(exc, OSError):
            raise  # an invalid row: keeping it would not help
        try:
            store.per_image_path(row).unlink(missing_ok=True)  # no per-image file without its row
        except OSError:
            pass
        kept = None
        for folder in _unsaved_stores():
            spare = ResultStore(folder)
            try:
                spare.write_per_image(row, per_image)
                kept = spare.write(row)
                break
            except Exception:
                spare.per_image_path(row).unlink(missing_ok=True)
        full = out_of_space(exc, store.root)
        why = (f"no space left on its disk, {format_size(free_bytes(store.root) or 0)} free" if full else
               f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        if kept is None:
            print(json.dumps(jsonable(row)), file=sys.stderr)
            where = "it could not be kept anywhere else either: the row is the JSON line above; save it"
        else:
            where = f"the row is kept in {kept}; free space and rerun the same command to store it (no recomputing)"
        raise (DiskFullError if full else LwbenchError)(
            f"could not write the result row into {store.root} ({why}); {where}") from exc
    log.info("wrote %s", path)
    return path


def recover_unsaved_row(run_id: str, store) -> dict | None:
    """The row of ``run_id`` that an earlier run computed but could not store, now stored into ``store``."""
    from lwbench.results import ResultStore

    for folder in _unsaved_stores():
        spare = ResultStore(folder)
        row = spare.get(run_id) if folder.is_dir() else None
        if row is None:
            continue
        per_image = spare.per_image(row)
        store_row(store, row, per_image)
        log.info("stored the row of run %s that an earlier run computed but could not write (kept in %s)", run_id,
                 spare.path_for(row))
        spare.path_for(row).unlink(missing_ok=True)
        spare.per_image_path(row).unlink(missing_ok=True)
        return row
    return None


def train_only(cfg: RunConfig) -> bool:
    """Train (or find cached) everything ``cfg``'s point needs, evaluate and time nothing: a sweep's first pass,
    so that its timing pass runs one point at a time on a machine no training shares. False when the point's
    row already exists (nothing to do)."""
    from lwbench.results import ResultStore
    from lwbench.training.distributed import init_from_env

    plan = Plan(cfg)
    init_from_env(plan.device)
    store = ResultStore(Path(cfg.results) if cfg.results else results_dir())
    if store.has(plan.run_id) and not cfg.force:
        return False
    check_writable(cache_dir(), "cache folder ($LWBENCH_CACHE)", need_bytes=ROW_BYTES)
    torch.set_num_threads(plan.threads)
    with _cache_space_guard(plan):
        fit_method(plan)
    return True


def evaluate(plan: Plan, model) -> dict:
    """The task's metric on the test split (a progress bar on a terminal), then the selection diagnostics."""
    from tqdm.auto import tqdm

    from lwbench.logs import is_quiet
    from lwbench.precision import wrap
    from lwbench.training.loop import pin_memory_for

    ev = plan.cfg.eval
    loader = plan.task.loader("test", ev.batch_size, limit=ev.limit, pin_memory=pin_memory_for(plan.device))
    n = len(loader.dataset)
    subset = isinstance(loader.dataset, torch.utils.data.Subset)
    if subset:
        log.info("evaluating on %d of the %d test images (eval.limit: a random subset drawn from the seed)", n,
                 len(loader.dataset.dataset))
    else:
        log.info("evaluating on %d test images", n)
    with tqdm(total=n, desc="eval", unit="img", disable=is_quiet() or None, leave=False) as bar:
        metrics = plan.task.evaluate(wrap(model, plan.cfg.autocast, plan.device), loader, device=plan.device,
                                     progress=bar.update)
    per_image = metrics.get("per_image")
    if per_image and subset:
        import numpy as np

        from lwbench.task import dataset_indices

        # Which test images those outcomes are (without it: all of them, in order); rows pair image by image on it.
        per_image["index"] = np.asarray(dataset_indices(loader.dataset), dtype=np.int64)
    metrics.update(selection_diagnostics(plan, model))
    return metrics


def interval(plan: Plan, per_image: dict) -> dict:
    """The headline metric's 95% bootstrap interval over the test images (``eval.bootstrap`` resamples); NaN
    when the task gave no per-image outcomes or ``eval.bootstrap`` is 0."""
    from lwbench.stats import bootstrap_ci

    ev, metric = plan.cfg.eval, plan.task.metric
    nan = {"metric_ci_low": math.nan, "metric_ci_high": math.nan, "metric_se": math.nan, "bootstrap_resamples": 0,
           "bootstrap_seed": ev.bootstrap_seed}
    if not ev.bootstrap or metric not in per_image:
        return nan
    ci = bootstrap_ci(per_image[metric], metric, n_resamples=ev.bootstrap, seed=ev.bootstrap_seed)
    return {"metric_ci_low": ci["ci_low"], "metric_ci_high": ci["ci_high"], "metric_se": ci["se"],
            "bootstrap_resamples": ev.bootstrap, "bootstrap_seed": ev.bootstrap_seed}


def selection_diagnostics(plan: Plan, model) -> dict:
    """``object_recall`` (and its chance level) on the test images, plus what the method recorded while
    fitting (:attr:`Method.diagnostics`). NaN where the task annotates no objects."""
    from lwbench.diagnostics import object_recall

    ev = plan.cfg.eval
    found = object_recall(model, plan.task, plan.spec.patch, device=plan.device, limit=ev.limit,
                          batch_size=ev.batch_size)
    return {**found, **plan.method.diagnostics}


def missed_objects(metrics: dict) -> str:
    """A warning when the processed patches hold the objects no better than a random choice would, else ``""``."""
    from lwbench.diagnostics import clearly_above_chance

    rec, chance = metrics.get("object_recall", math.nan), metrics.get("object_recall_chance", math.nan)
    if math.isnan(rec) or math.isnan(chance) or chance >= 1 or clearly_above_chance(rec, chance):
        return ""
    return (f"the processed patches hold {rec:.0%} of the object cells, about what a random choice of as many "
            f"patches gets ({chance:.0%}): the selection misses the objects")


def fit_method(plan: Plan):
    """Teacher (cached) then the method's own training (cached): ``(model, teacher_s, {stage: seconds})``.

    Stage times come from the stages this run used (:attr:`FitContext.stage_times`), cached ones with the
    time they took when they ran, never from other runs' folders."""
    from lwbench.training.context import FitContext

    teacher, teacher_time, tdir = build_teacher(plan)
    teacher.to(plan.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    work = cache_dir() / "runs" / plan.run_id
    ctx = FitContext(task=plan.task, teacher=teacher, defaults=plan.cfg.train, device=plan.device, work_dir=work,
                     shared_dir=tdir / "methods" / plan.method.name, method_opts=plan.method.opts, seed=plan.cfg.seed,
                     quiet=plan.cfg.quiet, regime=plan.regime, autocast=plan.cfg.autocast)
    seed_everything(plan.cfg.seed)
    model = plan.method.fit(ctx).to(plan.device).eval()
    return model, teacher_time, dict(ctx.stage_times)


def measure_images(plan: Plan, n: int) -> torch.Tensor:
    """A fixed batch of real test images (content-adaptive methods must not be timed on noise)."""
    ds = plan.task.dataset("test")
    n = min(n, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])


def measure_cost(plan: Plan, model):
    """:func:`lwbench.measure.contract.measure` on real test images, with the run's measurement config, timed
    against :func:`reference_model` when ``measure.paired``."""
    from lwbench.measure.contract import measure

    ms = plan.cfg.measure
    images = measure_images(plan, max(ms.throughput_batch, ms.flops_images))
    reference = reference_model(plan, model) if ms.paired else None
    return measure(model, images, ms, device=plan.device, threads=plan.threads,
                   what=f"{plan.method.name} {plan.method.budget_str()}", autocast=plan.cfg.autocast,
                   reference=reference)


def reference_model(plan: Plan, model):
    """What a row's speed is relative to: ``full``, i.e. the task-trained backbone with its head (the cached
    teacher), on the same backbone, size, dtype, threads and device. Fine-tuning ``full`` changes its weights, not
    its speed, so the teacher serves both regimes. For ``full`` itself it is the model: an A/A timing whose
    interval shows the noise floor."""
    if plan.method.name == "full":
        return model
    teacher, _, _ = build_teacher(plan)
    return teacher.to(plan.device).eval()


def reference_run_id(plan: Plan) -> str:
    """The run id of the ``full`` point of ``plan``'s config and regime: the row its speed-up is relative to."""
    if plan.method.name == "full":
        return plan.run_id
    cfg = dataclasses.replace(plan.cfg, method="full", budget=None, method_opts=None, regime=plan.regime)
    return Plan(cfg).run_id


def _teacher_source(plan: Plan) -> str:
    """``shipped`` (lwbench's copy, :mod:`lwbench.shipping`), ``trained`` (here, now or earlier) or ``none``
    (``teacher.steps=0``: the backbone as loaded)."""
    from lwbench.shipping import teacher_source

    if plan.cfg.teacher.steps + plan.cfg.teacher.probe_steps <= 0:
        return "none"
    return teacher_source(cache_dir() / "teachers" / plan.teacher_id)


def make_row(plan: Plan, metrics: dict, cost, teacher_time: float, stage_times: dict[str, float], eval_s: float,
             wall_s: float) -> dict:
    """The result row: identity, metrics, the whole :class:`Measurement`, times, environment, config. Every
    key is declared in :data:`lwbench.schema.FIELDS` (a test holds them equal)."""
    from lwbench.measure.env import environment

    task = plan.task
    nan = math.nan
    metric = task.metric
    method_s = float(sum(stage_times.values()))
    row = {
        "run_id": plan.run_id, "config_hash": plan.run_id, "replicate_id": plan.replicate_id,
        "teacher_id": plan.teacher_id,
        "method": plan.method.name, "budget": plan.method.budget_str(), "budget_key": plan.method.budget_key or "-",
        "budget_value": float(plan.method.budget) if plan.method.budget is not None else nan,
        "task": task.name, "source": task.source, "backbone": plan.backbone_name,
        "img_size": f"{task.img_size[0]}x{task.img_size[1]}", "profile": plan.profile_name, "seed": plan.cfg.seed,
        "metric": metric, "metric_value": float(metrics[metric]),
        **{k: metrics[k] for k in ("metric_ci_low", "metric_ci_high", "metric_se", "bootstrap_resamples",
                                   "bootstrap_seed")},
        **plan.effort(),
        "top1": metrics.get("top1", nan), "top5": metrics.get("top5", nan), "miou": metrics.get("miou", nan),
        "pixel_acc": metrics.get("pixel_acc", nan), "n_eval": int(metrics.get("n_eval", 0)),
        "object_recall": metrics.get("object_recall", nan),
        "object_recall_chance": metrics.get("object_recall_chance", nan),
        "where_target_recall": metrics.get("where_target_recall", nan),
        "where_target_chance": metrics.get("where_target_chance", nan),
        "selection_warning": metrics.get("selection_warning", ""),
        **cost.row(),
        "reference_run_id": reference_run_id(plan) if cost.timing_protocol == "paired" else "",
        "teacher_source": _teacher_source(plan),
        "teacher_train_time_s": teacher_time, "method_train_time_s": method_s,
        "train_time_s": teacher_time + method_s, "eval_time_s": eval_s, "wall_time_s": wall_s,
        **environment(device=plan.device, threads=plan.threads, dtype=plan.cfg.measure.dtype),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": plan.config, "status": "ok",
    }
    return row
