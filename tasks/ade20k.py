"""ADE20K semantic segmentation (SceneParsing, 150 classes) from the ADEChallengeData2016 layout.

Labels: the PNGs hold 0 = "other" (not evaluated) and 1..150 for the classes; targets are 0..149 with
255 = ignore, mmseg's ``reduce_zero_label`` convention.

Protocol: the model sees a *whole* resize of the image (bilinear) to the profile's ``img_size`` (``paper``:
518x518 = 37x37 patches of 14, LookWhere's high-res size), and mIoU is computed at the annotation's
**original** resolution (the standard mmseg protocol): each image's logits are upsampled bilinearly to its
label map's own size (``label_resolution: original``, the default). ``label_resolution: resized`` compares
with the label map resized (nearest) to ``img_size`` instead, a cheaper variant whose numbers differ; the
option is in the run id and the evaluation returns which one was used. Training: random scale
(0.5-2.0 of the target size on the shorter side), pad, random crop to ``img_size`` and horizontal flip,
applied jointly to image and labels (mmseg's pipeline without cat_max_ratio and photometric jitter).

Decoder: ``linear`` (built in: BN + 1x1 conv per patch, upsampled) or ``uper`` (mmseg 1.2.2's UPerHead on a
ViTDet-style simple feature pyramid of the last layer's densified tokens, :mod:`lwbench.mmseg_compat`; needs
``pip install 'lwbench[seg]'``), chosen with ``head.decoder`` (or this task's older ``decoder`` option).

The metric is mmseg's ``IoUMetric``: intersection and union per class accumulated over the whole split
(not averaged per image), mIoU over the classes whose union is non-empty, plus pixel accuracy (aAcc)
and mean class accuracy (mAcc). ``test`` reads the validation split: the challenge test labels are
not public.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from lwbench import mmseg_compat
from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.heads import DECODERS
from lwbench.registry import register_task
from lwbench.task import Task, normalize
from lwbench.tasks._folders import check_split
from lwbench.tasks._imageio import read_image

IGNORE = 255
NUM_CLASSES = 150
SPLIT_DIRS = {"train": "training", "val": "validation", "test": "validation"}
MMSEG_DECODERS = ("uper",)  # decoders from mmsegmentation (lwbench[seg]); see lwbench/mmseg_compat.py


def mmseg_available() -> bool:
    """A supported mmseg / mmcv / mmengine combination is installed (nothing imported)."""
    return mmseg_compat.available()


# -- metric: pure functions ---------------------------------------------------------------------------
def update_confusion(conf: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, n: int,
                     ignore: int = IGNORE) -> torch.Tensor:
    """Add ``(pred, target)`` pixels into ``conf`` (n x n, rows = ground truth, columns = prediction), in place.

    Pixels labelled ``ignore`` are skipped whatever was predicted there, as mmseg does."""
    valid = target != ignore
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise DataError(f"segmentation target holds class {int(t.max())} outside 0..{n - 1} (ignore = {ignore})")
    conf += torch.bincount(t * n + p, minlength=n * n).view(n, n).to(conf)
    return conf


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy (aAcc) and mean class accuracy (mAcc), in percent, from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and prediction has an empty union
    and is left out of the mean (mmseg's nanmean); a class only predicted counts with IoU 0."""
    conf = conf.double()
    inter = conf.diag()
    gt = conf.sum(1)
    pred = conf.sum(0)
    union = gt + pred - inter
    nan = float("nan")
    has_union, has_gt = union > 0, gt > 0
    total = float(conf.sum())
    return {
        "miou": 100.0 * float((inter[has_union] / union[has_union]).mean()) if has_union.any() else nan,
        "pixel_acc": 100.0 * float(inter.sum()) / total if total > 0 else nan,
        "macc": 100.0 * float((inter[has_gt] / gt[has_gt]).mean()) if has_gt.any() else nan,
    }


