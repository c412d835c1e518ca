"""Tiny real-format datasets, written in the exact on-disk layouts the real-data tasks read.

Real JPEG/PNG files (PIL), the released index files, 1-based ids: a loader that passes on these reads
the real datasets. Images have mixed sizes and aspect ratios so the transforms are exercised, and a
class-specific colour so labels are visible by eye when a fixture is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_SIZES = ((60, 80), (96, 64), (72, 72), (50, 90))  # (H, W)


def _rgb(rng: np.random.Generator, h: int, w: int, colour: tuple[int, int, int]) -> Image.Image:
    noise = rng.integers(-40, 41, size=(h, w, 3))
    arr = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _colour(c: int) -> tuple[int, int, int]:
    return ((60 * c + 40) % 256, (110 * c + 90) % 256, (170 * c + 20) % 256)


def make_imagenet(root: str | Path, classes: int = 3, per_class: int = 4, val_per_class: int = 2,
                  seed: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` with ImageNet-style wnids and names."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 37 * c:08d}" for c in range(classes)]
    counter = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                counter += 1
                h, w = _SIZES[(c + i) % len(_SIZES)]
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{counter:08d}.JPEG"
                _rgb(rng, h, w, _colour(c)).save(root / split / wnid / name, "JPEG", quality=90)
    return root


def make_cub(root: str | Path, classes: int = 3, per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> Path:
    """The CUB_200_2011 tarball layout: images/<NNN.Name>/*.jpg plus the four 1-based index files.

    Of each class's ``per_class`` images the last ``test_per_class`` are test (is_training_image = 0)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, split, labels, names = [], [], [], []
    img_id = 0
    for c in range(classes):
        cls_dir = f"{c + 1:03d}.Bird_{c + 1}"
        names.append(f"{c + 1} {cls_dir}")
        (root / "images" / cls_dir).mkdir(exist_ok=True)
        for i in range(per_class):
            img_id += 1
            rel = f"{cls_dir}/Bird_{c + 1}_{img_id:04d}_{i}.jpg"
            h, w = _SIZES[(c + i) % len(_SIZES)]
            _rgb(rng, h, w, _colour(c)).save(root / "images" / rel, "JPEG", quality=90)
            images.append(f"{img_id} {rel}")
            split.append(f"{img_id} {0 if i >= per_class - test_per_class else 1}")
            labels.append(f"{img_id} {c + 1}")
    for fname, lines in (("images.txt", images), ("train_test_split.txt", split),
                         ("image_class_labels.txt", labels), ("classes.txt", names)):
        (root / fname).write_text("\n".join(lines) + "\n")
    return root


def make_ade20k(root: str | Path, train: int = 3, val: int = 2, seed: int = 0,
                classes: tuple[int, ...] = (0, 1, 2, 5, 150)) -> Path:
    """ADEChallengeData2016: images/{training,validation}/ADE_*.jpg, annotations/.../ADE_*.png (mode L).

    Each label map is a few vertical bands of raw ADE ids drawn from ``classes`` (0 = other); the image
    is coloured by band, so the two stay aligned."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub, count, tag in (("training", train, "train"), ("validation", val, "val")):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = _SIZES[i % len(_SIZES)]
            bands = rng.choice(classes, size=4)
            cols = np.minimum(np.arange(w) * 4 // w, 3)
            lab = bands[cols][None, :].repeat(h, 0).astype(np.uint8)
            rgb = np.stack([(lab.astype(np.int64) * 37 + k * 60) % 256 for k in range(3)], -1).astype(np.uint8)
            stem = f"ADE_{tag}_{i + 1:08d}"
            Image.fromarray(rgb, "RGB").save(root / "images" / sub / f"{stem}.jpg", "JPEG", quality=90)
            Image.fromarray(lab, "L").save(root / "annotations" / sub / f"{stem}.png")
    return root
