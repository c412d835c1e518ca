"""CUB-200-2011 bird species from the released tarball layout (real data only).

The index files are 1-based and joined on the image id; a mismatch between them is how a partial
extraction or a hand-edited copy shows up, so every cross-file inconsistency is a :class:`DataError`
naming the file to fix instead of an off-by-one label set.

Fine-grained recognition needs the birds' small parts, hence the high-resolution protocol of the
fine-grained literature (NTS-Net, TransFG: ``Resize((600, 600))`` then a 448 crop, random for training
and central for evaluation). ``resize``/``crop`` fix the *field of view*; the output is the task's
``img_size``: at ``img_size == crop`` this is exactly resize 600x600 / crop 448, at other sizes the
image is resized to ``img * resize / crop`` so the crop covers the same fraction of the bird.

CUB has no validation split. By default (``val_every=0``) ``train`` is the whole official train split
(5,994 images) and ``test`` the official test split, as the papers reporting test accuracy do; ``val`` is
then unavailable. ``val_every=K`` holds out a deterministic, class-stratified slice as ``val`` (every K-th
training image of each class; 10: ~10%) and trains on the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms as T

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.registry import register_task
from lwbench.task import IMAGENET_MEAN, IMAGENET_STD, Task
from lwbench.tasks._folders import ImageListDataset, check_split

FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")


@register_task("cub")
class CUB(Task):
    description = "CUB-200-2011 birds, 200 species, high-res (resize 600 / crop 448); top-1"
    kind = "classification"
    num_classes = 200  # the real set; an instance sets its own from classes.txt
    metric = "top1"
    sources = ("real",)
    default_img_size = (448, 448)
    data_dir_name = "CUB_200_2011"
    expected_layout = ("<root>/images/<class_dir>/*.jpg with images.txt, train_test_split.txt, "
                       "image_class_labels.txt, classes.txt (the CUB_200_2011 tarball)")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"resize": 600, "crop": 448, "val_every": 0}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        resize, crop, every = (int(self.opts[k]) for k in ("resize", "crop", "val_every"))
        if crop <= 0 or resize < crop:
            raise ConfigError(f"cub needs 0 < crop <= resize, got resize={resize} crop={crop}")
        if every < 0 or every == 1:
            raise ConfigError(f"cub val_every must be 0 (no held-out val) or >= 2, not {every}")
        self.root = self.real_root()
        self._load()

    def check_layout(self, root: Path) -> None:
        if not (root / "images").is_dir() or not (root / "images.txt").is_file():
            raise DataNotFoundError(f"CUB-200-2011 not found under {root}: expected {self.expected_layout}; "
                                    f"pass --data-root DIR holding them (or DIR/CUB_200_2011/)")
        for name in FILES[1:]:
            if not (root / name).is_file():
                raise DataError(f"{root / name} is missing; CUB-200-2011 needs {', '.join(FILES)} beside images/ "
                                f"(re-extract CUB_200_2011.tgz)")

    # -- index files ---------------------------------------------------------------------------
    def _load(self) -> None:
        root = self.root
        paths = _read_index(root / "images.txt")
        is_train = _read_index(root / "train_test_split.txt")
        labels = _read_index(root / "image_class_labels.txt")
        classes = _read_index(root / "classes.txt")

        if sorted(classes) != list(range(1, len(classes) + 1)):
            raise DataError(f"{root / 'classes.txt'}: class ids must be 1..{len(classes)} without gaps")
        for name, table in (("train_test_split.txt", is_train), ("image_class_labels.txt", labels)):
            missing = sorted(set(paths) - set(table))
            if missing:
                raise DataError(f"{root / name}: no entry for image id {missing[0]} of images.txt "
                                f"({len(missing)} ids missing)")
            extra = sorted(set(table) - set(paths))
            if extra:
                raise DataError(f"{root / name}: image id {extra[0]} is not in images.txt ({len(extra)} such ids)")

        self.classes = tuple(classes[c] for c in range(1, len(classes) + 1))
        self.class_names = self.classes
        self.num_classes = len(self.classes)
        train: dict[int, list[tuple[Path, int]]] = {}
        test: list[tuple[Path, int]] = []
        for img_id in sorted(paths):
            cls_txt, split_txt = labels[img_id], is_train[img_id]
            if not cls_txt.isdigit() or int(cls_txt) not in classes:
                raise DataError(f"{root / 'image_class_labels.txt'}: image id {img_id} has class '{cls_txt}', "
                                f"not one of the {len(classes)} ids in classes.txt")
            if split_txt not in ("0", "1"):
                raise DataError(f"{root / 'train_test_split.txt'}: image id {img_id} has '{split_txt}', expected 1 "
                                f"(train) or 0 (test)")
            path = root / "images" / paths[img_id]
            if not path.is_file():
                raise DataError(f"{path} (image id {img_id} in {root / 'images.txt'}) does not exist")
            label = int(cls_txt) - 1
            if split_txt == "1":
                train.setdefault(label, []).append((path, label))
            else:
                test.append((path, label))

        every = int(self.opts["val_every"])
        self._splits: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": test}
        for label in sorted(train):
            for i, sample in enumerate(train[label]):  # image-id order within the class
                held_out = every > 0 and i % every == 0
                self._splits["val" if held_out else "train"].append(sample)
        # keep one global image-id order inside each split (stable across runs and machines)
        order = {p: k for k, p in enumerate(root / "images" / paths[i] for i in sorted(paths))}
        for samples in self._splits.values():
            samples.sort(key=lambda s: order[s[0]])

    # -- data ------------------------------------------------------------------------------------
    def transform(self, train: bool):
        h, w = self.img_size
        scale = int(self.opts["resize"]) / int(self.opts["crop"])
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        # a square resize (aspect not kept), as the fine-grained codebases do: Resize((600, 600)).
        resize_t = T.Resize((round(h * scale), round(w * scale)), interpolation=T.InterpolationMode.BILINEAR)
        if train:
            return T.Compose([resize_t, T.RandomCrop((h, w)), T.RandomHorizontalFlip(), *norm])
        return T.Compose([resize_t, T.CenterCrop((h, w)), *norm])

    def dataset(self, split: str, train: bool = False) -> Dataset:
        check_split(self, split)
        if split == "val" and int(self.opts["val_every"]) == 0:
            raise ConfigError("cub with val_every=0 trains on the whole train split and has no val; "
                              "evaluate on test, or set val_every (e.g. 10: every 10th training image of each class)")
        return ImageListDataset(list(self._splits[split]), self.transform(train))


def _read_index(path: Path) -> dict[int, str]:
    """``<id> <value>`` per line, ids unique integers; anything else names the file and line."""
    if not path.is_file():
        raise DataError(f"{path} is missing; CUB-200-2011 needs {', '.join(FILES)} (re-extract CUB_200_2011.tgz)")
    out: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{path}:{lineno}: expected '<id> <value>', got '{line[:60]}'")
            key = int(parts[0])
            if key in out:
                raise DataError(f"{path}:{lineno}: id {key} appears twice")
            out[key] = parts[1].strip()
    return out