# -- data ---------------------------------------------------------------------------------------------
def _read_label(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """Raw ADE20K label map (0 = other, 1..150) checked against its image; a bad file names itself."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im) if mode in ("L", "P", "I", "I;16") else None
            size = im.size
    except (OSError, ValueError, SyntaxError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read label map {path}: {reason}; re-extract or remove this file") from exc
    if arr is None:
        raise DataError(f"label map {path} is {mode}; ADE20K annotations are single-channel PNGs of class ids 0..150")
    if size != image_size:
        raise DataError(f"label map {path} is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]} "
                        "(W x H); annotation and image must have the same size")
    top = int(arr.max()) if arr.size else 0
    if top > NUM_CLASSES or int(arr.min()) < 0:
        raise DataError(f"label map {path} holds value {top}; ADE20K labels are 0 (other) and 1..{NUM_CLASSES}")
    return arr


def _to_target(raw: np.ndarray) -> torch.Tensor:
    """0 -> 255 (ignore), k -> k - 1. uint8 so that nearest resizing and padding stay cheap."""
    lab = torch.from_numpy(raw.astype(np.int64))
    return torch.where(lab == 0, IGNORE, lab - 1).to(torch.uint8)


class SegmentationDataset(Dataset):
    """``(image, label map)`` pairs -> ``(normalised (3, H, W) float, (H, W) long with 255 = ignore)``."""

    def __init__(self, pairs: list[tuple[Path, Path]], img_size: tuple[int, int], train: bool,
                 scale_range: tuple[float, float] = (0.5, 2.0)):
        self.pairs = pairs
        self.img_size = img_size
        self.train = train
        self.scale_range = scale_range

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_path, lab_path = self.pairs[i]
        pil = read_image(img_path)
        raw = _read_label(lab_path, pil.size)
        img = TF.pil_to_tensor(pil)  # (3, h, w) uint8
        lab = _to_target(raw)[None]  # (1, h, w) uint8
        img, lab = (self._train_pair if self.train else self._eval_pair)(img, lab)
        return normalize(img), lab[0].long()

    def _eval_pair(self, img: torch.Tensor, lab: torch.Tensor):
        size = list(self.img_size)
        img = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        lab = TF.resize(lab, size, interpolation=InterpolationMode.NEAREST)
        return img, lab

    def _train_pair(self, img: torch.Tensor, lab: torch.Tensor):
        h, w = self.img_size
        lo, hi = self.scale_range
        ratio = lo + (hi - lo) * float(torch.rand(()))
        short = min(img.shape[-2:])
        f = ratio * max(h, w) / short
        new = [max(1, round(img.shape[-2] * f)), max(1, round(img.shape[-1] * f))]
        img = TF.resize(img, new, interpolation=InterpolationMode.BILINEAR, antialias=True)
        lab = TF.resize(lab, new, interpolation=InterpolationMode.NEAREST)
        ph, pw = max(h - new[0], 0), max(w - new[1], 0)
        if ph or pw:  # image padded with black, labels with ignore (mmseg's Pad)
            img = F.pad(img, (0, pw, 0, ph), value=0)
            lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE)
        top = int(torch.randint(0, img.shape[-2] - h + 1, ()))
        left = int(torch.randint(0, img.shape[-1] - w + 1, ()))
        img, lab = img[:, top:top + h, left:left + w], lab[:, top:top + h, left:left + w]
        if float(torch.rand(())) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img, lab


def _label_paths(loader: DataLoader) -> list[Path]:
    """The label file of each item of ``loader`` in its (unshuffled) order, through a ``Subset`` (``eval.limit``)."""
    ds = loader.dataset
    indices = list(getattr(ds, "indices", range(len(ds))))
    base = getattr(ds, "dataset", ds)
    if not hasattr(base, "pairs"):
        raise ConfigError("ade20k: original-resolution evaluation needs a SegmentationDataset loader; "
                          "use task.label_resolution=resized")
    return [base.pairs[i][1] for i in indices]


@register_task("ade20k")
class ADE20K(Task):
    description = "ADE20K scene parsing, 150 classes (ADEChallengeData2016); mIoU"
    kind = "segmentation"
    num_classes = NUM_CLASSES
    metric = "miou"
    sources = ("real",)
    default_img_size = (518, 518)
    data_dir_name = "ADEChallengeData2016"
    expected_layout = ("<root>/images/{training,validation}/*.jpg and <root>/annotations/{training,validation}/*.png "
                       "(ADEChallengeData2016)")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {"decoder": "linear", "min_scale": 0.5, "max_scale": 2.0, "label_resolution": "original"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        decoder = str(self.opts["decoder"])
        if decoder not in DECODERS:
            raise ConfigError(f"ade20k decoder '{decoder}' is unknown; known: {', '.join(DECODERS)}")
        if decoder in MMSEG_DECODERS:
            mmseg_compat.check_versions()  # one line naming the supported versions, before any work
        if self.opts["label_resolution"] not in ("original", "resized"):
            raise ConfigError(f"ade20k label_resolution must be original or resized, not "
                              f"'{self.opts['label_resolution']}'")
        lo, hi = float(self.opts["min_scale"]), float(self.opts["max_scale"])
        if not 0 < lo <= hi:
            raise ConfigError(f"ade20k needs 0 < min_scale <= max_scale, got {lo} and {hi}")
        self.root = self.real_root()
        self._pairs: dict[str, list[tuple[Path, Path]]] = {}

    def check_layout(self, root: Path) -> None:
        dirs = [root / top / sub for top in ("images", "annotations") for sub in ("training", "validation")]
        if not all(d.is_dir() for d in dirs):
            raise DataNotFoundError(f"ADE20K not found under {root}: expected {self.expected_layout}; "
                                    f"pass --data-root DIR holding them (or DIR/ADEChallengeData2016/)")

    def decoder(self, head_decoder: str | None = None) -> str:
        """The decoder to build: ``head.decoder`` (the run's head section) when it is not the default ``linear``,
        else this task's ``decoder`` option (its older alias); both non-default and different is an error."""
        task_decoder = str(self.opts["decoder"])
        if head_decoder is None or head_decoder == "linear":
            return task_decoder
        if task_decoder != "linear" and task_decoder != head_decoder:
            raise ConfigError(f"head.decoder={head_decoder} and task.decoder={task_decoder} disagree; set one "
                              "(head.decoder is the current name)")
        return head_decoder

    def make_head(self, dim: int, pool: str = "token", decoder: str | None = None) -> torch.nn.Module:
        """The segmentation decoder (:meth:`decoder`): ``linear`` (built in) or ``uper`` (mmseg's UPerHead on a
        simple feature pyramid, lwbench[seg]); ``pool`` is for classifiers and unused here."""
        from lwbench.heads import make_seg_head

        return make_seg_head(dim, self.num_classes, self.decoder(decoder))

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        check_split(self, split)
        sub = SPLIT_DIRS[split]
        if sub not in self._pairs:
            img_dir, ann_dir = self.root / "images" / sub, self.root / "annotations" / sub
            with os.scandir(img_dir) as it:
                names = sorted(e.name for e in it if e.is_file() and e.name.lower().endswith((".jpg", ".jpeg")))
            if not names:
                raise DataError(f"no .jpg images in {img_dir}; expected {self.expected_layout}")
            pairs = []
            for name in names:
                ann = ann_dir / (os.path.splitext(name)[0] + ".png")
                if not ann.is_file():
                    raise DataError(f"{img_dir / name} has no annotation: {ann} is missing")
                pairs.append((img_dir / name, ann))
            self._pairs[sub] = pairs
        return self._pairs[sub]

    def dataset(self, split: str, train: bool = False) -> Dataset:
        scale = (float(self.opts["min_scale"]), float(self.opts["max_scale"]))
        return SegmentationDataset(self.pairs(split), self.img_size, train, scale)

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, device: str = "cpu",
                 progress=None) -> dict[str, Any]:
        """Whole-split confusion matrix -> mIoU / aAcc / mAcc (percent), at the label maps' original resolution
        (``label_resolution: original``) or at the loader's resized labels; ``per_image["miou"]``: ``(N, 2, C)``
        per-image intersection and union pixel counts (their sums give the whole-split mIoU; lwbench.stats
        resamples them). ``model`` returns (B, C, h, w) logits."""
        model.eval()
        n = self.num_classes
        conf = torch.zeros(n, n, dtype=torch.long, device=device)
        original = self.opts["label_resolution"] == "original"
        labels = _label_paths(loader) if original else None
        per_image = []
        seen = 0
        for images, targets in loader:
            logits = model(images.to(device))
            if logits.ndim != 4 or logits.shape[1] != n:
                raise ConfigError(f"segmentation model must return (B, {n}, H, W) logits, got {tuple(logits.shape)}")
            for j in range(images.shape[0]):
                if original:
                    path = labels[seen + j]
                    with Image.open(path) as im:
                        size = im.size
                    target = _to_target(_read_label(path, size)).to(device)
                else:
                    target = targets[j].to(device)
                lg = logits[j: j + 1]
                if lg.shape[-2:] != target.shape[-2:]:
                    lg = F.interpolate(lg, size=target.shape[-2:], mode="bilinear", align_corners=False)
                one = torch.zeros(n, n, dtype=torch.long, device=device)
                update_confusion(one, lg.argmax(1)[0], target, n)
                conf += one
                inter = one.diag()
                per_image.append(torch.stack([inter, one.sum(0) + one.sum(1) - inter]).cpu())
            seen += images.shape[0]
            if progress is not None:
                progress(images.shape[0])
        if int(conf.sum()) == 0:
            raise DataError("no labelled pixels in the evaluated split (every label is 0 = other); "
                            "check the annotations")
        stats = torch.stack(per_image).numpy().astype(np.int64) if per_image else np.zeros((0, 2, n), np.int64)
        return {**segmentation_metrics(conf.cpu()), "n_eval": seen, "per_image": {"miou": stats},
                "label_resolution": self.opts["label_resolution"]}

