"""``lwbench show --compare A,B,C``: the same test images side by side, one column per method.

Each method's column is what ``lwbench show`` draws in its last panel (the patches the backbone processed, the rest
darkened; merge groups for merging methods; the plain image for ``full`` and ``lowres``), captioned with the
prediction, right or wrong. ``--disagree`` keeps only the images where the methods' stored per-image outcomes differ
(read from the rows that ``lwbench compare`` or ``run`` wrote), which is where a comparison is decided. The models
come from the same caches as ``lwbench run``; budgets and regime follow ``lwbench compare``'s rules, so the figure
shows the rows of the comparison table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwbench.errors import ConfigError


def outcomes(store: Any, plan: Any) -> dict[int, int] | None:
    """``{test index: 1 right / 0 wrong}`` of ``plan``'s stored row, None when it has no row or per-image file."""
    row = store.get(plan.run_id)
    if row is None:
        return None
    arrays = store.per_image(row)
    metric = arrays.get(row.get("metric", "top1"))
    if metric is None or np.ndim(metric) != 1:
        return None
    index = arrays.get("index", np.arange(len(metric)))
    return {int(i): int(v > 0.5) for i, v in zip(index, metric, strict=True)}


def disagreeing(per_method: Sequence[dict[int, int]]) -> list[int]:
    """Test indices every method was evaluated on and on which they do not all agree, in index order."""
    common = set.intersection(*(set(o) for o in per_method)) if per_method else set()
    return sorted(i for i in common if len({o[i] for o in per_method}) > 1)


def choose_images(plans: Sequence[Any], store: Any, n: int, disagree: bool) -> tuple[list[int], str]:
    """The test indices to draw and a note on how they were chosen."""
    size = len(plans[0].task.dataset("test"))
    if not disagree:
        return list(range(min(n, size))), f"the first {min(n, size)} test images"
    stored = [outcomes(store, p) for p in plans]
    missing = [p.method.name for p, o in zip(plans, stored, strict=True) if o is None]
    if missing:
        task = plans[0].task.name
        names = ",".join(dict.fromkeys(p.method.name for p in plans if p.method.name != "full"))
        raise ConfigError(f"--disagree reads the stored per-image outcomes, and {', '.join(missing)} has no row in "
                          f"{store.root}; run `lwbench compare --task {task} --methods {names}` first")
    idx = disagreeing(stored)
    return idx[:n], f"{min(n, len(idx))} of the {len(idx)} test images where the methods disagree"


def show_compare(reqs: Sequence[Any], out: Path, n: int = 4, disagree: bool = False) -> Path:
    """Draw ``reqs`` (one :class:`~lwbench.config.RunConfig` per method) on the same test images into ``out``."""
    from lwbench.diagnostics import has_objects, object_mask
    from lwbench.results import ResultStore
    from lwbench.runner import Plan, fit_method
    from lwbench.show import (
        KEPT_EDGE,
        OBJECT_EDGE,
        clear_ticks,
        dim_unprocessed,
        kept_mask,
        merge_groups,
        merge_panel,
        outline,
        prediction_caption,
        pyplot,
        save_figure,
        spatial_content,
        upsample_cells,
    )
    from lwbench.sweeps.points import results_of
    from lwbench.task import denormalize

    plans = [Plan(r) for r in reqs]
    idx, how = choose_images(plans, ResultStore(results_of(reqs[0])), n, disagree)
    if not idx:
        raise ConfigError(f"no test image to draw: {how}")
    ds = plans[0].task.dataset("test")
    images = torch.stack([ds[i][0] for i in idx])
    names = getattr(plans[0].task, "class_names", ()) or ()
    lab = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
    plt = pyplot()
    ih, iw = images.shape[-2:]
    panel = 3.0
    fig, axes = plt.subplots(len(idx), len(plans), figsize=(panel * len(plans), len(idx) * (panel * ih / iw + 0.5)
                                                            + 0.9), squeeze=False)
    for c, plan in enumerate(plans):
        model = fit_method(plan)[0].to("cpu").eval()
        with torch.inference_mode():
            tok = model.encoder(images)
            logits = model(images)
        kind = spatial_content(tok)
        grid = tuple(tok.grid)
        objects = has_objects(plan.task) and grid == tuple(s // plan.spec.patch for s in plan.task.img_size)
        for r, i in enumerate(idx):
            ax = axes[r][c]
            img = denormalize(images[r]).permute(1, 2, 0).numpy()
            size = img.shape[:2]
            if kind == "merging":
                a = merge_groups(tok, r)
                ax.imshow(merge_panel(img, a if a is not None else torch.arange(tok.num_cells), grid))
            elif kind == "selection":
                keep = kept_mask(tok, r)
                ax.imshow(dim_unprocessed(img, upsample_cells(keep, grid, size)).clip(0, 1))
                outline(ax, keep, grid, size, colors=KEPT_EDGE, linewidths=1.0)
            else:
                ax.imshow(img)
            if objects:
                cells = object_mask(plan.task, "test", i, grid, plan.spec.patch)
                if cells.any():
                    outline(ax, cells, grid, size, colors=OBJECT_EDGE, linewidths=1.0, linestyles="dashed")
            head = f"{plan.method.name} {plan.method.budget_str()}".strip() if r == 0 else ""
            if plan.task.kind == "classification":
                y, pred = int(ds[i][1]), int(logits[r].argmax())
                caption, colour = prediction_caption(lab(y), lab(pred), pred == y)
                ax.set_title((head + "\n" if head else "") + caption, fontsize=8, color=colour)
            else:
                ax.set_title(head, fontsize=8)
            clear_ticks([ax])
    regime = plans[0].regime.replace("_", " ")
    fig.suptitle(f"{plans[0].task.name} ({plans[0].task.source.upper()} source), {regime}: {how}\n"
                 "yellow outline = patches processed (the rest darkened), colours = merge groups, "
                 "dashed cyan = annotated object", fontsize=9)
    return save_figure(fig, out)


__all__ = ["show_compare", "choose_images", "disagreeing", "outcomes"]
