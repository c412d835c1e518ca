"""Your own classification images, in torchvision's ``ImageFolder`` layout: the way to benchmark them.

Layout (the one ``torchvision.datasets.ImageFolder`` and timm's ``train.py`` read)::

    <root>/train/<class>/*.jpg|png|...     training images, one folder per class
    <root>/val/<class>/*                   held-out images: the test split unless <root>/test/ exists
    <root>/test/<class>/*                  optional

Any image size (``--img-size H W``; the default is 224x224) and every method. Transforms are timm's, as for
ImageNet: eval resizes then centre-crops (``task.resize=crop``, ``task.crop_pct``) or resizes to exactly HxW
(``task.resize=squash``, for frames whose borders matter); training adds RandomResizedCrop + flip
(``task.augment=false``: the eval transform). Classes are the sorted folder names of ``train/``; ``val/`` and
``test/`` may lack a class but not add one.

``lwbench run --task image_folder --data-root DIR --weights W.safetensors --backbone B --method M``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.registry import register_task
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD, Task
from lwbench.tasks.imagenet import ImageListDataset, _is_image, _subdirs, check_split


@register_task("image_folder")
class ImageFolderTask(Task):
    description = "your images: <root>/train/<class>/*, <root>/val/<class>/* (ImageFolder layout); top-1"
    kind = "classification"
    metric = "top1"
    sources = ("real",)
    default_img_size = (224, 224)
    data_dir_name = ""
    expected_layout = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (optionally <root>/test/<class>/*)"

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic", "augment": True}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.opts["resize"] not in ("crop", "squash"):
            raise ConfigError(f"image_folder resize must be crop or squash, not '{self.opts['resize']}'")
        if not 0.0 < float(self.opts["crop_pct"]) <= 1.0:
            raise ConfigError(f"image_folder crop_pct must be in (0, 1], not {self.opts['crop_pct']}")
        self.root = self.real_root()
        self.classes: tuple[str, ...] = tuple(sorted(_subdirs(self.root / "train")))
        self.class_names = self.classes
        self.num_classes = len(self.classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._samples: dict[str, list[tuple[Path, int]]] = {}

    def check_layout(self, root: Path) -> None:
        train, val = root / "train", root / "val"
        if not train.is_dir() or not val.is_dir():
            raise DataNotFoundError(f"no image folder under {root}: expected {self.expected_layout}; pass "
                                    f"--data-root DIR holding train/ and val/")
        classes = _subdirs(train)
        if len(classes) < 2:
            raise DataError(f"{train} has {len(classes)} class folder(s); a classification task needs at least 2 "
                            f"(train/<class>/*)")
        with os.scandir(train) as it:
            loose = sum(1 for e in it if e.is_file() and _is_image(e.name))
        if loose:
            raise DataError(f"{train} holds {loose} image files directly; put each image in train/<class>/")
        # An empty train/<class> would silently be a class (a logit no image trains; torchvision's ImageFolder
        # refuses it too). val/ and test/ may lack a class. One scandir per class, stopped at its first image.
        empty = [c for c in sorted(classes) if not _has_image(train / c)]
        if len(empty) == 1:
            raise DataError(f"{train / empty[0]} holds no images (*.jpg, *.png, ... directly inside it); put images "
                            f"in it or remove it")
        if empty:
            more = f", ... ({len(empty)} in all)" if len(empty) > 5 else ""
            raise DataError(f"{len(empty)} class folders of {train} hold no images (*.jpg, *.png, ... directly "
                            f"inside them): {', '.join(empty[:5])}{more}; put images in them or remove them")

    def _scan(self, folder: str) -> list[tuple[Path, int]]:
        if folder not in self._samples:
            base = self.root / folder
            samples: list[tuple[Path, int]] = []
            for cls in sorted(_subdirs(base)):
                if cls not in self._index:
                    raise DataError(f"{base / cls} is a class that train/ does not have; {folder}/ may only use "
                                    f"the classes of train/ ({', '.join(self.classes[:5])}...)")
                with os.scandir(base / cls) as it:
                    names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
                samples.extend((base / cls / n, self._index[cls]) for n in names)
            if not samples:
                raise DataError(f"no images found in {base}/<class>/; expected {self.expected_layout}")
            self._samples[folder] = samples
        return self._samples[folder]

    def transform(self, train: bool):
        from timm.data import create_transform
        from torchvision import transforms as T

        interp = self.opts["interpolation"]
        if train and self.opts["augment"]:
            return create_transform(self.img_size, is_training=True, interpolation=interp, color_jitter=None,
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if self.opts["resize"] == "squash":
            mode = T.InterpolationMode(interp)
            return T.Compose([T.Resize(self.img_size, interpolation=mode), T.ToTensor(),
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return create_transform(self.img_size, is_training=False, crop_pct=float(self.opts["crop_pct"]),
                                interpolation=interp, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def dataset(self, split: str, train: bool = False) -> Dataset:
        check_split(self, split)
        folder = split
        if split == "val" or (split == "test" and not (self.root / "test").is_dir()):
            folder = "val"
        return ImageListDataset(self._scan(folder), self.transform(train))


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_file() and _is_image(e.name) for e in it)
