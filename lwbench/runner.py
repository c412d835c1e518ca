"""One benchmark point: resolve config -> validate -> task-trained teacher -> method fit -> evaluate ->
measure -> one result row.

Validation (names, budget, image size, data layout) happens before any training, so a bad command
fails in a second. Every expensive stage is cached and resumable: the teacher per (backbone, task,
source, size, settings, seed), the method's training per run id, and the row itself is written
atomically only when everything succeeded.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lwbench.config import deep_merge, load_profile, task_profile
from lwbench.errors import ConfigError
from lwbench.method import BackboneSpec, resolve_budget
from lwbench.paths import cache_dir, results_dir
from lwbench.registry import get_method, get_task
from lwbench.results import config_hash
from lwbench.seeding import seed_everything


@dataclass
class RunRequest:
    """What the user asked for (CLI flags); profile values fill the rest."""

    method: str
    task: str
    budget: str | None = None
    profile: str = "quick"
    source: str = "auto"
    data_root: str | None = None
    device: str | None = None
    seed: int = 0
    backbone: str | None = None
    weights: str | None = None
    img_size: tuple[int, int] | None = None
    force: bool = False
    quiet: bool = False
    results: str | None = None
    method_opts: dict[str, Any] = field(default_factory=dict)
    task_opts: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # nested profile overrides (--set)


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"lwbench: {msg}", file=sys.stderr, flush=True)


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or auto, not '{name}'")
    return name


class Plan:
    """A validated run: every object built, nothing trained yet."""

    def __init__(self, req: RunRequest):
        self.req = req
        profile = load_profile(req.profile)
        self.profile_name = profile["name"]
        profile = deep_merge(profile, req.overrides)
        self.tp = task_profile(profile, req.task)
        self.method_cls = get_method(req.method)
        self.task_cls = get_task(req.task)
        self.method_settings = (profile.get("methods") or {}).get(req.method, {}) or {}
        self.device = resolve_device(req.device or profile.get("device"))
        self.threads = int(profile.get("threads") or os.cpu_count() or 1)
        img_size = req.img_size or self.tp.get("img_size")
        task_opts = {**(self.tp.get("task_opts") or {}), **req.task_opts}
        self.task = self.task_cls(source=req.source, data_root=req.data_root, img_size=img_size, seed=req.seed,
                                  **task_opts)
        self.backbone_name = req.backbone or self.tp["backbone"]
        from lwbench.backbones import check_backbone_name, check_img_size, create_backbone, patch_size_of

        check_backbone_name(self.backbone_name)
        check_img_size(self.task.img_size, patch_size_of(self.backbone_name))
        probe = create_backbone(self.backbone_name, self.task.img_size)
        self.spec = BackboneSpec.of(probe, self.backbone_name, self.task.img_size)
        del probe
        budget = resolve_budget(self.method_cls, req.budget)
        method_opts = {**{k: v for k, v in self.method_settings.items() if k in self.method_cls.option_defaults()},
                       **req.method_opts}
        self.method = self.method_cls(self.spec, budget, **method_opts)
        self.weights = req.weights or self.tp.get("weights")
        self.pretrained = bool(self.tp.get("pretrained", False))

        self.teacher_config = {
            "backbone": self.backbone_name, "weights": str(self.weights) if self.weights else None,
            "pretrained": self.pretrained, **self.task.config(), "teacher": self.tp.get("teacher"),
            "head": self.tp.get("head"),
            "seed": req.seed,
        }
        self.teacher_id = config_hash(self.teacher_config)
        self.config = {
            **self.method.config(), **self.task.config(), "backbone": self.backbone_name,
            "weights": self.teacher_config["weights"], "profile": self.profile_name, "seed": req.seed,
            "device": self.device, "teacher_id": self.teacher_id,
            "finetune": self.tp.get("finetune"), "method_settings": self.method_settings,
        }
        self.run_id = config_hash(self.config)


def build_teacher(plan: Plan):
    """The task-trained backbone + head every method starts from (trained once per config, cached)."""
    from lwbench.backbones import create_backbone
    from lwbench.heads import TaskModel, make_head
    from lwbench.methods.full import FullEncoder
    from lwbench.training.teacher import is_done, load_teacher, train_teacher, training_time

    task, tp = plan.task, plan.tp
    seed_everything(plan.req.seed)  # before the backbone's weights are drawn: one config, one teacher
    vit = create_backbone(plan.backbone_name, task.img_size, weights=plan.weights, pretrained=plan.pretrained)
    pool = (tp.get("head") or {}).get("pool", "token")
    head = task.make_head(vit.embed_dim) if hasattr(task, "make_head") else make_head(task.kind, vit.embed_dim,
                                                                                         task.num_classes, pool)
    model = TaskModel(FullEncoder(vit), head)
    tdir = cache_dir() / "teachers" / plan.teacher_id
    ts = tp.get("teacher") or {}
    if int(ts.get("steps", 0)) <= 0:
        return model.eval(), 0.0, tdir
    if is_done(tdir):
        load_teacher(model, tdir)
        log(f"teacher {plan.teacher_id} loaded from cache ({tdir})", plan.req.quiet)
        return model.eval(), training_time(tdir), tdir
    log(f"training the task backbone ('teacher') {plan.backbone_name} on {task.name} ({task.source}) for "
        f"{ts['steps']} steps; cached in {tdir}", plan.req.quiet)
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "config.json").write_text(json.dumps(plan.teacher_config, indent=1, default=str))
    train_teacher(model, task, ts, tdir, plan.device, plan.req.quiet)
    return model.eval(), training_time(tdir), tdir


def run(req: RunRequest) -> dict:
    """Run one point and return its row (the existing row if the config is done and not ``force``)."""
    from lwbench.results import ResultStore

    plan = Plan(req)
    store = ResultStore(Path(req.results) if req.results else results_dir())
    if store.has(plan.run_id) and not req.force:
        log(f"{plan.method.name} {plan.method.budget_str()} on {plan.task.name}: already done (run {plan.run_id}); "
            "use --force to rerun", req.quiet)
        return store.get(plan.run_id)
    torch.set_num_threads(plan.threads)
    log(f"run {plan.run_id}: method={plan.method.name} {plan.method.budget_str()} task={plan.task.name} "
        f"source={plan.task.source} backbone={plan.backbone_name} img={plan.task.img_size[0]}x{plan.task.img_size[1]} "
        f"profile={plan.profile_name} device={plan.device}", req.quiet)

    t0 = time.perf_counter()
    model, teacher_time, method_train_s = fit_method(plan)

    log("evaluating", req.quiet)
    ev = plan.tp.get("eval") or {}
    t2 = time.perf_counter()
    loader = plan.task.loader("test", int(ev.get("batch_size", 64)), limit=ev.get("limit"))
    metrics = plan.task.evaluate(model, loader, device=plan.device)
    metrics.update(selection_diagnostics(plan, model, ev))
    eval_s = time.perf_counter() - t2
    missed = missed_objects(metrics)
    if missed:
        log(f"warning: {plan.method.name} {plan.method.budget_str()}: {missed}")

    log("measuring cost (GMACs, latency, memory)", req.quiet)
    cost = measure_cost(plan, model)
    row = make_row(plan, metrics, cost, teacher_time=teacher_time, method_train_s=method_train_s, eval_s=eval_s,
                   wall_s=time.perf_counter() - t0)
    path = store.write(row)
    log(f"wrote {path}", req.quiet)
    return row


def selection_diagnostics(plan: Plan, model, ev: dict) -> dict:
    """``object_recall`` (and its chance level) on the test images, plus what the method recorded while
    fitting (:attr:`Method.diagnostics`). NaN where the task annotates no objects."""
    from lwbench.diagnostics import object_recall

    found = object_recall(model, plan.task, plan.spec.patch, device=plan.device, limit=ev.get("limit"),
                          batch_size=int(ev.get("batch_size", 64)))
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
    """Teacher (cached) then the method's own training (cached): ``(model, teacher_s, method_s)``."""
    from lwbench.training.context import FitContext

    teacher, teacher_time, tdir = build_teacher(plan)
    teacher.to(plan.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    work = cache_dir() / "runs" / plan.run_id
    ctx = FitContext(task=plan.task, teacher=teacher, settings=dict(plan.tp.get("finetune") or {}),
                     device=plan.device, work_dir=work,
                     shared_dir=tdir / "methods" / plan.method.name, method_settings=dict(plan.method_settings),
                     seed=plan.req.seed, quiet=plan.req.quiet)
    seed_everything(plan.req.seed)
    t1 = time.perf_counter()
    model = plan.method.fit(ctx).to(plan.device).eval()
    method_train_s = 0.0
    if plan.method.training != "none":
        method_train_s = _method_train_time(work, ctx.shared_dir) or time.perf_counter() - t1
    return model, teacher_time, method_train_s


def _method_train_time(work: Path, shared: Path) -> float:
    from lwbench.training.loop import training_time

    total = 0.0
    for root in (work, shared):
        if root.is_dir():
            for done in root.rglob("done.json"):
                total += training_time(done.parent)
    return total


def measure_images(plan: Plan, n: int) -> torch.Tensor:
    """A fixed batch of real test images (content-adaptive methods must not be timed on noise)."""
    ds = plan.task.dataset("test")
    n = min(n, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])


