"""ImageNet-1k classification from its usual class-folder layout (real data only).

The layout is the one torchvision's ``ImageFolder`` and timm's ``train.py`` read: ``train/<wnid>/*.JPEG``
and ``val/<wnid>/*.JPEG``. The raw ILSVRC val tarball is flat (50,000 files in ``val/``) and has to be
sorted into wnid folders first; that case gets its own error, since it is the usual first-run mistake.
ImageNet has no public test labels, so ``test`` reads ``val/`` as every ImageNet paper does.

Transforms are timm's (``timm.data.create_transform``) so numbers line up with timm's validation script:
eval = resize the shorter side to ``img / crop_pct`` then center-crop ``img``; train = RandomResizedCrop
+ horizontal flip (no colour jitter, no RandAugment: the benchmark compares token methods, not recipes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.registry import register_task
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD, Task
from lwbench.tasks._imageio import read_image

IMAGE_EXTS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


class ImageListDataset(Dataset):
    """``(path, label)`` pairs read with the shared reader (a bad file is a DataError naming it) + a transform."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(read_image(path)), label

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


def check_split(task: Task, split: str, allowed: tuple[str, ...] = ("train", "val", "test")) -> None:
    if split not in allowed:
        raise ConfigError(f"task '{task.name}' has splits {', '.join(allowed)}, not '{split}'")


@register_task("imagenet")
class ImageNet(Task):
    description = "ImageNet-1k classification (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); top-1/top-5"
    kind = "classification"
    num_classes = 1000  # the real set; an instance sets its own from the wnid folders in train/
    metric = "top1"
    sources = ("real",)
    default_img_size = (224, 224)
    data_dir_name = "imagenet"
    expected_layout = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (val sorted into wnid folders)"

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        # timm's defaults for ViTs: crop_pct 0.875 (DeiT eval), bicubic interpolation.
        return {"crop_pct": 0.875, "interpolation": "bicubic"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 < float(self.opts["crop_pct"]) <= 1.0:
            raise ConfigError(f"imagenet crop_pct must be in (0, 1], not {self.opts['crop_pct']}")
        self.root = self.real_root()
        self.classes: tuple[str, ...] = tuple(sorted(_subdirs(self.root / "train")))
        self.class_names = self.classes
        self.num_classes = len(self.classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._samples: dict[str, list[tuple[Path, int]]] = {}

    def check_layout(self, root: Path) -> None:
        train, val = root / "train", root / "val"
        if not train.is_dir() or not val.is_dir() or not _subdirs(train):
            hint = ""
            kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
            if kaggle.is_dir():
                hint = f" (found the Kaggle layout: point --data-root at {kaggle}, with val sorted into wnid folders)"
            raise DataNotFoundError(f"ImageNet not found under {root}: expected {self.expected_layout}; "
                                    f"pass --data-root DIR holding train/ and val/ (or DIR/imagenet/){hint}")
        with os.scandir(val) as it:
            flat = sum(1 for e in it if e.is_file() and _is_image(e.name))
        if flat:
            raise DataError(f"{val} holds {flat} image files directly; sort ImageNet's val images into "
                            f"val/<wnid>/ folders (e.g. with the ILSVRC valprep.sh script) before using it")

    def _scan(self, folder: str) -> list[tuple[Path, int]]:
        if folder not in self._samples:
            base = self.root / folder
            samples: list[tuple[Path, int]] = []
            for wnid in sorted(_subdirs(base)):
                if wnid not in self._class_index:
                    raise DataError(f"{base / wnid} is a class folder that train/ does not have; "
                                    f"ImageNet's val/ and train/ must share the same wnid folders")
                with os.scandir(base / wnid) as it:
                    names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
                samples.extend((base / wnid / n, self._class_index[wnid]) for n in names)
            if not samples:
                raise DataError(f"no images found in {base}/<wnid>/; expected {self.expected_layout}")
            self._samples[folder] = samples
        return self._samples[folder]

    def transform(self, train: bool):
        from timm.data import create_transform

        if train:
            return create_transform(self.img_size, is_training=True, interpolation=self.opts["interpolation"],
                                    color_jitter=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return create_transform(self.img_size, is_training=False, crop_pct=float(self.opts["crop_pct"]),
                                interpolation=self.opts["interpolation"], mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def dataset(self, split: str, train: bool = False) -> Dataset:
        check_split(self, split)
        folder = "train" if split == "train" else "val"  # no public test labels: test = val
        return ImageListDataset(self._scan(folder), self.transform(train))


def _subdirs(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    with os.scandir(path) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
