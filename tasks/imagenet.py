"""ImageNet-1k classification from its usual class-folder layout (real data only).

The layout is the one torchvision's ``ImageFolder`` and timm's ``train.py`` read: ``train/<wnid>/*.JPEG``
and ``val/<wnid>/*.JPEG``. The raw ILSVRC val tarball is flat (50,000 files in ``val/``) and has to be
sorted into wnid folders first; that case gets its own error, since it is the usual first-run mistake.
ImageNet has no public test labels, so ``test`` reads ``val/`` as every ImageNet paper does.

It is an :class:`~lwbench.tasks.image_folder.ImageFolderTask` whose classes are the wnid folders of ``train/``
(the class names are the wnids), with ImageNet's own layout checks and messages and timm's fixed recipe.

Transforms are timm's (``timm.data.create_transform``) so numbers line up with timm's validation script:
eval = resize the shorter side to ``img / crop_pct`` then center-crop ``img``; train = RandomResizedCrop
+ horizontal flip (no colour jitter, no RandAugment: the benchmark compares token methods, not recipes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lwbench.errors import DataError, DataNotFoundError
from lwbench.registry import register_task
from lwbench.tasks._folders import count_images, subdirs
from lwbench.tasks.image_folder import ImageFolderTask


@register_task("imagenet")
class ImageNet(ImageFolderTask):
    description = "ImageNet-1k classification (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); top-1/top-5"
    num_classes = 1000  # the real set; an instance sets its own from the wnid folders in train/
    data_dir_name = "imagenet"
    expected_layout = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (val sorted into wnid folders)"
    class_folder = "<wnid>"

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        # timm's defaults for ViTs: crop_pct 0.875 (DeiT eval), bicubic interpolation. No resize / augment options:
        # ImageNet is always centre-cropped for evaluation and augmented for training, as timm's scripts do.
        return {"crop_pct": 0.875, "interpolation": "bicubic"}

    def check_folders(self, root: Path) -> None:
        """``train/<wnid>/`` and ``val/`` are there (a hint when the Kaggle layout is found instead), and ``val/`` is
        sorted into wnid folders: the raw ILSVRC val tarball is flat, the usual first-run mistake."""
        train, val = root / "train", root / "val"
        if not train.is_dir() or not val.is_dir() or not subdirs(train):
            hint = ""
            kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
            if kaggle.is_dir():
                hint = f" (found the Kaggle layout: point --data-root at {kaggle}, with val sorted into wnid folders)"
            raise DataNotFoundError(f"ImageNet not found under {root}: expected {self.expected_layout}; "
                                    f"pass --data-root DIR holding train/ and val/ (or DIR/imagenet/){hint}")
        flat = count_images(val)
        if flat:
            raise DataError(f"{val} holds {flat} image files directly; sort ImageNet's val images into "
                            f"val/<wnid>/ folders (e.g. with the ILSVRC valprep.sh script) before using it")

    def unknown_class(self, path: Path, folder: str) -> str:
        return (f"{path} is a class folder that train/ does not have; ImageNet's val/ and train/ must share the same "
                f"wnid folders")

    def split_folder(self, split: str) -> str:
        return "train" if split == "train" else "val"  # no public test labels: test = val
