"""A small classification folder cut from the real photos in ``../shared/real/photos``, and what a fine-tuning
recipe does to real pretrained features.

    python benchmarks/real_photos.py folder OUT            # OUT/train/<photo>/*.png, OUT/val/<photo>/*.png
    python benchmarks/real_photos.py drift --weights W     # CLS cosine to the loaded model after N steps, per recipe

The folder: one class per photo (astronaut, chelsea, coffee, rocket), square crops of 25-40% of the short side.
Training crops come from the left 60% of each photo, validation crops from the right 40%, so no validation pixel
was seen in training. It is a real-photo smoke task for lwbench's own-images path (``--task image_folder``), not a
benchmark: four photos make four textures, and a number on it says the path works, not which method is better.

``drift`` fine-tunes the real DINOv2-architecture ViT-S/14 (``../shared/real``) as the teacher stage does and
prints, for each recipe, the mean cosine between the CLS features of the four whole photos before and after, and
the validation top-1 of the folder. It is what the quick profile's ``pretrained_recipe`` was chosen from.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "real"


def make_folder(out: Path, photos: Path = SHARED / "photos", train_per_class: int = 40, val_per_class: int = 16,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out = Path(out)
    for path in sorted(photos.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for split, count, (x_lo, x_hi) in (("train", train_per_class, (0.0, 0.6)),
                                           ("val", val_per_class, (0.6, 1.0))):
            folder = out / split / path.stem
            folder.mkdir(parents=True, exist_ok=True)
            left, right = int(x_lo * w), int(x_hi * w)
            for i in range(count):
                side = int(rng.uniform(0.25, 0.4) * min(h, w))
                side = min(side, right - left, h)
                x0 = int(rng.integers(left, right - side + 1))
                y0 = int(rng.integers(0, h - side + 1))
                crop = img.crop((x0, y0, x0 + side, y0 + side))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{path.stem}_{i:03d}.png")
    return out


RECIPES = {
    # name: --set overrides of the teacher stage (the quick profile's from-scratch recipe first)
    "scratch recipe (lr 1e-3, warm-up 50)": ["teacher.lr=1e-3", "teacher.warmup_steps=50", "teacher.probe_steps=0"],
    "lr 5e-5, warm-up 10": ["teacher.lr=5e-5", "teacher.warmup_steps=10", "teacher.probe_steps=0"],
    "probe 50 steps, then lr 5e-5, warm-up 10": ["teacher.lr=5e-5", "teacher.warmup_steps=10",
                                                 "teacher.probe_steps=50"],
    "probe 50 steps, then lr 2e-5, warm-up 10": ["teacher.lr=2e-5", "teacher.warmup_steps=10",
                                                 "teacher.probe_steps=50"],
    "probe only (teacher.steps=0, 50 steps)": ["teacher.steps=0", "teacher.probe_steps=50"],
}


def drift(weights: Path, steps: int, img: int, batch: int) -> None:
    import torch
    import torch.nn.functional as F
    from tabulate import tabulate

    from lwbench.backbones import create_backbone
    from lwbench.config import resolve_config
    from lwbench.runner import Plan, build_teacher
    from lwbench.tasks._imageio import read_image

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="lwbench-photos-"))
    folder = make_folder(tmp / "photos")
    name = "vit_small_patch14_dinov2"
    loaded = create_backbone(name, img, weights=weights).eval()
    from lwbench.registry import get_task

    task = get_task("image_folder")(source="real", data_root=folder, img_size=img)
    tf = task.transform(train=False)
    photos = torch.stack([tf(read_image(p)) for p in sorted((SHARED / "photos").iterdir())])
    with torch.no_grad():
        ref = loaded.forward_features(photos)[:, 0]
    rows = []
    for label, sets in RECIPES.items():
        sets = [f"teacher.steps={steps}", f"teacher.batch_size={batch}", *sets]
        cfg = resolve_config("full", "image_folder", sets=sets + ["head.pool=token"], backbone=name,
                             weights=str(weights), data_root=str(folder), img_size=(img, img), quiet=True)
        model, seconds, _ = build_teacher(Plan(cfg))
        with torch.no_grad():
            cos = F.cosine_similarity(model.encoder.vit.forward_features(photos)[:, 0], ref).mean().item()
            hits = [int(model(x[None]).argmax(1).item() == y) for x, y in task.dataset("val")]
        rows.append([label, cfg.teacher.steps, cfg.teacher.probe_steps, f"{cos:.3f}",
                     f"{100 * sum(hits) / len(hits):.1f}", f"{seconds:.0f}"])
        print(rows[-1], flush=True)
    print(tabulate(rows, headers=["recipe", "steps", "probe", "CLS cosine to loaded", "val top-1 %", "s"],
                   tablefmt="github"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("folder")
    f.add_argument("out", type=Path)
    d = sub.add_parser("drift")
    d.add_argument("--weights", type=Path, default=SHARED / "vit_small_patch14_dinov2.imgfocus.safetensors")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--img", type=int, default=112)
    d.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if args.cmd == "folder":
        print(make_folder(args.out))
    else:
        drift(args.weights, args.steps, args.img, args.batch)


if __name__ == "__main__":
    main()
