"""The ``image_folder`` task: a user's images in the ImageFolder layout, any size, every method."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_imagenet
from PIL import Image

from lwbench.cli import main
from lwbench.errors import DataError, DataNotFoundError
from lwbench.registry import get_task

TINY = ["--backbone", "lw_vit_test_p8", "--set", "teacher.steps=2", "--set", "teacher.batch_size=4",
        "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "measure.min_run_time=0.05",
        "--set", "measure.throughput_batch=2", "--set", "measure.warmup=1", "--set", "measure.flops_images=1",
        "--set", "measure.isolate=false", "--set", "methods.lookwhere.distill.steps=1",
        "--set", "methods.lookwhere.distill.batch_size=4", "--set", "methods.lookwhere.finetune.steps=1", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of flowers-style names (not ImageNet wnids), with a test/ split beside val/."""
    root = make_imagenet(tmp_path_factory.mktemp("imgs") / "mine", classes=3, per_class=4, val_per_class=2)
    for split in ("train", "val"):
        for i, wnid in enumerate(sorted(os.listdir(root / split))):
            os.rename(root / split / wnid, root / split / ["daisy", "rose", "tulip"][i])
    return root


def test_reads_the_layout_at_any_size(folder):
    task = get_task("image_folder")(source="real", data_root=folder, img_size=(48, 80))
    assert task.classes == ("daisy", "rose", "tulip") and task.num_classes == 3
    x, y = task.dataset("train", train=True)[0]
    assert x.shape == (3, 48, 80) and y == 0
    assert len(task.dataset("test")) == len(task.dataset("val")) == 6  # no test/: test is val
    sq = get_task("image_folder")(source="real", data_root=folder, img_size=(48, 80), resize="squash")
    xs, _ = sq.dataset("val")[0]
    assert xs.shape == (3, 48, 80)
    img = Image.open(sq.dataset("val").samples[0][0]).convert("RGB").resize((80, 48), Image.BICUBIC)
    want = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(xs, (want - mean) / std, atol=0.05)  # squashed, not cropped


def test_test_split_when_present(folder, tmp_path):
    import shutil

    root = tmp_path / "with_test"
    shutil.copytree(folder, root)
    shutil.copytree(root / "val" / "rose", root / "test" / "rose")
    task = get_task("image_folder")(source="real", data_root=root)
    assert len(task.dataset("test")) == 2 and {t for _, t in task.dataset("test").samples} == {1}


def test_bad_layouts_are_one_line(tmp_path):
    with pytest.raises(DataNotFoundError, match="train/ and val/"):
        get_task("image_folder")(source="real", data_root=tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="at least 2"):
        get_task("image_folder")(source="real", data_root=tmp_path)
    (tmp_path / "train" / "b").mkdir()
    for cls in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / "x.png")
    (tmp_path / "val" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "c" / "x.png")
    task = get_task("image_folder")(source="real", data_root=tmp_path)
    with pytest.raises(DataError, match="class that train/ does not have"):
        task.dataset("val")


def test_an_empty_train_class_folder_is_refused_before_any_work(folder, tmp_path, capsys):
    """An empty train/<class> would silently become a class no image trains; val/ and test/ may lack one."""
    import shutil

    root = tmp_path / "mine"
    shutil.copytree(folder, root)
    (root / "val" / "sunflower").mkdir()  # fine: a held-out split may lack a class
    (root / "test" / "sunflower").mkdir(parents=True)
    shutil.copytree(root / "val" / "rose", root / "test" / "rose")
    assert get_task("image_folder")(source="real", data_root=root).num_classes == 3
    (root / "train" / "sunflower").mkdir()
    (root / "train" / "sunflower" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train/sunflower holds no images .*put images in it or remove it"):
        get_task("image_folder")(source="real", data_root=root)
    assert main(["run", "--method", "full", "--task", "image_folder", "--data-root", str(root), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lwbench: error: ") and "train/sunflower holds no images" in err[0]
    assert not Path(os.environ["LWBENCH_CACHE"], "teachers").exists()  # refused before any training
    (root / "train" / "tulip2").mkdir()
    with pytest.raises(DataError, match="2 class folders of .* hold no images .*: sunflower, tulip2; "):
        get_task("image_folder")(source="real", data_root=root)


@pytest.mark.parametrize("method,budget", [("full", None), ("tome", "r=1"), ("lookwhere", "k=6")])
def test_run_end_to_end_non_square(folder, method, budget, capsys):
    argv = ["run", "--method", method, "--task", "image_folder", "--data-root", str(folder), "--img-size", "32x48",
            *TINY]
    if method == "lookwhere":
        argv += ["--set", "method.selector_size=16"]
    if budget:
        argv += ["--budget", budget]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(p.read_text()) for p in Path(os.environ["LWBENCH_RESULTS"]).rglob("*.json")]
    row = next(r for r in rows if r["task"] == "image_folder" and r["method"] == method)
    assert row["source"] == "real" and row["img_size"] == "32x48" and row["n_eval"] == 6
    assert 0.0 <= row["metric_value"] <= 100.0 and row["gmacs"] > 0


def test_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    """PIL's ``convert("RGB")`` clips 16-bit greyscale (mode I;16) to 0..255: nearly all white. The reader keeps
    the high byte, as PIL does for 48-bit RGB."""
    from lwbench.tasks._imageio import read_image

    grey = (np.arange(256, dtype=np.uint32)[None, :].repeat(4, 0) * 257 + 100).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    rgb = np.asarray(read_image(tmp_path / "g16.png"))
    assert rgb.shape == (4, 256, 3) and rgb.dtype == np.uint8
    assert (rgb == (grey >> 8).astype(np.uint8)[..., None]).all()
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32)[None]).save(tmp_path / "f32.tif")
    with pytest.raises(DataError, match=r"f32\.tif: 32-bit float pixels") as exc:
        read_image(tmp_path / "f32.tif")
    assert "\n" not in str(exc.value)


