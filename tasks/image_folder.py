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

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.registry import register_task
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD, Task
from lwbench.tasks._folders import (
    ImageListDataset,
    check_split,
    count_images,
    has_image,
    scan_class_folders,
    subdirs,
)


@register_task("image_folder")
class ImageFolderTask(Task):
    """Classes are the folders of ``train/``; ``val/`` (and ``test/``) are read against them. A dataset in this
    layout with its own conventions (ImageNet: wnid folders, no test labels, timm's fixed recipe) subclasses it and
    overrides the hooks below: ``check_folders``, ``unknown_class``, ``split_folder``, ``option_defaults``."""

    description = "your images: <root>/train/<class>/*, <root>/val/<class>/* (ImageFolder layout); top-1"
    kind = "classification"
    metric = "top1"
    sources = ("real",)
    default_img_size = (224, 224)
    data_dir_name = ""
    expected_layout = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (optionally <root>/test/<class>/*)"
    class_folder: ClassVar[str] = "<class>"  # how messages name a class folder of the layout

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        # A subclass with a fixed recipe leaves ``resize`` / ``augment`` out (crop, augmented), so its stored
        # configs hold only the options it has.
        return {"resize": "crop", "crop_pct": 0.875, "interpolation": "bicubic", "augment": True}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.opts.get("resize", "crop") not in ("crop", "squash"):
            raise ConfigError(f"{self.name} resize must be crop or squash, not '{self.opts['resize']}'")
        if not 0.0 < float(self.opts["crop_pct"]) <= 1.0:
            raise ConfigError(f"{self.name} crop_pct must be in (0, 1], not {self.opts['crop_pct']}")
        self.root = self.real_root()
        self.classes: tuple[str, ...] = tuple(sorted(subdirs(self.root / "train")))
        self.class_names = self.classes
        self.num_classes = len(self.classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self._samples: dict[str, list[tuple[Path, int]]] = {}

    # -- layout ----------------------------------------------------------------------------------
    def check_layout(self, root: Path) -> None:
        self.check_folders(root)
        self.check_train_classes(root / "train")

    def check_folders(self, root: Path) -> None:
        """``train/`` and ``val/`` are there: a :class:`DataNotFoundError` naming the layout otherwise."""
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataNotFoundError(f"no image folder under {root}: expected {self.expected_layout}; pass "
                                    f"--data-root DIR holding train/ and val/")

    def check_train_classes(self, train: Path) -> None:
        """At least two class folders, no loose images beside them, and none of them empty: an empty
        ``train/<class>`` would silently be a class (a logit no image trains; torchvision's ImageFolder refuses it
        too). ``val/`` and ``test/`` may lack a class. One scandir per class, stopped at its first image."""
        classes = subdirs(train)
        if len(classes) < 2:
            raise DataError(f"{train} has {len(classes)} class folder(s); a classification task needs at least 2 "
                            f"(train/{self.class_folder}/*)")
        loose = count_images(train)
        if loose:
            raise DataError(f"{train} holds {loose} image files directly; put each image in "
                            f"train/{self.class_folder}/")
        empty = [c for c in sorted(classes) if not has_image(train / c)]
        if len(empty) == 1:
            raise DataError(f"{train / empty[0]} holds no images (*.jpg, *.png, ... directly inside it); put images "
                            f"in it or remove it")
        if empty:
            more = f", ... ({len(empty)} in all)" if len(empty) > 5 else ""
            raise DataError(f"{len(empty)} class folders of {train} hold no images (*.jpg, *.png, ... directly "
                            f"inside them): {', '.join(empty[:5])}{more}; put images in them or remove them")

    def unknown_class(self, path: Path, folder: str) -> str:
        """The message for a class folder of ``folder/`` that ``train/`` does not have."""
        return (f"{path} is a class that train/ does not have; {folder}/ may only use the classes of train/ "
                f"({', '.join(self.classes[:5])}...)")

    def split_folder(self, split: str) -> str:
        """The folder a split reads: ``test/`` when there is one, else the held-out ``val/``."""
        if split == "train":
            return "train"
        return "test" if split == "test" and (self.root / "test").is_dir() else "val"

    def samples(self, folder: str) -> list[tuple[Path, int]]:
        """``(path, label)`` of every image of ``folder/<class>/``, sorted; read once per task."""
        if folder not in self._samples:
            base = self.root / folder
            samples = scan_class_folders(base, self.class_index, lambda path: self.unknown_class(path, folder))
            if not samples:
                raise DataError(f"no images found in {base}/{self.class_folder}/; expected {self.expected_layout}")
            self._samples[folder] = samples
        return self._samples[folder]

    # -- data --------------------------------------------------------------------------------------
    def transform(self, train: bool):
        from timm.data import create_transform
        from torchvision import transforms as T

        interp = self.opts["interpolation"]
        if train and self.opts.get("augment", True):
            return create_transform(self.img_size, is_training=True, interpolation=interp, color_jitter=None,
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if self.opts.get("resize", "crop") == "squash":
            mode = T.InterpolationMode(interp)
            return T.Compose([T.Resize(self.img_size, interpolation=mode), T.ToTensor(),
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return create_transform(self.img_size, is_training=False, crop_pct=float(self.opts["crop_pct"]),
                                interpolation=interp, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def dataset(self, split: str, train: bool = False) -> Dataset:
        check_split(self, split)
        return ImageListDataset(self.samples(self.split_folder(split)), self.transform(train))
