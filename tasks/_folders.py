"""Helpers for tasks whose images sit in class folders or come as lists of files (image_folder, imagenet, cub).

One place decides what counts as an image file and how a split folder is read, so every folder-based task sees
the same files in the same order (and a new task reuses them instead of copying them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lwbench.errors import ConfigError, DataError
from lwbench.task import Task
from lwbench.tasks._imageio import read_image

IMAGE_EXTS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})


def is_image(name: str) -> bool:
    """Whether a file name has one of the image extensions lwbench reads (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def subdirs(path: Path) -> list[str]:
    """Names of the visible folders directly inside ``path`` (unsorted); ``[]`` when it is not a folder."""
    if not path.is_dir():
        return []
    with os.scandir(path) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]


def image_names(folder: Path) -> list[str]:
    """Sorted names of the image files directly inside ``folder``."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and is_image(e.name))


def count_images(folder: Path) -> int:
    """How many image files sit directly inside ``folder`` (loose files where class folders belong)."""
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.is_file() and is_image(e.name))


def has_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image file directly; stops at the first one (cheap on ImageNet-sized folders)."""
    with os.scandir(folder) as it:
        return any(e.is_file() and is_image(e.name) for e in it)


def scan_class_folders(base: Path, class_index: dict[str, int],
                       unknown: Callable[[Path], str]) -> list[tuple[Path, int]]:
    """``(path, label)`` of every image in ``base/<class>/``, classes and files in sorted order. A class folder not
    in ``class_index`` is a :class:`DataError` with the message ``unknown(its path)``."""
    samples: list[tuple[Path, int]] = []
    for cls in sorted(subdirs(base)):
        if cls not in class_index:
            raise DataError(unknown(base / cls))
        samples.extend((base / cls / n, class_index[cls]) for n in image_names(base / cls))
    return samples


class ImageListDataset(Dataset):
    """``(path, label)`` pairs read with the shared reader (a bad file is a DataError naming it) + a transform."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Any):
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
    """Refuse a split the task does not have, in one line naming the ones it has."""
    if split not in allowed:
        raise ConfigError(f"task '{task.name}' has splits {', '.join(allowed)}, not '{split}'")


__all__ = ["IMAGE_EXTS", "ImageListDataset", "check_split", "count_images", "has_image", "image_names", "is_image",
           "scan_class_folders", "subdirs"]