def test_imagenet_is_an_image_folder_with_wnid_classes(tmp_path):
    """ImageNet reads its layout through the image_folder task (one scan, one set of checks); what is its own: the
    wnid messages, test = val, and timm's fixed recipe (no resize/augment options: its stored config is unchanged)."""
    from lwbench.tasks.image_folder import ImageFolderTask
    from lwbench.tasks.imagenet import ImageNet

    root = make_imagenet(tmp_path / "in", classes=2, per_class=2, val_per_class=1)
    (root / "test" / "unlabelled").mkdir(parents=True)  # as in the Kaggle copy: never read as the test split
    inet = ImageNet(data_root=root, img_size=32)
    folder = get_task("image_folder")(source="real", data_root=root, img_size=32)
    assert issubclass(ImageNet, ImageFolderTask) and inet.classes == folder.classes
    assert all(c.startswith("n") and len(c) == 9 for c in inet.class_names)  # the wnids
    assert inet.dataset("val").samples == inet.dataset("test").samples == folder.dataset("val").samples
    assert set(ImageNet.option_defaults()) == {"crop_pct", "interpolation"}
    (root / "train" / "n99999999").mkdir()  # an empty wnid folder would be a class no image trains
    with pytest.raises(DataError, match=r"train/n99999999 holds no images"):
        ImageNet(data_root=root)


def test_a_limited_evaluation_is_a_seeded_sample_of_every_class(tmp_path, capsys):
    """``eval.limit`` on a folder sorted by class used to read the first N images: one class. It is a random subset
    drawn once from the seed (sorted), the same for every method of that seed, and each row's per-image file names
    the dataset indices it evaluated, so two rows with the same limit pair image by image."""
    from lwbench.results import ResultStore

    root = make_imagenet(tmp_path / "two", classes=2, per_class=2, val_per_class=10)
    task = get_task("image_folder")(source="real", data_root=root, img_size=(32, 48))
    labels = [int(t) for _, y in task.loader("test", 4, limit=6) for t in y]
    assert len(labels) == 6 and set(labels) == {0, 1}  # the first 6 would all be class 0
    subset = task.loader("test", 4, limit=6).dataset.indices
    assert list(subset) == sorted(subset)
    again = get_task("image_folder")(source="real", data_root=root, img_size=(32, 48))
    assert list(again.loader("test", 64, limit=6).dataset.indices) == list(subset)  # drawn from the seed alone

    argv = ["run", "--task", "image_folder", "--data-root", str(root), "--img-size", "32x48", *TINY,
            "--set", "eval.limit=6", "--set", "measure.paired=false"]
    assert main([*argv, "--method", "full"]) == 0, capsys.readouterr().err
    assert main([*argv, "--method", "random", "--budget", "k=3"]) == 0, capsys.readouterr().err
    store = ResultStore(Path(os.environ["LWBENCH_RESULTS"]))
    rows = store.rows(task="image_folder")
    assert len(rows) == 2 and {r["n_eval"] for r in rows} == {6}
    assert all(r["config"]["eval"]["subset"] == "random" for r in rows)  # not confused with first-N rows
    for r in rows:
        assert list(store.per_image(r)["index"]) == list(subset)
