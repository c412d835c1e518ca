"""Real-data tasks (imagenet, cub, ade20k) on tiny fixtures written in the datasets' own layouts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_ade20k, make_cub, make_imagenet
from PIL import Image

from lwbench.errors import ConfigError, DataError, DataNotFoundError, LwbenchError
from lwbench.registry import TASKS
from lwbench.tasks.ade20k import ADE20K, mmseg_available, segmentation_metrics, update_confusion
from lwbench.tasks.cub import CUB
from lwbench.tasks.imagenet import ImageNet

torch.set_num_threads(1)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -- registry ---------------------------------------------------------------------------------------
def test_registered_as_real_only_tasks():
    for name, cls in (("imagenet", ImageNet), ("cub", CUB), ("ade20k", ADE20K)):
        assert TASKS.get(name) is cls
        assert cls.sources == ("real",)
    assert ADE20K.kind == "segmentation" and ADE20K.num_classes == 150 and ADE20K.metric == "miou"


# -- missing data -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, layout_bit", [(ImageNet, "train/<wnid>/*.JPEG"), (CUB, "train_test_split.txt"),
                                             (ADE20K, "annotations/{training,validation}/*.png")])
def test_missing_data_names_layout_and_flag(tmp_path, cls, layout_bit):
    for kwargs in ({}, {"data_root": tmp_path}, {"data_root": tmp_path, "source": "real"}):
        with pytest.raises(DataNotFoundError) as exc:
            cls(**kwargs)
        msg = _one_line(exc)
        assert layout_bit in msg and "--data-root" in msg
    with pytest.raises(ConfigError):
        cls(source="synthetic", data_root=tmp_path)


# -- imagenet ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("data") / "imagenet", classes=3, per_class=4, val_per_class=2)


def test_imagenet_layout_splits_and_labels(imagenet_root):
    # --data-root may be the dataset itself or its parent holding imagenet/
    for root in (imagenet_root, imagenet_root.parent):
        task = ImageNet(data_root=root, img_size=64)
        assert task.source == "real" and task.real_root() == imagenet_root
    assert task.num_classes == 3 and ImageNet.num_classes == 1000
    assert list(task.classes) == sorted(p.name for p in (imagenet_root / "train").iterdir())
    train, val, test = (task.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 6, 6)
    assert sorted(set(train.targets)) == [0, 1, 2] and val.targets == [0, 0, 1, 1, 2, 2]
    assert [p for p, _ in val.samples] == [p for p, _ in test.samples]  # test = val/
    for p, t in train.samples:
        assert p.parent.name == task.classes[t]
    with pytest.raises(ConfigError):
        task.dataset("holdout")


def test_imagenet_transforms_follow_timm(imagenet_root):
    task = ImageNet(data_root=imagenet_root, img_size=64)
    ev = task.transform(train=False).transforms
    assert ev[0].size == math.floor(64 / 0.875) == 73  # shorter side to img / crop_pct
    assert tuple(ev[1].size) == (64, 64)
    tr = task.transform(train=True).transforms
    assert [type(t).__name__ for t in tr[:2]] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    for train in (False, True):
        x, y = task.dataset("val", train=train)[0]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    assert ImageNet(data_root=imagenet_root, img_size=(64, 48)).dataset("val")[3][0].shape == (3, 64, 48)
    with pytest.raises(ConfigError):
        ImageNet(data_root=imagenet_root, crop_pct=1.5)


def test_imagenet_malformed(tmp_path):
    root = make_imagenet(tmp_path / "flat", classes=2, per_class=1, val_per_class=1)
    for f in list((root / "val").rglob("*.JPEG")):  # the raw ILSVRC val tarball: flat files
        f.rename(root / "val" / f.name)
    with pytest.raises(DataError) as exc:
        ImageNet(data_root=root)
    assert "val/<wnid>/" in _one_line(exc)

    root = make_imagenet(tmp_path / "extra", classes=2, per_class=1, val_per_class=1)
    shutil.copytree(root / "val" / sorted(p.name for p in (root / "val").iterdir())[0], root / "val" / "n99999999")
    task = ImageNet(data_root=root)
    with pytest.raises(DataError) as exc:
        task.dataset("val")
    assert "n99999999" in _one_line(exc)

    root = make_imagenet(tmp_path / "corrupt", classes=2, per_class=1, val_per_class=1)
    bad = next((root / "train").rglob("*.JPEG"))
    bad.write_bytes(bad.read_bytes()[:50])
    ds = ImageNet(data_root=root, img_size=32).dataset("train")
    idx = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(DataError) as exc:
        ds[idx]
    assert str(bad) in _one_line(exc)


# -- cub --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011", classes=3, per_class=6, test_per_class=2)


def test_cub_splits_and_labels(cub_root):
    for root in (cub_root, cub_root.parent):
        task = CUB(data_root=root, img_size=64, val_every=10)
        assert task.real_root() == cub_root
    assert task.num_classes == 3 and CUB.num_classes == 200
    assert task.class_names == ("001.Bird_1", "002.Bird_2", "003.Bird_3")
    train, val, test = (task.dataset(s) for s in ("train", "val", "test"))
    # 4 official train images per class: the first of each class is held out (every 10th from 0)
    assert (len(train), len(val), len(test)) == (9, 3, 6)
    assert val.targets == [0, 1, 2] and test.targets == [0, 0, 1, 1, 2, 2]
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    for p, t in train.samples + test.samples:  # label comes from image_class_labels.txt, dir agrees here
        assert p.parent.name == task.class_names[t]
    full = CUB(data_root=cub_root)  # the default trains on the whole official train split
    assert full.opts["val_every"] == 0 and len(full.dataset("train")) == 12
    with pytest.raises(ConfigError):
        full.dataset("val")


def test_cub_transforms(cub_root):
    task = CUB(data_root=cub_root)  # paper protocol: Resize((600, 600)), crop 448
    ev = task.transform(train=False).transforms
    assert tuple(ev[0].size) == (600, 600) and tuple(ev[1].size) == (448, 448)
    assert type(task.transform(train=True).transforms[1]).__name__ == "RandomCrop"
    small = CUB(data_root=cub_root, img_size=64)
    assert tuple(small.transform(False).transforms[0].size) == (86, 86)  # 64 * 600 / 448, same field of view
    for train in (False, True):
        x, y = small.dataset("test", train=train)[0]
        assert x.shape == (3, 64, 64) and y == 0
    with pytest.raises(ConfigError):
        CUB(data_root=cub_root, resize=400, crop=448)


def _edit(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


@pytest.mark.parametrize("damage, culprit", [
    (lambda r: (r / "train_test_split.txt").unlink(), "train_test_split.txt"),
    (lambda r: (r / "classes.txt").unlink(), "classes.txt"),
    (lambda r: _edit(r / "image_class_labels.txt", lambda ls: ls[:-1]), "image_class_labels.txt"),
    (lambda r: _edit(r / "train_test_split.txt", lambda ls: ls + ["999 1"]), "train_test_split.txt"),
    (lambda r: _edit(r / "image_class_labels.txt", lambda ls: ls[:-1] + [ls[-1].split()[0] + " 7"]),
     "image_class_labels.txt"),
    (lambda r: _edit(r / "train_test_split.txt", lambda ls: ls[:-1] + [ls[-1].split()[0] + " 2"]),
     "train_test_split.txt"),
    (lambda r: _edit(r / "classes.txt", lambda ls: ls[:-1] + ["9 009.Gap"]), "classes.txt"),
    (lambda r: _edit(r / "images.txt", lambda ls: ls + ["oops"]), "images.txt:"),
    (lambda r: _edit(r / "images.txt", lambda ls: ls + [ls[0]]), "images.txt:"),
    (lambda r: next((r / "images").rglob("*.jpg")).unlink(), ".jpg"),
])
def test_cub_malformed_names_file(tmp_path, damage, culprit):
    root = make_cub(tmp_path / "CUB_200_2011", classes=2, per_class=3, test_per_class=1)
    damage(root)
    with pytest.raises(DataError) as exc:
        CUB(data_root=root)
    assert culprit in _one_line(exc)


# -- ade20k -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return make_ade20k(tmp_path_factory.mktemp("data") / "ADEChallengeData2016", train=3, val=2)


def test_ade20k_pairs_and_targets(ade_root):
    for root in (ade_root, ade_root.parent):
        task = ADE20K(data_root=root, img_size=64)
        assert task.real_root() == ade_root
    assert [len(task.dataset(s)) for s in ("train", "val", "test")] == [3, 2, 2]
    img_path, lab_path = task.pairs("val")[0]
    assert (img_path.stem, lab_path.name) == ("ADE_val_00000001", "ADE_val_00000001.png")
    raw = torch.from_numpy(np.array(Image.open(lab_path))).long()
    h, w = raw.shape
    x, y = ADE20K(data_root=ade_root, img_size=(h, w)).dataset("val")[0]  # native size: labels untouched
    assert x.shape == (3, h, w) and y.dtype == torch.long
    assert torch.equal(y, torch.where(raw == 0, 255, raw - 1))
    x, y = task.dataset("val")[1]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(y.unique().tolist()) <= {255, 0, 1, 4, 149}


def test_ade20k_train_transform_is_joint(tmp_path):
    root = make_ade20k(tmp_path / "ade", train=1, val=1)
    img_path, lab_path = ADE20K(data_root=root).pairs("train")[0]
    w, h = 90, 50  # left half class 1 on black, right half class 2 on white
    lab = np.zeros((h, w), np.uint8)
    lab[:, : w // 2], lab[:, w // 2:] = 1, 2
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, w // 2:] = 255
    Image.fromarray(rgb).save(img_path, "JPEG", quality=95)
    Image.fromarray(lab, "L").save(lab_path)
    ds = ADE20K(data_root=root, img_size=40).dataset("train", train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        x, y = ds[0]
        assert x.shape == (3, 40, 40) and y.shape == (40, 40)
        assert set(y.unique().tolist()) <= {0, 1, 255}
        bright = x.mean(0)
        for cls, sign in ((0, -1), (1, 1)):  # class 0 pixels must stay dark, class 1 bright (flip/crop shared)
            sel = y == cls
            if sel.sum() > 20:
                assert sign * float(bright[sel].median()) > 1.0
        seen.add((bool((y == 0).any()), bool((y == 1).any())))
    assert len(seen) > 1  # random scale/crop really varies


@pytest.mark.parametrize("damage, culprit, at_item", [
    (lambda i, a: Image.fromarray(np.ones((10, 12), np.uint8), "L").save(a), "size", True),
    (lambda i, a: Image.fromarray(np.full(Image.open(i).size[::-1], 151, np.uint8), "L").save(a), "151", True),
    (lambda i, a: Image.new("RGB", Image.open(i).size).save(a), "single-channel", True),
    (lambda i, a: a.unlink(), "has no annotation", False),
])
def test_ade20k_malformed_names_file(tmp_path, damage, culprit, at_item):
    root = make_ade20k(tmp_path / "ade", train=1, val=2)
    task = ADE20K(data_root=root, img_size=32)
    img_path, lab_path = task.pairs("val")[1]
    task = ADE20K(data_root=root, img_size=32)  # fresh: pairs are cached per instance
    damage(img_path, lab_path)
    with pytest.raises(DataError) as exc:
        ds = task.dataset("val")
        ds[1]
    msg = _one_line(exc)
    assert culprit in msg and lab_path.name in msg
    if at_item:
        task.dataset("val")[0]  # the intact pair still loads


def test_ade20k_decoder_option(ade_root):
    with pytest.raises(ConfigError):
        ADE20K(data_root=ade_root, decoder="segformer")
    if not mmseg_available():
        with pytest.raises(LwbenchError) as exc:
            ADE20K(data_root=ade_root, decoder="uper")
        assert "lwbench[seg]" in _one_line(exc)
    head = ADE20K(data_root=ade_root).make_head(32)
    assert head.fc.out_channels == 150


# -- segmentation metric: known answers -------------------------------------------------------------
def _conf(pred, target, n, ignore=255):
    conf = torch.zeros(n, n, dtype=torch.long)
    return update_confusion(conf, torch.tensor(pred), torch.tensor(target), n, ignore)


def test_segmentation_metrics_known_answers():
    # half the pixels right, symmetric errors: IoU = 1 / (2 + 2 - 1) = 1/3 for both classes
    conf = _conf([0, 1, 1, 0], [0, 0, 1, 1], 2)
    assert conf.tolist() == [[1, 1], [1, 1]]
    m = segmentation_metrics(conf)
    assert m["miou"] == pytest.approx(100 / 3) and m["pixel_acc"] == pytest.approx(50.0)
    assert m["macc"] == pytest.approx(50.0)
    # gt [0,0,0,1], pred [0,0,1,1]: IoU0 = 2/3, IoU1 = 1/2 -> mIoU 7/12; acc 3/4; mAcc (2/3 + 1)/2
    m = segmentation_metrics(_conf([0, 0, 1, 1], [0, 0, 0, 1], 2))
    assert m["miou"] == pytest.approx(100 * 7 / 12) and m["pixel_acc"] == pytest.approx(75.0)
    assert m["macc"] == pytest.approx(100 * 5 / 6)
    # a class absent from both prediction and ground truth is left out (n=5 gives the same mIoU)
    assert segmentation_metrics(_conf([0, 0, 1, 1], [0, 0, 0, 1], 5))["miou"] == pytest.approx(100 * 7 / 12)
    # a class only predicted counts with IoU 0: IoU0 = 1/2, IoU1 = 0 -> 25
    assert segmentation_metrics(_conf([0, 1], [0, 0], 2))["miou"] == pytest.approx(25.0)
    # ignore pixels count nowhere, whatever is predicted there
    conf = _conf([[0, 1, 1], [1, 0, 1]], [[0, 255, 1], [255, 255, 1]], 2)
    assert conf.tolist() == [[1, 0], [0, 2]] and segmentation_metrics(conf)["miou"] == pytest.approx(100.0)
    # accumulating over batches == one pass over everything (whole-split, not per-image mean)
    a = _conf([0, 1, 1, 1], [0, 0, 1, 1], 2)
    update_confusion(a, torch.tensor([0, 0]), torch.tensor([1, 0]), 2)
    assert torch.equal(a, _conf([0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], 2))
    assert math.isnan(segmentation_metrics(torch.zeros(3, 3, dtype=torch.long))["miou"])
    with pytest.raises(DataError):
        _conf([0], [7], 2)


# -- end to end: a tiny random TaskModel on each fixture ------------------------------------------
def _model(kind: str, num_classes: int, img: int):
    from lwbench.backbones import create_backbone
    from lwbench.heads import ClassifierHead, LinearSegHead, TaskModel
    from lwbench.methods.full import FullEncoder

    torch.manual_seed(0)
    vit = create_backbone("lw_vit_test_p8", img)
    head = ClassifierHead(vit.embed_dim, num_classes) if kind == "classification" else LinearSegHead(vit.embed_dim,
                                                                                                    num_classes)
    return TaskModel(FullEncoder(vit), head)


def test_evaluate_end_to_end(tmp_path, cub_root, ade_root):
    inet = ImageNet(data_root=make_imagenet(tmp_path / "in6", classes=6, per_class=1, val_per_class=2), img_size=32)
    out = inet.evaluate(_model("classification", 6, 32), inet.loader("val", batch_size=5))
    assert out["n_eval"] == 12 and 0 <= out["top1"] <= out["top5"] <= 100

    cub = CUB(data_root=cub_root, img_size=32)
    out = cub.evaluate(_model("classification", 3, 32), cub.loader("test", batch_size=4))
    assert out["n_eval"] == 6 and 0 <= out["top1"] <= 100 and "top5" not in out

    ade = ADE20K(data_root=ade_root, img_size=32)
    model = _model("segmentation", 150, 32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 150, 32, 32)
    out = ade.evaluate(model, ade.loader("val", batch_size=2))
    assert out["n_eval"] == 2
    for key in ("miou", "pixel_acc", "macc"):
        assert 0 <= out[key] <= 100
    # a perfect "model" (labels smuggled through a lookup) gets exactly 100 mIoU / pixel acc
    targets = torch.stack([ade.dataset("val")[i][1] for i in range(2)])

    class Oracle(torch.nn.Module):
        def forward(self, x):
            t = targets[: x.shape[0]].clone()
            t[t == 255] = 0
            return torch.nn.functional.one_hot(t, 150).permute(0, 3, 1, 2).float()

    out = ade.evaluate(Oracle(), ade.loader("val", batch_size=2))
    assert out["miou"] == pytest.approx(100.0) and out["pixel_acc"] == pytest.approx(100.0)


# -- per-image outcomes (lwbench.stats intervals) -------------------------------------------------
class _ConstantClass(torch.nn.Module):
    """Logits that always pick class ``c``: (B, n) for classification, (B, n, h/4, w/4) for segmentation."""

    def __init__(self, n: int, c: int, dense: bool = False):
        super().__init__()
        self.n, self.c, self.dense = n, c, dense

    def forward(self, x):
        shape = (x.shape[0], self.n, x.shape[-2] // 4, x.shape[-1] // 4) if self.dense else (x.shape[0], self.n)
        out = torch.zeros(shape)
        out[:, self.c] = 1.0
        return out


def test_classification_per_image_hits_are_in_loader_order(tmp_path):
    from lwbench.stats import statistic

    inet = ImageNet(data_root=make_imagenet(tmp_path / "in6", classes=6, per_class=1, val_per_class=2), img_size=32)
    targets = [inet.dataset("val")[i][1] for i in range(12)]
    found = [inet.evaluate(_ConstantClass(6, 2), inet.loader("val", batch_size=b)) for b in (5, 12)]
    for out in found:
        hits = out["per_image"]["top1"]
        assert hits.dtype == np.uint8 and hits.shape == (12,)
        assert hits.tolist() == [int(t == 2) for t in targets]  # image i of the split is entry i
        assert statistic("top1")(hits) == pytest.approx(out["top1"])
        assert out["per_image"]["top5"].shape == (12,) and statistic("top5")(out["per_image"]["top5"]) == out["top5"]
    assert set(found[0]) == {"top1", "top5", "n_eval", "per_image"}


def test_ade20k_per_image_sums_give_the_whole_split_metric(tmp_path):
    """Four validation images of different sizes, batched: each image's intersection and union are counted on
    its own original label map, and their sums give the whole-split mIoU and pixel accuracy."""
    from lwbench.stats import statistic

    root = make_ade20k(tmp_path / "ADEChallengeData2016", train=1, val=4)
    ade = ADE20K(data_root=root, img_size=32)
    assert ade.opts["label_resolution"] == "original" and ade.config()["task_label_resolution"] == "original"
    model = _ConstantClass(150, 1, dense=True)  # raw id 2
    out = ade.evaluate(model, ade.loader("test", batch_size=3))
    assert out["label_resolution"] == "original" and out["n_eval"] == 4
    stats = out["per_image"]["miou"]
    assert stats.shape == (4, 2, 150)
    assert statistic("miou")(stats) == pytest.approx(out["miou"])
    # one image at a time gives the same rows: batching does not reorder or mix the label maps
    assert np.array_equal(ade.evaluate(model, ade.loader("test", batch_size=1))["per_image"]["miou"], stats)
    raw = [np.array(Image.open(lab)) for _, lab in ade.pairs("test")]
    for row, lab in zip(stats, raw, strict=True):  # at the original size: class 1 hits = its pixels
        assert row[0].sum() == row[0, 1] == int((lab == 2).sum())
        assert row[1, 1] == int((lab > 0).sum())  # union of class 1 = every labelled pixel (all predicted 1)
    assert out["pixel_acc"] == pytest.approx(100 * sum(int((r == 2).sum()) for r in raw)
                                             / sum(int((r > 0).sum()) for r in raw))
    resized = ADE20K(data_root=root, img_size=32, label_resolution="resized")
    assert resized.opts != ade.opts  # a different run id
    small = resized.evaluate(model, resized.loader("test", batch_size=3))
    ignored = sum(int((resized.dataset("test")[i][1] == 255).sum()) for i in range(4))
    assert small["label_resolution"] == "resized"
    assert small["per_image"]["miou"][:, 1, 1].sum() == 4 * 32 * 32 - ignored  # labelled pixels at 32x32
    assert statistic("miou")(small["per_image"]["miou"]) == pytest.approx(small["miou"])