def measure_cost(plan: Plan, model) -> dict:
    from lwbench.measure.flops import mean_macs_over
    from lwbench.measure.worker import measure_in_subprocess

    ms = plan.tp.get("measure") or {}
    images = measure_images(plan, max(int(ms.get("throughput_batch", 32)), int(ms.get("flops_images", 4))))
    model = model.to("cpu").eval()
    n_flops = min(int(ms.get("flops_images", 4)), images.shape[0])
    singles = [images[i: i + 1] for i in range(n_flops)]
    rep = mean_macs_over(model, singles)  # data-dependent methods: averaged over real images
    with torch.inference_mode():
        tokens = [float(model.encoder(x).realised_tokens().float().mean()) for x in singles]
    parts = rep.parts_gmacs
    kw = dict(device=plan.device, threads=plan.threads, throughput_batch=int(ms.get("throughput_batch", 32)),
              warmup=int(ms.get("warmup", 5)), min_run_time=float(ms.get("min_run_time", 1.0)))
    if ms.get("isolate", True):
        timing = measure_in_subprocess(model, images, **kw)
    else:
        from lwbench.measure.worker import measure_all

        timing = {**measure_all(model, images, **kw), "isolated": False}
    mem_kind = "cuda_max_allocated" if plan.device == "cuda" else "cpu_peak_rss_delta"
    return {
        "gmacs": rep.gmacs,
        "gmacs_overhead": parts.get("overhead", 0.0),
        "gmacs_backbone": parts.get("backbone", 0.0),
        "gmacs_head": parts.get("head", 0.0),
        "params_m": rep.params,
        "tokens_mean": sum(tokens) / len(tokens),
        "latency_ms": timing["latency_ms"], "latency_iqr_ms": timing["latency_iqr_ms"],
        "throughput": timing["throughput"], "throughput_iqr": timing["throughput_iqr"],
        "throughput_batch": timing["throughput_batch"],
        "peak_mem_mb": timing["peak_memory_mb"], "mem_kind": mem_kind,
        "measure_isolated": bool(timing.get("isolated", False)),
    }


