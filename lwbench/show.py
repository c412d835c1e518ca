"""``lwbench show``: what a method looks at, on a few test images (LookWhere's Figure 3 for any method).

Columns: the image; the method's selection map when it has one (LookWhere's where-map, a scorer's
scores); the image with the patches the backbone actually processed kept and the rest greyed out.
The trained model comes from the same caches as ``lwbench run`` (training it if needed).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _trained_model(req):
    from lwbench.runner import Plan, fit_method

    plan = Plan(req)
    return plan, fit_method(plan)[0].to("cpu").eval()


def kept_mask(out, i: int) -> torch.Tensor:
    """``(H*W,)`` bool: grid cells whose own pixels reached the backbone for image ``i``."""
    return out.processed_cells()[i].cpu()


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
    """Lay out (inside ``rect`` of the figure, when given), write ``out`` (creating its folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def untrained_selector(plan, where) -> str:
    """A warning when the drawn selection map comes from a selector nothing trained (no pretraining stage ran and
    no selector weights were loaded): its map is then noise, whatever the figure seems to show."""
    if where is None or plan.effort()["pretrain_steps"] > 0 or getattr(plan.method.opts, "weights", None):
        return ""
    return (f"the {plan.method.name} selector drawn here is untrained (its pretraining has 0 steps and no "
            "method.weights were given): the selection map is noise.")


def show(req, out: Path, n: int = 4) -> Path:
    from lwbench.task import denormalize

    plt = pyplot()
    plan, model = _trained_model(req)
    ds = plan.task.dataset("test")
    idx = list(range(min(n, len(ds))))
    images = torch.stack([ds[i][0] for i in idx])
    with torch.inference_mode():
        tok = model.encoder(images)
        logits = model(images)
    names = getattr(plan.task, "class_names", ()) or ()
    where = tok.aux.get("where_map")
    cols = 3 if where is not None else 2
    fig, axes = plt.subplots(len(idx), cols, figsize=(3.2 * cols, 2.6 * len(idx)), squeeze=False)
    gh, gw = tok.grid
    from lwbench.diagnostics import has_objects, object_mask, recall

    objects = has_objects(plan.task) and tuple(tok.grid) == tuple(s // plan.spec.patch for s in plan.task.img_size)
    for r, i in enumerate(idx):
        img = denormalize(images[r]).permute(1, 2, 0).numpy()
        y = ds[i][1]
        pred = int(logits[r].argmax())
        lab = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        axes[r][0].imshow(img)
        axes[r][0].set_title(f"label {lab(int(y))}, pred {lab(pred)}" if plan.task.kind == "classification"
                             else "image", fontsize=9)
        if where is not None:
            axes[r][1].imshow(where[r].reshape(gh, gw).float().numpy(), cmap="magma")
            axes[r][1].set_title("selector map", fontsize=9)
        keep = kept_mask(tok, r).reshape(gh, gw).float()
        up = torch.nn.functional.interpolate(keep[None, None], size=img.shape[:2], mode="nearest")[0, 0].numpy()
        shown = img * (0.25 + 0.75 * up[..., None]) + 0.35 * (1 - up[..., None])
        axes[r][-1].imshow(shown.clip(0, 1))
        title = f"{int(keep.sum())}/{gh * gw} patches processed"
        if objects:
            cells = object_mask(plan.task, "test", i, (gh, gw), plan.spec.patch)
            hit = recall(keep.flatten().bool()[None], cells[None])
            title += "" if torch.isnan(hit[0]) else f", object recall {float(hit[0]):.2f}"
        axes[r][-1].set_title(title, fontsize=9)
        clear_ticks(axes[r])
    fig.suptitle(f"{plan.method.name} {plan.method.budget_str()} on {plan.task.name} "
                 f"({plan.task.source.upper()} source)", fontsize=11)
    warning = " ".join(w for w in (untrained_selector(plan, where), plan.method.diagnostics.get("selection_warning"))
                       if w)
    if warning:  # the distillation guard fired, or nothing trained the selector: say so where the reader looks
        import logging

        logging.getLogger("lwbench").warning("warning: %s", warning)
        import textwrap

        text = textwrap.fill("WARNING: " + warning, 100)
        fig.text(0.5, 0.01, text, ha="center", va="bottom", color="red", fontsize=9)
        reserved = (0.2 * (text.count("\n") + 1) + 0.1) / fig.get_figheight()  # inches of text -> figure share
        return save_figure(fig, out, rect=(0, reserved, 1, 1))
    return save_figure(fig, out)
