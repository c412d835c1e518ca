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
    n = out.num_cells
    mask = torch.zeros(n, dtype=torch.bool)
    if out.assignment is not None:
        mask |= out.assignment[i].cpu() >= 0
    pos = out.positions[i][out.valid()[i]].cpu()
    mask[pos.clamp(0, n - 1)] = True
    return mask


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


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write ``out`` (creating its folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
        axes[r][-1].set_title(f"{int(keep.sum())}/{gh * gw} patches processed", fontsize=9)
        clear_ticks(axes[r])
    fig.suptitle(f"{plan.method.name} {plan.method.budget_str()} on {plan.task.name} "
                 f"({plan.task.source.upper()} source)", fontsize=11)
    return save_figure(fig, out)
