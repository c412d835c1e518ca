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

from lwbench.attention import LastBlockInput
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


def _batches(task, split: str, n: int, batch_size: int):
    ds = task.dataset(split)
    n = min(n, len(ds))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
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
    for idx, images in _batches(task, split, limit or 10**9, batch_size):
        out = model.encoder(images.to(device))
        if tuple(out.grid) != grid:
            return nan
        chosen = out.processed_cells().cpu()
        objects = torch.stack([object_mask(task, split, i, grid, patch) for i in idx])
        r = recall(chosen, objects)
        rec.append(r)
        chance.append(torch.where(torch.isnan(r), r, chosen.float().mean(1)))
    return {"object_recall": nanmean(torch.cat(rec)), "object_recall_chance": nanmean(torch.cat(chance))}


@torch.no_grad()
def where_target_recall(vit, task, k: int, queries: str, split: str = "val", n: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """Object recall of the top-``k`` cells of the teacher's where-target (last-layer attention, heads and
    ``queries`` rows averaged) on the first ``n`` images of ``split``, and of a random choice of ``k`` cells."""
    if not has_objects(task):
        return {"where_target_recall": math.nan, "where_target_chance": math.nan}
    patch = int(vit.patch_embed.patch_size[0])
    grid = (task.img_size[0] // patch, task.img_size[1] // patch)
    n_cells = grid[0] * grid[1]
    k = max(1, min(int(k), n_cells))
    rec = []
    was_training = vit.training
    vit.eval()
    try:
        for idx, images in _batches(task, split, n, 32):
            with LastBlockInput(vit) as last:
                vit.forward_features(images.to(device))
            logits = last.logits(num_prefix(vit), queries).cpu()
            chosen = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
            objects = torch.stack([object_mask(task, split, i, grid, patch) for i in idx])
            rec.append(recall(chosen, objects))
    finally:
        vit.train(was_training)
    return {"where_target_recall": nanmean(torch.cat(rec)), "where_target_chance": k / n_cells}


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