def make_row(plan: Plan, metrics: dict, cost: dict, teacher_time: float, method_train_s: float, eval_s: float,
             wall_s: float) -> dict:
    from lwbench.measure.env import environment

    task = plan.task
    nan = math.nan
    metric = task.metric
    bkey = plan.method.budget_key
    row = {
        "run_id": plan.run_id, "config_hash": plan.run_id,
        "method": plan.method.name, "budget": plan.method.budget_str(), "budget_key": bkey or "-",
        "budget_value": float(plan.method.budget) if plan.method.budget is not None else nan,
        "task": task.name, "source": task.source, "backbone": plan.backbone_name,
        "img_size": f"{task.img_size[0]}x{task.img_size[1]}", "profile": plan.profile_name, "seed": plan.req.seed,
        "metric": metric, "metric_value": float(metrics[metric]),
        "top1": metrics.get("top1", nan), "top5": metrics.get("top5", nan), "miou": metrics.get("miou", nan),
        "pixel_acc": metrics.get("pixel_acc", nan), "n_eval": int(metrics.get("n_eval", 0)),
        "object_recall": metrics.get("object_recall", nan),
        "object_recall_chance": metrics.get("object_recall_chance", nan),
        "where_target_recall": metrics.get("where_target_recall", nan),
        "where_target_chance": metrics.get("where_target_chance", nan),
        "selection_warning": metrics.get("selection_warning", ""),
        **cost,
        "teacher_train_time_s": teacher_time, "method_train_time_s": method_train_s,
        "train_time_s": teacher_time + method_train_s, "eval_time_s": eval_s,
        "wall_time_s": wall_s,
        **environment(device=plan.device, threads=plan.threads),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": copy.deepcopy(plan.config), "status": "ok",
    }
    return row
