"""``lwbench show``: what a method looks at, on a few test images (LookWhere's Figure 3 for any method).

One row per image. Selection methods (LookWhere, top-k, EViT, DynamicViT, ATS, DPS, IPS, random, grid): the
image, captioned with the prediction marked right or wrong; the method's selection map when it has one
(LookWhere's where-map, DPS's scorer) with a colour bar; the image with the patches the backbone processed
outlined and every other patch darkened. Merging methods (ToMe, PiToMe): the image and its merge groups, each
group of two or more cells in one colour with a border between groups (ToMe merges by similarity, so a group
need not be connected). Methods with nothing spatial (``full``; ``lowres``, which processes every patch of a
smaller image) are refused in one line before anything trains.

The trained model comes from the same caches as ``lwbench run`` (training it if needed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lwbench.errors import ConfigError

KEPT_EDGE = "#ffd400"  # outline of the processed patches
OBJECT_EDGE = "#00e5ff"  # outline of the annotated object cells
RIGHT, WRONG = "#1a7f37", "#cf222e"
DIM = 0.18  # brightness left to the patches the backbone never saw


def _trained_model(req):
    from lwbench.runner import Plan, fit_method

    plan = Plan(req)
    refuse_if_nothing_spatial(plan)
    return plan, fit_method(plan)[0].to("cpu").eval()


def kept_mask(out, i: int) -> torch.Tensor:
    """``(H*W,)`` bool: grid cells whose own pixels reached the backbone for image ``i``."""
    return out.processed_cells()[i].cpu()


def selection_map(out) -> tuple[torch.Tensor, str] | None:
    """``((B, H*W) scores, colour-bar label)``: the map a selection method ranks cells by, when it has one on the
    token grid (LookWhere's where-map logits, DPS's scorer output); None otherwise."""
    aux = out.aux if isinstance(out.aux, dict) else {}
    for key, label in (("where_map", "where-map (logit)"), ("scores", "scorer output")):
        scores = aux.get(key)
        if torch.is_tensor(scores) and scores.dim() == 2 and scores.shape[1] == out.num_cells:
            return scores.detach().float().cpu(), label
    return None


def hard_clusters(out) -> torch.Tensor | None:
    """``(B, H*W)`` long: the cluster each cell is nearest to, for a method that clusters its tokens softly and
    reconstructs every cell (``aux["cluster_labels"]``: Hourglass), which therefore has no ``assignment``."""
    aux = out.aux if isinstance(out.aux, dict) else {}
    labels = aux.get("cluster_labels")
    return labels if torch.is_tensor(labels) and labels.dim() == 2 and labels.shape[1] == out.num_cells else None


def merge_groups(out, i: int) -> torch.Tensor | None:
    """``(H*W,)`` long: the token each cell of image ``i`` ended in (-1: dropped), or for a soft clustering the
    cluster it is nearest to (:func:`hard_clusters`), when at least two cells share one; None for methods that
    do not merge."""
    assignment = out.assignment if out.assignment is not None else hard_clusters(out)
    if assignment is None:
        return None
    a = assignment[i].cpu()
    used = a[a >= 0]
    if used.numel() == 0 or int(torch.bincount(used).max()) < 2:
        return None
    return a


def spatial_content(out) -> str | None:
    """What ``lwbench show`` can draw for this output: ``"merging"``, ``"selection"`` or None (every cell
    processed by its own token, no selection map: nothing to show)."""
    if any(merge_groups(out, i) is not None for i in range(out.patches.shape[0])):
        return "merging"
    if selection_map(out) is not None or not bool(out.processed_cells().all()):
        return "selection"
    return None


def refuse_if_nothing_spatial(plan) -> None:
    """One line, before any training, for a method whose figure would be the image twice: probe the untrained
    encoder on one test image (the kind of output does not depend on training)."""
    from lwbench.backbones import create_backbone

    try:
        encoder = plan.method.build(create_backbone(plan.backbone_name, plan.task.img_size)).eval()
        with torch.inference_mode():
            out = encoder(plan.task.dataset("test")[0][0][None])
    except Exception:  # a method that cannot run untrained: decide on the trained model instead
        return
    refuse_output(plan.method.name, out)


def refuse_output(name: str, out) -> None:
    if spatial_content(out) is None:
        raise ConfigError(f"{name} processes every patch of its {out.grid[0]}x{out.grid[1]} grid "
                          "with its own token and has no selection map, so lwbench show has nothing to draw; use a "
                          "selection method (lookwhere, topk, evit, dps, random) or a merging one (tome, pitome)")


def pyplot():
    """pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def clear_ticks(axes) -> None:
    """Image panels, not plots: no axis ticks."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def save_figure(fig, out: str | Path, rect=None) -> Path:
    """Lay out (inside ``rect`` of the figure, when given), write ``out`` atomically (creating its folder, with
    an ordinary file's mode) and close ``fig``."""
    import matplotlib.pyplot as plt

    from lwbench.paths import temp_beside

    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    tmp = temp_beside(out.parent, out.stem, suffix=f".{fmt}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out


def untrained_selector(plan, where) -> str:
    """A warning when the drawn selection map comes from a selector nothing trained (no pretraining stage ran and
    no selector weights were loaded): its map is then noise, whatever the figure seems to show."""
    if where is None or plan.effort()["pretrain_steps"] > 0 or getattr(plan.method.opts, "weights", None):
        return ""
    return (f"the {plan.method.name} selector drawn here is untrained (its pretraining has 0 steps and no "
            "method.weights were given): the selection map is noise.")


# -- panels (pure: arrays in, arrays or text out) --------------------------------------------------------------

def upsample_cells(cells: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """``(H*W,)`` per-cell values -> ``size`` pixels (each cell a block; nearest)."""
    gh, gw = grid
    v = cells.reshape(1, 1, gh, gw).float()
    return torch.nn.functional.interpolate(v, size=size, mode="nearest")[0, 0].numpy()


def border_segments(cells: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> list:
    """Line segments ``((x0, y0), (x1, y1))`` in pixel coordinates along every side of a marked cell (``cells``:
    ``(H*W,)`` bool) that does not touch another marked cell: the outline of the marked region. Sides on the image
    border are moved half a pixel inwards, so they are drawn whole instead of clipped."""
    gh, gw = grid
    ch, cw = size[0] / gh, size[1] / gw
    m = np.pad(cells.reshape(gh, gw).numpy().astype(bool), 1)
    xs = lambda c: min(max(c * cw - 0.5, 0.0), size[1] - 1.0)  # noqa: E731
    ys = lambda r: min(max(r * ch - 0.5, 0.0), size[0] - 1.0)  # noqa: E731
    out = []
    for r, c in zip(*np.nonzero(m), strict=True):
        gr, gc = r - 1, c - 1  # back to grid indices
        if not m[r - 1, c]:
            out.append(((xs(gc), ys(gr)), (xs(gc + 1), ys(gr))))
        if not m[r + 1, c]:
            out.append(((xs(gc), ys(gr + 1)), (xs(gc + 1), ys(gr + 1))))
        if not m[r, c - 1]:
            out.append(((xs(gc), ys(gr)), (xs(gc), ys(gr + 1))))
        if not m[r, c + 1]:
            out.append(((xs(gc + 1), ys(gr)), (xs(gc + 1), ys(gr + 1))))
    return out


def outline(ax, cells: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], **style) -> None:
    """Draw the outline of the marked cells on an image panel of ``size`` pixels."""
    from matplotlib.collections import LineCollection

    ax.add_collection(LineCollection(border_segments(cells, grid, size), **style))


def dim_unprocessed(img: np.ndarray, keep_px: np.ndarray) -> np.ndarray:
    """The image with processed pixels unchanged and the rest greyed and darkened to ``DIM``."""
    grey = img.mean(axis=2, keepdims=True)
    dimmed = DIM * (0.5 * img + 0.5 * grey)
    k = keep_px[..., None]
    return img * k + dimmed * (1 - k)


def group_colours(assignment: torch.Tensor) -> np.ndarray:
    """``(H*W, 4)`` RGBA per cell: one colour per merge group of two or more cells, transparent for cells kept
    alone and for dropped cells. Colours follow the group's first cell, so neighbouring groups differ."""
    import matplotlib

    a = assignment.long()
    rgba = np.zeros((a.numel(), 4))
    used = a[a >= 0]
    if used.numel() == 0:
        return rgba
    sizes = torch.bincount(used)
    palette = matplotlib.colormaps["tab20"].colors
    first = {}
    for cell, tok in enumerate(a.tolist()):
        if tok >= 0 and sizes[tok] > 1:
            first.setdefault(tok, len(first))
            rgba[cell, :3] = palette[(first[tok] * 7) % len(palette)]
            rgba[cell, 3] = 1.0
    return rgba


def group_borders(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool pixels where the label changes to the right or below: borders between groups."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def merge_panel(img: np.ndarray, assignment: torch.Tensor, grid: tuple[int, int], alpha: float = 0.6) -> np.ndarray:
    """The image under its merge groups' colours (``alpha``), with white borders around every group; cells that
    kept a token of their own stay as they are."""
    size = img.shape[:2]
    rgba = group_colours(assignment)
    colour = np.stack([upsample_cells(torch.from_numpy(rgba[:, c]), grid, size) for c in range(4)], axis=-1)
    a = alpha * colour[..., 3:]
    shown = img * (1 - a) + colour[..., :3] * a
    lone = rgba[:, 3] == 0  # kept alone or dropped: one shared label, so no borders between such cells
    labels = upsample_cells(torch.where(torch.from_numpy(lone), -1, assignment.long()).float(), grid, size)
    shown[group_borders(labels)] = 1.0
    return shown.clip(0, 1)


def merge_caption(assignment: torch.Tensor, clusters: int | None = None) -> str:
    """``"T tokens for N cells, G groups of 2+ (largest L cells)"``; for a soft clustering of ``clusters`` clusters,
    ``"C clusters for N cells (U nearest to a cell), ..."``."""
    used = assignment[assignment >= 0]
    sizes = torch.bincount(used)
    sizes = sizes[sizes > 0]
    groups = int((sizes > 1).sum())
    head = (f"{sizes.numel()} tokens for {assignment.numel()} cells" if clusters is None else
            f"{clusters} clusters for {assignment.numel()} cells ({sizes.numel()} nearest to a cell)")
    return f"{head}, {groups} groups of 2+ (largest {int(sizes.max())} cells)"


def prediction_caption(label: str, pred: str, right: bool) -> tuple[str, str]:
    """``(caption, colour)``: the prediction marked right (green) or wrong (red, with the true label)."""
    if right:
        return f"pred {pred}: right", RIGHT
    return f"pred {pred}: wrong (label {label})", WRONG


# -- the figure ---------------------------------------------------------------------------------------------

def show(req, out: Path, n: int = 4) -> Path:
    from lwbench.diagnostics import has_objects, object_mask, recall
    from lwbench.task import denormalize

    plt = pyplot()
    plan, model = _trained_model(req)
    ds = plan.task.dataset("test")
    idx = list(range(min(n, len(ds))))
    images = torch.stack([ds[i][0] for i in idx])
    with torch.inference_mode():
        tok = model.encoder(images)
        logits = model(images)
    refuse_output(plan.method.name, tok)
    kind = spatial_content(tok)
    names = getattr(plan.task, "class_names", ()) or ()
    smap = selection_map(tok) if kind == "selection" else None
    cols = 2 if kind == "merging" else (3 if smap is not None else 2)
    grid = tuple(tok.grid)
    objects = has_objects(plan.task) and grid == tuple(s // plan.spec.patch for s in plan.task.img_size)
    ih, iw = images.shape[-2:]
    panel = 3.4  # inches per image panel; rows get the image's aspect plus room for a title
    legend = ("colour = one cluster (the cluster each cell is nearest to; the blocks after the clustering run on "
              "the clusters, and every cell's output is rebuilt as a mixture of nearby clusters), uncoloured = a "
              "cluster of one cell"
              if kind == "merging" and tok.assignment is None else
              "colour = one merge group (cells whose tokens were merged into one; a group need not be connected), "
              "uncoloured = a token of its own"
              if kind == "merging" else "yellow outline = patches processed, darkened = never seen by the backbone"
              + (", dashed cyan = annotated object" if objects else ""))
    width = panel * cols + (0.6 if smap is not None else 0)
    import textwrap

    legend = textwrap.fill(legend, int(width * 11))
    head = 0.22 * (2 + legend.count("\n")) + 0.15
    fig, axes = plt.subplots(len(idx), cols, figsize=(width, len(idx) * (panel * ih / iw + 0.45) + head),
                             squeeze=False)
    lab = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
    for r, i in enumerate(idx):
        img = denormalize(images[r]).permute(1, 2, 0).numpy()
        size = img.shape[:2]
        axes[r][0].imshow(img)
        if plan.task.kind == "classification":
            y, pred = int(ds[i][1]), int(logits[r].argmax())
            caption, colour = prediction_caption(lab(y), lab(pred), pred == y)
            axes[r][0].set_title(caption, fontsize=9, color=colour)
        else:
            axes[r][0].set_title("image", fontsize=9)
        if kind == "merging":
            a = merge_groups(tok, r)
            if a is None:  # this image merged nothing (a budget that merges only some images)
                a = torch.arange(tok.num_cells)
            axes[r][1].imshow(merge_panel(img, a, grid))
            clusters = None if tok.assignment is not None else int(tok.realised_tokens()[r])
            axes[r][1].set_title(textwrap.fill(merge_caption(a, clusters), 56), fontsize=8)  # within the panel
        else:
            if smap is not None:
                im = axes[r][1].imshow(smap[0][r].reshape(grid).numpy(), cmap="magma")
                fig.colorbar(im, ax=axes[r][1], fraction=0.046, pad=0.03).set_label(smap[1], fontsize=8)
                axes[r][1].set_title("selection map", fontsize=9)
            keep = kept_mask(tok, r)
            keep_px = upsample_cells(keep, grid, size)
            ax = axes[r][-1]
            ax.imshow(dim_unprocessed(img, keep_px).clip(0, 1))
            outline(ax, keep, grid, size, colors=KEPT_EDGE, linewidths=1.2)
            title = f"{int(keep.sum())}/{tok.num_cells} patches processed"
            if objects:  # only the selection panel draws the objects
                cells = object_mask(plan.task, "test", i, grid, plan.spec.patch)
                if cells.any():
                    outline(ax, cells, grid, size, colors=OBJECT_EDGE, linewidths=1.2, linestyles="dashed")
                hit = recall(keep[None], cells[None])
                title += "" if torch.isnan(hit[0]) else f", object recall {float(hit[0]):.2f}"
            ax.set_title(title, fontsize=9)
        clear_ticks(axes[r])
    fig.suptitle(f"{plan.method.name} {plan.method.budget_str()} on {plan.task.name} "
                 f"({plan.task.source.upper()} source)\n{legend}", fontsize=10)
    warning = " ".join(w for w in (untrained_selector(plan, tok.aux.get("where_map")),
                                   plan.method.diagnostics.get("selection_warning")) if w)
    if warning:  # the distillation guard fired, or nothing trained the selector: say so where the reader looks
        import logging

        logging.getLogger("lwbench").warning("%s", warning)
        text = textwrap.fill("WARNING: " + warning, 100)
        fig.text(0.5, 0.01, text, ha="center", va="bottom", color="red", fontsize=9)
        reserved = (0.2 * (text.count("\n") + 1) + 0.1) / fig.get_figheight()  # inches of text -> figure share
        return save_figure(fig, out, rect=(0, reserved, 1, 1))
    return save_figure(fig, out)
