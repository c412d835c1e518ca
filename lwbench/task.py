"""The Task interface: datasets per split and source, the metric, and how to evaluate.

Every task has a *real* source (the public dataset in its usual on-disk layout under
``--data-root``) and, where the task allows, a *synthetic* source generated in-tree and
deterministic from a seed. ``source='auto'`` takes the real data when its layout is found and
otherwise the synthetic source, with a visible notice; the source used is recorded in every row.
"""

from __future__ import annotations

import abc
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from lwbench.errors import ConfigError, DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Task(abc.ABC):
    name: ClassVar[str] = "?"
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    kind: ClassVar[Literal["classification", "segmentation"]] = "classification"
    num_classes: ClassVar[int] = 0
    class_names: ClassVar[tuple[str, ...]] = ()
    metric: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("real", "synthetic")
    default_img_size: ClassVar[tuple[int, int]] = (224, 224)
    expected_layout: ClassVar[str] = ""  # shown when real data is missing
    data_dir_name: ClassVar[str] = ""  # subfolder of --data-root searched by default

    def __init__(
        self,
        source: str = "auto",
        data_root: str | Path | None = None,
        img_size: tuple[int, int] | int | None = None,
        seed: int = 0,
        **opts: Any,
    ) -> None:
        if source not in ("auto", *self.sources):
            raise ConfigError(f"task '{self.name}' has sources {', '.join(self.sources)} (or auto), not '{source}'")
        self.data_root = Path(data_root).expanduser() if data_root else None
        if img_size is None:
            img_size = self.default_img_size
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(v) for v in img_size)
        self.seed = seed
        unknown = set(opts) - set(self.option_defaults())
        if unknown:
            raise ConfigError(f"task '{self.name}' has no option(s) {sorted(unknown)}; known: "
                              f"{sorted(self.option_defaults())}")
        self.opts = {**self.option_defaults(), **opts}
        self.source = self._resolve_source(source)

    # -- to override ---------------------------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {}

    def real_root(self) -> Path | None:
        """Where the real dataset lives: ``--data-root`` itself or its ``data_dir_name`` subfolder."""
        if self.data_root is None:
            return None
        sub = self.data_root / self.data_dir_name if self.data_dir_name else None
        if sub is not None and sub.is_dir():
            return sub
        return self.data_root

    @abc.abstractmethod
    def check_layout(self, root: Path) -> None:
        """Raise :class:`DataNotFoundError` (naming the expected layout) unless the real data is at ``root``."""

    @abc.abstractmethod
    def dataset(self, split: str, train: bool = False) -> Dataset:
        """Split ``train`` / ``val`` / ``test`` of the resolved source. ``train=True`` adds augmentation.

        Items are ``(image, target)``: a normalised float tensor of ``img_size`` and a class index
        (classification) or a long label map (segmentation, ignore = 255)."""

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "task_version": self.version, "source": self.source,
                "img_size": f"{self.img_size[0]}x{self.img_size[1]}",
                **{f"task_{k}": v for k, v in sorted(self.opts.items())}}

    # -- shared ------------------------------------------------------------------------------------
    def _resolve_source(self, source: str) -> str:
        if source == "synthetic":
            return source
        root = self.real_root()
        if source == "real":
            if "real" not in self.sources:
                raise ConfigError(f"task '{self.name}' has no real source")
            if root is None:
                raise DataNotFoundError(
                    f"--source real needs --data-root DIR holding {self.name} laid out as: {self.expected_layout}")
            self.check_layout(root)
            return "real"
        # auto
        if "real" in self.sources and root is not None:
            try:
                self.check_layout(root)
                return "real"
            except DataNotFoundError:
                pass
        if "synthetic" not in self.sources:
            if root is None:
                raise DataNotFoundError(f"task '{self.name}' needs real data: pass --data-root DIR laid out as: "
                                        f"{self.expected_layout}")
            self.check_layout(root)
        print(f"lwbench: notice: task '{self.name}': no real data found"
              f"{' under ' + str(root) if root else ' (no --data-root)'}; using the SYNTHETIC source",
              file=sys.stderr)
        return "synthetic"

    def loader(self, split: str, batch_size: int, train: bool = False, num_workers: int = 0,
               limit: int | None = None) -> DataLoader:
        ds = self.dataset(split, train=train)
        if limit is not None and limit < len(ds):
            ds = torch.utils.data.Subset(ds, range(limit))
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) > batch_size,
                          num_workers=num_workers, generator=gen, persistent_workers=num_workers > 0)

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, device: str = "cpu",
                 progress=None) -> dict[str, float]:
        """Top-1 (and top-5 when there are more than 5 classes) over the whole loader."""
        model.eval()
        correct1 = correct5 = total = 0
        for images, targets in loader:
            logits = model(images.to(device))
            targets = targets.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == targets).sum().item()
            correct5 += (top == targets[:, None]).any(1).sum().item()
            total += targets.numel()
            if progress is not None:
                progress(images.shape[0])
        out = {"top1": 100.0 * correct1 / max(total, 1), "n_eval": total}
        if self.num_classes > 5:
            out["top5"] = 100.0 * correct5 / max(total, 1)
        return out


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8/float ``(3, H, W)`` in [0, 255] or [0, 1] -> ImageNet-normalised float."""
    if img.dtype == torch.uint8:
        img = img.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def denormalize(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1)
