"""traffic_signs and billiards: synthetic determinism and balance, the real on-disk layouts on tiny
fixtures, the ATS filtering rule and the DPS label functions on known answers, and the error paths."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.registry import get_task
from lwbench.tasks import billiards as bmod
from lwbench.tasks import traffic_signs as tmod
from lwbench.tasks._synth import billiards_scene, traffic_scene

SMALL_TS = {"n_train": 12, "n_val": 8, "n_test": 8}
SMALL_BB = {"n_train": 6, "n_val": 3, "n_test": 3}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_registered():
    assert get_task("traffic_signs") is tmod.TrafficSigns
    assert get_task("billiards") is bmod.Billiards


# -- traffic_signs: synthetic ------------------------------------------------------------------------
def test_traffic_synthetic_deterministic_from_seed():
    a = tmod.TrafficSigns(source="synthetic", seed=3, **SMALL_TS).dataset("train")
    b = tmod.TrafficSigns(source="synthetic", seed=3, **SMALL_TS).dataset("train")
    c = tmod.TrafficSigns(source="synthetic", seed=4, **SMALL_TS).dataset("train")
    val = tmod.TrafficSigns(source="synthetic", seed=3, **SMALL_TS).dataset("val")
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert not torch.equal(a[i][0], c[i][0])
        assert not torch.equal(a[i][0], val[i][0])  # splits are different scenes


def test_traffic_synthetic_balanced_and_sizes():
    task = tmod.TrafficSigns(source="synthetic", **SMALL_TS)
    assert task.img_size == (240, 320) and task.num_classes == 4
    ds = task.dataset("train")
    assert len(ds) == 12
    labels = [ds[i][1] for i in range(12)]
    assert np.bincount(labels, minlength=4).tolist() == [3, 3, 3, 3]
    x, _ = ds[0]
    assert x.shape == (3, 240, 320) and x.dtype == torch.float32
    for size in [(48, 64), (300, 200)]:  # any size, any aspect
        x, _ = tmod.TrafficSigns(source="synthetic", img_size=size, **SMALL_TS).dataset("test")[1]
        assert x.shape == (3, *size)


def test_traffic_synthetic_objects_are_the_sign():
    task = tmod.TrafficSigns(source="synthetic", img_size=(480, 640), **SMALL_TS)
    cfg = task._scene_config()
    for i in range(8):
        objs = task.objects("val", i)
        if traffic_scene.label_of(i) == 0:
            assert objs == []
            continue
        (obj,) = objs
        assert obj["label"] == traffic_scene.label_of(i)
        x0, y0, x1, y1 = obj["box"]
        d = x1 - x0
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert 0.14 * 480 - 1e-6 <= d <= 0.18 * 480 + 1e-6  # sign_frac of the height
        # Left and right of the ring band (11% of the diameter wide) are red; the centre is not.
        arr = np.asarray(traffic_scene.render(cfg, 0, "val", i)).astype(int)
        cy = int((y0 + y1) / 2)
        for x in (int(x0 + 0.055 * d), int(x1 - 0.055 * d)):
            r, g, b = arr[cy, x]
            assert r > g + 60 and r > b + 60, (i, arr[cy, x])


def test_traffic_train_augmentation():
    task = tmod.TrafficSigns(source="synthetic", **SMALL_TS)
    plain = task.dataset("train")[1]
    torch.manual_seed(0)
    aug1 = task.dataset("train", train=True)[1]
    torch.manual_seed(0)
    aug2 = task.dataset("train", train=True)[1]
    assert aug1[1] == plain[1] and aug1[0].shape == plain[0].shape
    assert torch.equal(aug1[0], aug2[0]) and not torch.equal(aug1[0], plain[0])
    batch = next(iter(task.loader("train", batch_size=4, train=True)))
    assert batch[0].shape == (4, 3, 240, 320) and batch[1].shape == (4,)


# -- traffic_signs: real STS layout ----------------------------------------------------------------
SET1 = [
    "a1.jpg:",  # no sign -> EMPTY
    "a2.jpg:VISIBLE, 862.51, 507.91, 834.27, 478.65, SPEED_LIMIT, 70_SIGN;",  # -> 70
    "a3.jpg:VISIBLE, 100, 100, 80, 80, PEDESTRIAN_CROSSING, PEDESTRIAN_CROSSING;",  # other signs only -> dropped
    # the VISIBLE 80 beats a larger OCCLUDED 50
    "a4.jpg:OCCLUDED, 500, 500, 400, 400, SPEED_LIMIT, 50_SIGN;"
    "VISIBLE, 620.5, 410.2, 600.1, 390.3, SPEED_LIMIT, 80_SIGN;",
    "a5.jpg:BLURRED, 300, 300, 280, 280, SPEED_LIMIT, 50_SIGN;",  # best speed limit not VISIBLE -> dropped
    "a6.jpg:MISC_SIGNS;",  # only unlabelled signs -> EMPTY
    # two VISIBLE limits: the larger (70) wins
    "a7.jpg:VISIBLE, 300, 300, 280, 280, SPEED_LIMIT, 50_SIGN;VISIBLE, 700, 700, 600, 600, SPEED_LIMIT, 70_SIGN;",
    "a8.jpg:VISIBLE, 862.51l, 507.91, 834.27, 478.65, SPEED_LIMIT, 50_SIGN",  # STS's stray trailing 'l' -> 50
    "a9.jpg:VISIBLE, 10, 10, 5, 5, SPEED_LIMIT, 30_SIGN;VISIBLE, 40, 40, 20, 20, OTHER, OTHER;",  # not a class
]
SET2 = ["b1.jpg:", "b2.jpg:VISIBLE, 200, 200, 150, 150, SPEED_LIMIT, 50_SIGN;"]


def _jpeg(path, seed):
    rng = np.random.default_rng(seed)
    arr = np.broadcast_to(rng.integers(0, 255, size=(1, 1, 3), dtype=np.uint8), (960, 1280, 3)).copy()
    arr[400:500, 600:700] = 255
    Image.fromarray(arr).save(path, quality=85)


def make_sts(root, set1=SET1, set2=SET2):
    """STS as unzipped two ways: Set1's frames in Set1/Set1Part0/, Set2's directly in Set2/."""
    for n, lines, sub in ((1, set1, "Set1Part0"), (2, set2, "")):
        img_dir = root / f"Set{n}" / sub
        img_dir.mkdir(parents=True, exist_ok=True)
        (root / f"Set{n}" / "annotations.txt").write_text("\n".join(lines) + "\n")
        for k, line in enumerate(lines):
            _jpeg(img_dir / line.split(":")[0], 10 * n + k)
    return root


def test_ats_filter_rule():
    def label(line):
        return tmod.speed_limit_label(tmod.parse_annotation_line(line, "x:1")[1])

    assert [label(line) for line in SET1] == [0, 2, None, 3, None, 0, 2, 1, None]


def test_traffic_real_loader(tmp_path):
    root = make_sts(tmp_path / "data" / "traffic_signs")
    task = tmod.TrafficSigns(source="real", data_root=tmp_path / "data", img_size=(240, 320), val_frac=0.5)
    assert task.source == "real" and task.real_root() == root
    names = {s: [f.path.name for f in task.real_frames()[s]] for s in ("train", "val", "test")}
    # class-wise tail of Set1 as val: EMPTY [a1, a6] -> a6, 70 [a2, a7] -> a7; single-frame classes stay in train
    assert names == {"train": ["a1.jpg", "a2.jpg", "a4.jpg", "a8.jpg"], "val": ["a6.jpg", "a7.jpg"],
                     "test": ["b1.jpg", "b2.jpg"]}
    ds = task.dataset("train")
    assert [ds[i][1] for i in range(len(ds))] == [0, 2, 3, 1]
    x, _ = ds[1]
    assert x.shape == (3, 240, 320)
    assert [task.dataset("test")[i][1] for i in range(2)] == [0, 1]
    (obj,) = task.objects("train", 1)  # a2: one 70 sign, boxes scaled 1280x960 -> 320x240
    assert obj["label"] == 2 and obj["visibility"] == "VISIBLE"
    assert obj["box"] == pytest.approx((834.27 / 4, 478.65 / 4, 862.51 / 4, 507.91 / 4))
    assert len(task.objects("train", 2)) == 2  # a4 lists its OCCLUDED 50 and VISIBLE 80
    assert tmod.TrafficSigns(source="real", data_root=root).img_size == (960, 1280)  # native by default
    # by default all of Set1 trains, as ATS, IPS and DPS do: no val split is held back
    whole = tmod.TrafficSigns(source="real", data_root=root)
    assert len(whole.real_frames()["train"]) == 6 and whole.real_frames()["val"] == []


def test_traffic_auto_source(tmp_path, capsys):
    assert tmod.TrafficSigns(source="auto", data_root=make_sts(tmp_path / "sts")).source == "real"
    (tmp_path / "empty").mkdir()
    assert tmod.TrafficSigns(source="auto", data_root=tmp_path / "empty").source == "synthetic"
    assert tmod.TrafficSigns(source="auto").source == "synthetic"
    assert "SYNTHETIC" in capsys.readouterr().err


def test_traffic_missing_layout(tmp_path):
    (tmp_path / "Set1").mkdir()
    with pytest.raises(DataNotFoundError, match=r"Set1/annotations\.txt.*--data-root") as e:
        tmod.TrafficSigns(source="real", data_root=tmp_path)
    assert "Set2/annotations.txt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataNotFoundError, match="--data-root"):
        tmod.TrafficSigns(source="real")


def test_traffic_malformed_annotation(tmp_path):
    root = make_sts(tmp_path, set1=SET1[:2] + ["a3.jpg:VISIBLE, 1, 2, 3, SPEED_LIMIT, 50_SIGN;"])
    task = tmod.TrafficSigns(source="real", data_root=root)
    with pytest.raises(DataError, match=r"Set1/annotations\.txt:3: .*6 fields"):
        task.dataset("train")
    (root / "Set1" / "annotations.txt").write_text("a1.jpg:\nno colon here\n")
    with pytest.raises(DataError, match=r"annotations\.txt:2: expected 'IMAGE\.jpg:annotations'"):
        tmod.TrafficSigns(source="real", data_root=root).dataset("train")


def test_traffic_corrupt_and_missing_image(tmp_path):
    root = make_sts(tmp_path)
    bad = root / "Set2" / "b2.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    ds = tmod.TrafficSigns(source="real", data_root=root, img_size=(240, 320)).dataset("test")
    ds[0]
    with pytest.raises(DataError, match="b2.jpg"):
        ds[1]
    (root / "Set1" / "Set1Part0" / "a2.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="a2.jpg"):
        tmod.TrafficSigns(source="real", data_root=root).dataset("train")


# -- billiards: label functions ----------------------------------------------------------------------
BALLS = [
    {"position": [50.0, 80.0], "number": 9, "color": "orange"},
    {"position": [10.0, 20.0], "number": 3, "color": "red"},  # leftmost
    {"position": [90.0, 10.0], "number": 7, "color": "green"},  # rightmost
    {"position": [60.0, 60.0], "number": 2, "color": "blue"},
]


def test_billiards_label_functions():
    assert bmod.max_left_right(BALLS) == 6  # max(3, 7) - 1
    assert bmod.rightmost_number(BALLS) == 6  # 7 - 1
    assert bmod.sum_all_modulo10(BALLS) == 1  # 21 % 10
    assert bmod.left_color_min_max(BALLS) == 8  # leftmost red -> max(9, 3, 7, 2) - 1
    blue_left = [dict(b, color="purple") if b["number"] == 3 else b for b in BALLS]
    assert bmod.left_color_min_max(blue_left) == 1  # leftmost purple -> min = 2, class 1
    shuffled = BALLS[:]
    random.Random(0).shuffle(shuffled)
    for fn, _ in bmod.LABEL_FNS.values():
        assert fn(shuffled) == fn(BALLS)
    with pytest.raises(ValueError, match="white"):
        bmod.left_color_min_max([dict(BALLS[1], color="white")])
    assert bmod.max_left_right([{"position": [5], "number": 1, "color": "red"}]) == 0  # one ball: both ends


def test_billiards_num_classes_per_label_fn():
    counts = {fn: bmod.Billiards(source="synthetic", label_fn=fn, **SMALL_BB).num_classes for fn in bmod.LABEL_FNS}
    assert counts == {"max-left-right": 9, "rightmost-number": 9, "sum-all-modulo10": 10, "left-color-min-max": 9}
    assert bmod.Billiards.num_classes == 9
    assert bmod.Billiards(source="synthetic", label_fn="sum-all-modulo10", **SMALL_BB).class_names[0] == "0"


# -- billiards: synthetic ----------------------------------------------------------------------------
def test_billiards_sampler_balanced_and_unambiguous():
    cfg = billiards_scene.BilliardsConfig()
    labels = []
    for i in range(900):
        balls = billiards_scene.sample_balls(cfg, np.random.default_rng([0, 0, i]))
        xs = sorted(b["position"][0] for b in balls)
        assert cfg.n_balls[0] <= len(balls) <= cfg.n_balls[1]
        assert xs[1] - xs[0] >= 0.5 * balls[0]["radius"] and xs[-1] - xs[-2] >= 0.5 * balls[0]["radius"]
        labels.append(bmod.max_left_right(balls))
    counts = np.bincount(labels, minlength=9)
    assert counts.min() >= 70 and counts.max() <= 130, counts  # uniform: 100 each (independent numbers give 11-210)


def test_billiards_synthetic_written_in_dps_format_deterministically(tmp_path, monkeypatch):
    task = bmod.Billiards(source="synthetic", seed=1, **SMALL_BB)
    root = task.synthetic_root()
    assert root.parent == tmp_path / "cache" / "synthetic" / "billiards"
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # no temp folder left
    for folder, n in (("train", 6), ("valid", 3), ("test", 3)):
        assert sorted(p.name for p in (root / folder).glob("*.png")) == sorted(f"{i}.png" for i in range(n))
    balls = json.loads((root / "train" / "0.json").read_text())
    assert isinstance(balls, list) and {"position", "number", "color"} <= set(balls[0])
    assert Image.open(root / "train" / "0.png").size == (384, 256)
    mtime = (root / "settings.json").stat().st_mtime_ns
    x1, y1 = task.dataset("train")[0]
    # same seed, fresh cache: identical; another seed: different
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache2"))
    x2, y2 = bmod.Billiards(source="synthetic", seed=1, **SMALL_BB).dataset("train")[0]
    x3, _ = bmod.Billiards(source="synthetic", seed=2, **SMALL_BB).dataset("train")[0]
    assert torch.equal(x1, x2) and y1 == y2 and not torch.equal(x1, x3)
    monkeypatch.setenv("LWBENCH_CACHE", str(tmp_path / "cache"))
    assert bmod.Billiards(source="synthetic", seed=1, **SMALL_BB).synthetic_root() == root
    assert (root / "settings.json").stat().st_mtime_ns == mtime  # reused, not regenerated
    objs = task.objects("train", 0)
    assert [o["label"] for o in objs] == [b["number"] - 1 for b in balls]
    torch.manual_seed(0)
    xa, ya = task.dataset("train", train=True)[0]
    assert xa.shape == x1.shape and ya == y1


def test_billiards_large_numbers_are_version_2_and_small_ones_stay_version_1(tmp_path):
    """``numbers=large`` paints a larger number disc (task version 2, named in the options, so in the teacher id
    and the row); ``numbers=small`` keeps version 1's options and dataset digest, so its shipped teacher and
    cached datasets stay valid (the digest below is the one version 1 wrote before the option existed)."""
    small = bmod.Billiards(source="synthetic", img_size=(256, 384), n_balls=(2, 4), ball_frac=(0.14, 0.18))
    large = bmod.Billiards(source="synthetic", img_size=(256, 384), n_balls=(2, 4), ball_frac=(0.14, 0.18),
                           numbers="large")
    assert small.version == 1 and "numbers" not in small.opts
    assert small.generator_config().digest() == "7faf6af802ea6fd4"
    assert large.version == 2 and large.opts["numbers"] == "large"
    assert large.generator_config().digest() != small.generator_config().digest()
    with pytest.raises(ConfigError, match="numbers must be one of small, large"):
        bmod.Billiards(source="synthetic", numbers="huge")
    # the same balls, painted both ways: the large disc covers more white pixels around the same centre
    cfg_s, cfg_l = small.generator_config(), large.generator_config()
    balls = billiards_scene.sample_balls(cfg_s, np.random.default_rng([0, 0, 0]))
    white = [(np.asarray(billiards_scene.render(c, balls, np.random.default_rng(1))).min(-1) > 200).sum()
             for c in (cfg_s, cfg_l)]
    assert white[1] > 1.4 * white[0]


def test_billiards_large_numbers_give_each_ball_its_number_disc_as_read_box(tmp_path):
    task = bmod.Billiards(source="synthetic", seed=1, numbers="large", **SMALL_BB)
    balls = json.loads((task.synthetic_root() / "train" / "0.json").read_text())
    for obj, ball in zip(task.objects("train", 0), balls, strict=True):
        (x0, y0, x1, y1), (r0, s0, r1, s1) = obj["box"], obj["read_box"]
        assert x0 < r0 < r1 < x1 and y0 < s0 < s1 < y1  # inside the ball
        assert (r1 - r0) == pytest.approx(2 * 0.75 * ball["radius"], rel=1e-6)
        assert (r0 + r1) / 2 == pytest.approx(ball["position"][0])
    assert all("read_box" not in o for o in bmod.Billiards(source="synthetic", seed=1, **SMALL_BB).objects("train", 0))


# -- billiards: real DPS layout ----------------------------------------------------------------------
def make_billiard(root, size=(120, 160)):
    """Three images per split, hand-made ball lists with known max-left-right labels."""
    layouts = [
        [{"position": [20, 30], "number": 2, "color": "red"}, {"position": [140, 60], "number": 5, "color": "blue"}],
        [{"position": [30, 30], "number": 9, "color": "green"}, {"position": [100, 90], "number": 1, "color": "red"},
         {"position": [60, 40], "number": 4, "color": "yellow"}],
        [{"position": [10, 10], "number": 1, "color": "purple"}, {"position": [150, 100], "number": 1,
                                                                   "color": "orange"}],
    ]
    for folder in ("train", "valid", "test"):
        (root / folder).mkdir(parents=True)
        for i, balls in enumerate(layouts):
            Image.new("RGBA", (size[1], size[0]), (30, 120, 50, 255)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.json").write_text(json.dumps(balls))
    return root


def test_billiards_real_loader(tmp_path):
    make_billiard(tmp_path / "data" / "billiard")
    task = bmod.Billiards(source="real", data_root=tmp_path / "data")
    assert task.source == "real" and task.img_size == (120, 160)  # native size by default
    ds = task.dataset("val")
    assert [ds[i][1] for i in range(3)] == [4, 8, 0]
    assert ds[0][0].shape == (3, 120, 160)
    small = bmod.Billiards(source="real", data_root=tmp_path / "data", img_size=(64, 96), label_fn="sum-all-modulo10")
    assert small.dataset("test")[1][0].shape == (3, 64, 96) and small.labels("test") == [7, 4, 2]


def test_billiards_bad_files(tmp_path):
    root = make_billiard(tmp_path / "b")
    (root / "train" / "1.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train/1\.json"):
        bmod.Billiards(source="real", data_root=root).dataset("train")
    (root / "valid" / "2.json").write_text(json.dumps([{"position": [1, 2], "number": 12, "color": "red"}]))
    with pytest.raises(DataError, match=r"valid/2\.json"):
        bmod.Billiards(source="real", data_root=root).dataset("val")
    (root / "test" / "0.json").unlink()
    with pytest.raises(DataNotFoundError, match=r"test/0\.json"):
        bmod.Billiards(source="real", data_root=root).dataset("test")


def test_billiards_corrupt_image(tmp_path):
    root = make_billiard(tmp_path / "b")
    (root / "test" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = bmod.Billiards(source="real", data_root=root).dataset("test")
    ds[1]
    with pytest.raises(DataError, match=r"test/2\.png"):
        ds[2]


def test_billiards_missing_layout_and_auto(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataNotFoundError, match=r"train.*--data-root DIR with DIR/\{train,valid,test\}") as e:
        bmod.Billiards(source="real", data_root=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataNotFoundError, match="--data-root"):
        bmod.Billiards(source="real")
    assert bmod.Billiards(source="auto", data_root=tmp_path, **SMALL_BB).source == "synthetic"
    assert "SYNTHETIC" in capsys.readouterr().err
    assert bmod.Billiards(source="auto", data_root=make_billiard(tmp_path / "ok")).source == "real"
