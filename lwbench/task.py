"""The Task interface: datasets per split and source, the metric, and how to evaluate.

Every task has a *real* source (the public dataset in its usual on-disk layout under
``--data-root``) and, where the task allows, a *synthetic* source generated in-tree and
deterministic from a seed. ``source='auto'`` takes the real data when its layout is found and
otherwise the synthetic source, with a visible notice; the source used is recorded in every row.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from lwbench.errors import ConfigError, DataNotFoundError
from lwbench.sizes import as_hw

log = logging.getLogger("lwbench")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: (task, data root) pairs whose "no real data found" notice this process has printed.
_SYNTHETIC_NOTICES: set[tuple[str, str]] = set()


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
        self.img_size = as_hw(img_size)
        self.seed = seed
        self.opts = self.resolve_options(opts)
        self.source = self._resolve_source(source)

    # -- to override ---------------------------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def resolve_options(cls, opts: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``opts``: unknown keys fail naming the closest, a value takes its default's
        type (``task.n_balls=3`` is the int 3, ``[2, 4]`` a list of ints)."""
        from lwbench.options import close_key, coerce

        defaults = cls.option_defaults()
        out = dict(defaults)
        for key, value in opts.items():
            if key not in defaults:
                raise ConfigError(f"task '{cls.name}' has no option '{key}'{close_key(key, sorted(defaults))} "
                                  f"(known: {', '.join(sorted(defaults)) or 'none'})")
            default = defaults[key]
            if isinstance(default, (bool, int, float, str)) and not isinstance(value, (list, tuple, dict)):
                hint = (int | float) if type(default) is int else type(default)  # an int default may take a fraction
                value = coerce(value, hint, f"task.{key}")
            elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)) and default:
                elem = float if any(isinstance(v, float) for v in default) else type(default[0])
                value = [coerce(v, elem, f"task.{key}[{i}]") for i, v in enumerate(value)]
            out[key] = value
        return out

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

    def make_head(self, dim: int, pool: str = "token", decoder: str = "linear") -> torch.nn.Module:
        """The task head every method of this task shares: a linear classifier on pooled tokens (``pool``:
        ``head.pool``); segmentation tasks return their decoder (``head.decoder``)."""
        from lwbench.errors import ConfigError
        from lwbench.heads import ClassifierHead, check_decoder

        check_decoder(self.kind, decoder, self.name)
        if decoder != "linear":
            raise ConfigError(f"task {self.name} builds no head.decoder={decoder}; use head.decoder=linear")

        return ClassifierHead(dim, self.num_classes, pool)

    def objects(self, split: str, index: int) -> list[dict] | None:
        """Annotated objects of item ``index`` (``[{"box": (x0, y0, x1, y1), "label": int}, ...]`` in pixels of
        ``img_size``), or None when the task (or this source) annotates none. Used by the quick teacher's
        object losses and the rows' ``object_recall``."""
        return None

    def data_identity(self) -> dict[str, Any]:
        """What identifies the data this task reads, for the run and teacher ids: for real data the resolved
        root and :func:`folder_fingerprint` of the whole tree (a different folder, an added, removed or rewritten
        file changes it); synthetic data is identified by the task config. Memoised: the walk costs seconds on
        ImageNet, and a plan asks twice (run id and teacher id)."""
        if self.source != "real":
            return {"source": self.source}
        memo = self.__dict__.get("_data_identity")
        if memo is None:
            root = self.real_root()
            memo = self._data_identity = {"source": "real", "root": str(Path(root).resolve()),
                                          "fingerprint": folder_fingerprint(Path(root))}
        return dict(memo)

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
        said = (self.name, str(root))
        if said not in _SYNTHETIC_NOTICES:  # once per process: a sweep or compare plans a task many times
            _SYNTHETIC_NOTICES.add(said)
            log.info("notice: task '%s': no real data found%s; using the SYNTHETIC source", self.name,
                     f" under {root}" if root else " (no --data-root)")
        return "synthetic"

    def loader(self, split: str, batch_size: int, train: bool = False, num_workers: int = 0,
               limit: int | None = None, pin_memory: bool = False) -> DataLoader:
        """Batches of ``split``; with ``limit``, of the seeded random subset :func:`limited_indices` draws (sorted):
        datasets are often sorted by class, so the first ``limit`` items could all be one class. ``pin_memory``:
        page-locked batches, for a CUDA device (:func:`lwbench.training.loop.pin_memory_for`)."""
        ds = self.dataset(split, train=train)
        if limit is not None and limit < len(ds):
            ds = torch.utils.data.Subset(ds, limited_indices(len(ds), limit, self.seed))
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) > batch_size,
                          num_workers=num_workers, generator=gen, persistent_workers=num_workers > 0,
                          pin_memory=pin_memory)

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, device: str = "cpu",
                 progress=None) -> dict[str, Any]:
        """Top-1 (and top-5 when there are more than 5 classes) over the whole loader, and ``per_image``:
        ``{metric: (N,) uint8}`` hits in loader order, for bootstrap intervals and paired comparisons
        (:mod:`lwbench.stats`)."""
        import numpy as np

        model.eval()
        hits1, hits5 = [], []
        for images, targets in loader:
            logits = model(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits1.append((top[:, 0] == targets).cpu())
            hits5.append((top == targets[:, None]).any(1).cpu())
            if progress is not None:
                progress(images.shape[0])
        h1 = torch.cat(hits1).numpy().astype(np.uint8) if hits1 else np.zeros(0, np.uint8)
        h5 = torch.cat(hits5).numpy().astype(np.uint8) if hits5 else np.zeros(0, np.uint8)
        total = len(h1)
        out = {"top1": 100.0 * float(h1.sum()) / max(total, 1), "n_eval": total, "per_image": {"top1": h1}}
        if self.num_classes > 5:
            out["top5"] = 100.0 * float(h5.sum()) / max(total, 1)
            out["per_image"]["top5"] = h5
        return out


#: The random stream of :func:`limited_indices` (apart from every other use of the seed).
_SUBSET_STREAM = 0x5EB5E7


def limited_indices(n: int, limit: int, seed: int) -> list[int]:
    """``limit`` of the indices ``0 .. n-1``, drawn at random from ``seed`` alone and sorted: a limited evaluation
    (``eval.limit``) reads these, so every method of a seed evaluates the same images (paired comparisons stay
    paired) and a smaller limit's images are among a larger one's (the first ``limit`` of one permutation)."""
    import numpy as np

    if limit >= n:
        return list(range(n))
    order = np.random.default_rng([int(seed) % 2**63, _SUBSET_STREAM]).permutation(n)[:limit]
    return sorted(int(i) for i in order)


def dataset_indices(ds: Dataset) -> list[int]:
    """The indices of the underlying dataset that ``ds`` (a :class:`~torch.utils.data.Subset` from
    :meth:`Task.loader`, or the whole dataset) reads, in order."""
    if isinstance(ds, torch.utils.data.Subset):
        return [int(i) for i in ds.indices]
    return list(range(len(ds)))


#: At most this many files' bytes enter a fingerprint (spread evenly over the sorted file list) ...
_SAMPLE_FILES = 256
#: ... and of each, its first and last this many bytes (an ImageNet JPEG averages ~110 KB: nearly all of it).
_SAMPLE_BYTES = 64 * 1024


def folder_fingerprint(root: Path) -> str:
    """sha1 over every file under ``root`` (relative path, size, mtime_ns; any depth, symlinks followed, a
    symlink loop cut) plus the bytes of an even sample of the files, so that data rewritten in place is other
    data: a re-encoded or edited image changes its size or mtime, and an edit that restores both is still caught
    when it hits a sampled file (every file, for a tree of up to ``_SAMPLE_FILES`` files). Folder mtimes are left
    out: the entries below a folder already say what it holds.

    Cost, measured 2026-12-06 on a 2-core VM (ext4 on a virtio disk, page cache warm, other jobs running): a
    synthetic ImageNet-layout tree of 100,000 small files (``train/<1000 wnids>/`` x 90 + ``val/<wnid>/`` x 10)
    takes 0.53 s (a bare ``scandir`` + ``stat`` walk: 0.42 s; the old two-level walk: 0.03 s), so ImageNet's
    1.33M train + val files take ~7 s warm; the sample (256 files of 110 KB) adds under 0.15 s. Cold, the walk
    waits on one inode read per file: not measured (dropping the page cache needs root), and much slower on a
    spinning disk or a network file system. :meth:`Task.data_identity` memoises it per task, so each planned run
    (each point of a sweep too) pays it once."""
    root = os.fspath(root)
    h = hashlib.sha1()
    picks: list[str] = []  # the files at index % stride == 0, in walk order: an even sample, O(_SAMPLE_FILES) memory
    stride = 1
    n_files = 0
    ancestors: set[tuple[int, int]] = set()

    def scan(folder: str, rel: str) -> None:
        nonlocal stride, n_files, picks
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        here = (st.st_dev, st.st_ino)
        if here in ancestors:  # a symlink back up the tree
            h.update(os.fsencode(rel) + b"\0loop\0")
            return
        ancestors.add(here)
        for e in entries:
            path = rel + e.name
            try:
                if e.is_dir():
                    h.update(os.fsencode(path) + b"/\0")
                    scan(e.path, path + "/")
                    continue
                st = e.stat() if e.is_file() else None
            except OSError:
                st = None
            if st is None:  # a broken link, a socket ...: its name only
                h.update(os.fsencode(path) + b"\0?\0")
                continue
            h.update(os.fsencode(path) + f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if n_files % stride == 0:
                picks.append(path)
                if len(picks) > _SAMPLE_FILES:
                    picks, stride = picks[::2], stride * 2
            n_files += 1
        ancestors.discard(here)

    scan(root, "")
    for path in picks:
        h.update(os.fsencode(path) + b"\0")
        try:
            with open(os.path.join(root, path), "rb") as f:
                h.update(f.read(_SAMPLE_BYTES))
                size = os.fstat(f.fileno()).st_size
                if size > _SAMPLE_BYTES:
                    f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
                    h.update(f.read(_SAMPLE_BYTES))
        except OSError:
            h.update(b"\0unreadable\0")  # the run itself names the file if it needs it
    return h.hexdigest()[:16]


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
