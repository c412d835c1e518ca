"""CLS cosine to the unreduced model for every training-free reduction, on the real ViT-S/14 (DINOv2
architecture) checkpoint in ``../shared/real`` and its photos, at two budgets each (off the shelf, no training).

    python benchmarks/real_cls_cosine.py [--size 224] [--out benchmarks/results/real_cls_cosine.md]

Random weights cannot tell a good reduction from a broken one (every token looks alike); a real checkpoint can.
The budgets are matched by the tokens left after the last block (about 1/2 and 1/4 of the patches), so rows at one
budget are comparable. Mean and min over the photos of cos(CLS_method, CLS_full) of the final-normed CLS token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
WEIGHTS = REAL / "vit_small_patch14_dinov2.imgfocus.safetensors"
NAME = "vit_small_patch14_dinov2"


def photos(hw):
    from lwbench.registry import get_task
    from lwbench.tasks._imageio import read_image

    cls = get_task("image_folder")
    task = cls.__new__(cls)  # only its eval transform
    task.img_size, task.opts = hw, {"resize": "crop", "crop_pct": 1.0, "interpolation": "bicubic", "augment": False}
    tf = task.transform(train=False)
    return torch.stack([tf(read_image(p)) for p in sorted((REAL / "photos").iterdir())])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default="benchmarks/results/real_cls_cosine.md")
    args = p.parse_args()
    from lwbench.backbones import create_backbone
    from lwbench.method import BackboneSpec
    from lwbench.registry import get_method

    torch.set_num_threads(2)
    hw = (args.size, args.size)
    vit = create_backbone(NAME, hw, weights=WEIGHTS).eval()
    spec = BackboneSpec.of(vit, NAME, hw)
    x = photos(hw)
    n = spec.num_patches
    with torch.no_grad():
        ref = vit.forward_features(x)[:, 0]
    # budgets removing about half and three quarters of the patches by the last block
    half, quarter = round(0.5 * n / spec.depth), round(0.75 * n / spec.depth)
    fusing = spec.depth - 1  # mctf fuses in every block but the first
    pitome_v1 = {"margin": 0.5, "margin_schedule": "constant", "bsm_blocks": "none", "prop_attn": True}
    points = [("tome", b, {}, "") for b in (half, quarter)]
    points += [("pitome", b, {}, "") for b in (half, quarter)]  # the official wrappers' settings (version 2)
    points += [("pitome", b, {"prop_attn": True}, " + prop_attn") for b in (half, quarter)]
    points += [("pitome", b, pitome_v1, " v1 settings") for b in (half, quarter)]
    points += [("mctf", b, {}, "") for b in (round(0.5 * n / fusing), round(0.75 * n / fusing))]
    points += [(m, b, {}, "") for m in ("evit", "topk", "ats", "repshift") for b in (0.8, 0.63)]
    rows = []
    for method, b, opts, suffix in points:
        m = get_method(method)(spec, b, **opts)
        enc = m.build(vit).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = enc(x)
        cos = F.cosine_similarity(out.prefix[:, 0], ref, dim=-1)
        left = out.aux["tokens_per_layer"][:, -1].float().mean().item() if "tokens_per_layer" in out.aux else \
            float(out.patches.shape[1])
        rows.append([method + suffix, m.budget_str(), f"{left:.0f} / {n}", f"{cos.mean():.4f}", f"{cos.min():.4f}",
                     f"{time.perf_counter() - t0:.1f}"])
    table = tabulate(rows, headers=["method", "budget", "patch tokens left", "CLS cos mean", "min", "s"],
                     tablefmt="github")
    text = (f"# CLS cosine to the unreduced model, real ViT-S/14 ({WEIGHTS.name}), {len(x)} real photos at "
            f"{hw[0]}x{hw[1]}\n\nOff the shelf, no training. Regenerate: `python benchmarks/real_cls_cosine.py`. "
            "`pitome` runs the official wrappers' settings (per-block margin 0.75 - 0.75 l/L, BSM in the first half "
            "of the blocks, no proportional attention); `+ prop_attn` adds ToMe's proportional attention; `v1 "
            "settings` is lwbench's earlier PiToMe (margin 0.5 in every block, no BSM, proportional attention).\n\n"
            f"{table}\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
