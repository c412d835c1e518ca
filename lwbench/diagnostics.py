"""Selection diagnostics: does a method process the patches that hold the object?

For tasks that annotate their objects (``Task.objects``: traffic-sign boxes, billiard balls) two numbers
explain why a patch-selection or token-pruning method wins or fails, where accuracy alone cannot:

* ``object_recall``: the share of object cells among the cells a model processed, per image, averaged
  over test images with an object (cells = the high-res patch grid; a cell is an object cell when its
  centre lies in an object's box, as for the teacher's dense loss). A selection that never sees the
  sign cannot classify it, whatever its extractor learned. ``object_recall_chance`` is what a uniformly
  random choice of the same number of cells would get in expectation (processed cells / all cells).
* ``where_target_recall``: the same for the top-k cells of the teacher's last-layer attention, the
  "where" target LookWhere's selector is distilled from. When it is not clearly above chance
  (:func:`selection_warning`), the selector is taught to miss the objects, and lwbench says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lwbench.attention import BlockInputs
from lwbench.errors import ConfigError, DataError
from lwbench.vit import num_prefix

#: The where-target passes when it closes at least this share of the gap from a random selection's recall to 1.
GUARD_SHARE = 0.25


def has_objects(task) -> bool:
    """True when ``task`` (with its current source) annotates object boxes that can be read."""
    try:
        return task.objects("test", 0) is not None
    except Exception:  # real billiards JSON without radii, an empty split, ...
        return False


def object_mask(task, split: str, index: int, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """``(H*W,)`` bool: cells of item ``index`` whose centre lies in one of its objects' boxes (the teacher's
    dense-loss rule); an object too small to hold any cell centre gets the cell that holds its own centre."""
    from lwbench.training.teacher import cell_targets

    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    for obj in task.objects(split, index):
        cells = cell_targets([obj], grid, patch) > 0
        if not bool(cells.any()):
            x0, y0, x1, y1 = obj["box"]
            r = min(grid[0] - 1, max(0, int((y0 + y1) / 2 // patch)))
            c = min(grid[1] - 1, max(0, int((x0 + x1) / 2 // patch)))
            cells[r * grid[1] + c] = True
        mask |= cells
    return mask


def recall(chosen: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """``(B,)`` share of object cells among ``chosen`` (both ``(B, N)`` bool); NaN where an image has none."""
    n_obj = objects.sum(1).float()
    hit = (chosen & objects).sum(1).float()
    return torch.where(n_obj > 0, hit / n_obj.clamp(min=1), torch.full_like(n_obj, math.nan))


def nanmean(values: torch.Tensor) -> float:
    ok = ~torch.isnan(values)
    return float(values[ok].mean()) if bool(ok.any()) else math.nan


def _batches(task, split: str, n: int | None, batch_size: int, subset: bool = False):
    """``(indices, images)`` of ``split``: its first ``n`` images (None: all), or with ``subset`` the ``n`` that a
    limited evaluation reads (:meth:`lwbench.task.Task.loader`'s :func:`~lwbench.task.limited_indices`)."""
    from lwbench.task import limited_indices

    ds = task.dataset(split)
    total = len(ds)
    if n is None or n >= total:
        order = list(range(total))
    else:
        order = limited_indices(total, n, task.seed) if subset else list(range(n))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, torch.stack([ds[i][0] for i in idx])


@torch.inference_mode()
def object_recall(model, task, patch: int, device: str = "cpu", split: str = "test", limit: int | None = None,
                  batch_size: int = 64) -> dict[str, Any]:
    """``object_recall`` and ``object_recall_chance`` of ``model`` (a TaskModel) over ``split``.

    NaN when the task has no object annotations, or the model's tokens live on another grid than the
    high-res one (``lowres``)."""
    nan = {"object_recall": math.nan, "object_recall_chance": math.nan}
    if not has_objects(task):
        return nan
    grid = (task.img_size[0] // patch, task.img_size[1] // patch)
    model.eval()
    rec, chance = [], []
    for idx, images in _batches(task, split, limit, batch_size, subset=True):
        out = model.encoder(images.to(device))
        if tuple(out.grid) != grid:
            return nan
        chosen = out.processed_cells().cpu()
        objects = torch.stack([object_mask(task, split, i, grid, patch) for i in idx])
        r = recall(chosen, objects)
        rec.append(r)
        chance.append(torch.where(torch.isnan(r), r, chosen.float().mean(1)))
    return {"object_recall": nanmean(torch.cat(rec)), "object_recall_chance": nanmean(torch.cat(chance))}


def _split_with_images(task, split: str) -> str:
    """``split``, or ``"train"`` when the task has no such split (e.g. traffic signs trained on all of Set1
    hold out no val): the guard then reads training images, which says the same about the teacher."""
    try:
        if len(task.dataset(split)) > 0:
            return split
    except (ConfigError, DataError):
        pass
    return "train"


@torch.no_grad()
def attention_recall(vit, task, k: int, queries: str, blocks: list[int] | None = None, split: str = "val",
                     n: int = 64, device: str = "cpu") -> dict[int, float]:
    """``{block: object recall}`` of the top-``k`` patch keys of each block's attention (heads and ``queries``
    rows averaged; ``blocks`` None = every block) on the first ``n`` images of ``split`` (falls back to train
    when the task has no ``split``), in the full (unreduced) forward. NaN per block without annotations."""
    depth = len(vit.blocks)
    indices = list(range(depth)) if blocks is None else [b % depth for b in blocks]
    if not has_objects(task):
        return {i: math.nan for i in indices}
    split = _split_with_images(task, split)
    patch = int(vit.patch_embed.patch_size[0])
    grid = (task.img_size[0] // patch, task.img_size[1] // patch)
    k = max(1, min(int(k), grid[0] * grid[1]))
    rec: dict[int, list[torch.Tensor]] = {i: [] for i in indices}
    was_training = vit.training
    vit.eval()
    try:
        for idx, images in _batches(task, split, n, 32):
            with BlockInputs(vit, indices) as captured:
                vit.forward_features(images.to(device))
            objects = torch.stack([object_mask(task, split, i, grid, patch) for i in idx])
            for i, logits in captured.logits(num_prefix(vit), queries).items():
                logits = logits.cpu()
                chosen = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
                rec[i].append(recall(chosen, objects))
    finally:
        vit.train(was_training)
    return {i: nanmean(torch.cat(r)) for i, r in rec.items()}


def where_target_recall(vit, task, k: int, queries: str, split: str = "val", n: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """Object recall of the top-``k`` cells of the teacher's where-target (last-layer attention, heads and
    ``queries`` rows averaged) on the first ``n`` images of ``split``, and of a random choice of ``k`` cells."""
    if not has_objects(task):
        return {"where_target_recall": math.nan, "where_target_chance": math.nan}
    patch = int(vit.patch_embed.patch_size[0])
    n_cells = (task.img_size[0] // patch) * (task.img_size[1] // patch)
    found = attention_recall(vit, task, k, queries, [-1], split, n, device)
    chance = max(1, min(int(k), n_cells)) / n_cells
    return {"where_target_recall": next(iter(found.values())), "where_target_chance": chance}


def clearly_above_chance(found: float, chance: float) -> bool:
    """The guard's rule: ``found`` recall is at least :data:`GUARD_SHARE` of the way from ``chance`` to 1."""
    return found >= chance + GUARD_SHARE * (1 - chance)


def selection_warning(target_recall: float, chance: float) -> str:
    """A one-line warning when the where-target is not clearly above a random selection, else ``""``.

    "Clearly above" = at least a quarter of the way from chance to perfect recall (0.32 at 28 of 300 cells):
    a teacher whose attention is on the objects is far above that (0.8 and more on quick traffic signs),
    one trained without a reason to look at them sits at chance."""
    if math.isnan(target_recall) or clearly_above_chance(target_recall, chance):
        return ""
    return (f"the teacher's attention does not cover the objects (its top-k cells hold {target_recall:.0%} of the "
            f"object cells, a random choice {chance:.0%}); the selector will learn to miss them")


__all__ = ["object_recall", "where_target_recall", "selection_warning", "clearly_above_chance", "recall", "has_objects",
           "object_mask"]
