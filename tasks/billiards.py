"""``billiards``: a relation between numbered balls on a table (the billiard task of DPS).

Cordonnier et al., "Differentiable Patch Selection for Image Recognition" (CVPR 2021) use it to test
reasoning *across* selected patches: with the default label, ``max-left-right``, a model must find
the leftmost and the rightmost ball, read both numbers and output the larger. The numbers are
legible only at full resolution, and the answer needs two far-apart patches at once.

Both sources share one loader of DPS's on-disk format (``{train,valid,test}/{id}.png`` + ``{id}.json``,
see ``tasks/_synth/billiards_scene.py``): ``real`` reads DPS's released data under ``--data-root``;
``synthetic`` first writes our own rendering of it into the cache, once per settings and seed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lwbench.errors import ConfigError, DataError, DataNotFoundError
from lwbench.paths import cache_dir
from lwbench.registry import register_task
from lwbench.task import Task, normalize
from lwbench.tasks import _imageio
from lwbench.tasks._synth import billiards_scene
from lwbench.tasks._synth.billiards_scene import SPLIT_DIRS, BilliardsConfig

Ball = dict[str, Any]  # {"position": [x, y, ...], "number": 1-9, "color": str, ...}

MIN_COLORS = ("green", "blue", "purple")
MAX_COLORS = ("yellow", "red", "orange")

log = logging.getLogger("lwbench")


# -- label functions (DPS: ptopk_patch_selection/lib/datasets/billiard.py) -----------------------------
# "Leftmost" / "rightmost" compare position[0]; on a tie the ball listed first wins, as with Python's
# min/max in the original. Labels are 0-based: a ball number n (1-9) is class n - 1.
def _leftmost(balls: list[Ball]) -> Ball:
    return min(balls, key=lambda b: b["position"][0])


def _rightmost(balls: list[Ball]) -> Ball:
    return max(balls, key=lambda b: b["position"][0])


def max_left_right(balls: list[Ball]) -> int:
    """The larger of the numbers on the leftmost and the rightmost ball."""
    return max(_leftmost(balls)["number"], _rightmost(balls)["number"]) - 1


def rightmost_number(balls: list[Ball]) -> int:
    """The number on the rightmost ball."""
    return _rightmost(balls)["number"] - 1


def sum_all_modulo10(balls: list[Ball]) -> int:
    """Last digit of the sum of all numbers (10 classes, 0-9, not shifted)."""
    return sum(b["number"] for b in balls) % 10


def left_color_min_max(balls: list[Ball]) -> int:
    """The smallest number on the table if the leftmost ball is green, blue or purple; the largest if
    it is yellow, red or orange. Any other colour is an error, as in DPS."""
    color = _leftmost(balls)["color"]
    if color in MIN_COLORS:
        return min(b["number"] for b in balls) - 1
    if color in MAX_COLORS:
        return max(b["number"] for b in balls) - 1
    raise ValueError(f"leftmost ball has colour '{color}'; left-color-min-max knows {MIN_COLORS + MAX_COLORS}")


LABEL_FNS: dict[str, tuple[Callable[[list[Ball]], int], int]] = {
    "max-left-right": (max_left_right, 9),
    "rightmost-number": (rightmost_number, 9),
    "sum-all-modulo10": (sum_all_modulo10, 10),
    "left-color-min-max": (left_color_min_max, 9),
}


def read_balls(path: Path) -> list[Ball]:
    """One ``{id}.json``: a non-empty JSON list of balls with ``position``, ``number`` and ``color``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataNotFoundError(f"billiards: {path} not found; every {{id}}.png needs its {{id}}.json") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"billiards: cannot parse {path}: {exc}; fix or delete the image and its json") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"billiards: {path} must hold a non-empty JSON list of balls, got {type(data).__name__}")
    for k, b in enumerate(data):
        ok = (isinstance(b, dict) and isinstance(b.get("position"), list) and b["position"]
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b["position"])
              and isinstance(b.get("number"), int) and not isinstance(b["number"], bool) and 1 <= b["number"] <= 9
              and isinstance(b.get("color"), str))
        if not ok:
            raise DataError(f"billiards: ball {k} in {path} is not {{'position': [x, y], 'number': 1-9, "
                            f"'color': str}}: {json.dumps(b)[:120]}")
    return data


# -- dataset -------------------------------------------------------------------------------------------
class _BilliardsFolder(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], img_size: tuple[int, int], train: bool):
        self.paths, self.labels, self.img_size, self.train = paths, labels, img_size, train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = _imageio.to_tensor(_imageio.read_image(self.paths[i], self.img_size))
        if self.train:  # DPS pads 1000 px images to 1100 and crops 1000 back: a shift of up to 5%
            x = _imageio.light_augment(x, max_shift=0.04, jitter=0.05)
        return normalize(x), self.labels[i]


@register_task("billiards")
class Billiards(Task):
    description = "numbered billiard balls; label = relation between balls (DPS), numbers legible only at high res"
    num_classes = 9  # class default; instances set it from label_fn
    object_classes = 9  # objects() labels: ball number - 1
    default_img_size = (256, 384)  # synthetic; the real source defaults to the size of its images
    data_dir_name = "billiard"  # the folder DPS extracts billiard.tar.xz into
    expected_layout = ("DIR/{train,valid,test}/{id}.png with {id}.json beside each (a JSON list of balls with "
                       "'position', 'number', 'color'), as in DPS's billiard.tar.xz; "
                       "DIR is --data-root, --data-root/billiard or --data-root/billiards")

    def __init__(self, source: str = "auto", data_root=None, img_size=None, seed: int = 0, **opts: Any) -> None:
        super().__init__(source, data_root, img_size, seed, **opts)
        self._validate_opts()
        fn_name = self.opts["label_fn"]
        self.label_fn, self.num_classes = LABEL_FNS[fn_name]
        first = 0 if fn_name == "sum-all-modulo10" else 1
        self.class_names = tuple(str(first + i) for i in range(self.num_classes))
        self._index: dict[str, tuple[list[Path], list[list[Ball]]]] = {}
        if img_size is None and self.source == "real":  # native resolution of the released images
            self.img_size = _imageio.image_size(self._split_files(self.real_root(), "train")[0][0])

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {
            "label_fn": "max-left-right",  # one of LABEL_FNS
            "n_train": 4000,  # synthetic split sizes
            "n_val": 500,
            "n_test": 1000,
            "n_balls": (3, 6),  # synthetic: balls per image, inclusive range
            "ball_frac": (0.10, 0.12),  # synthetic: ball diameter / image height
            "balanced": True,  # synthetic: numbers drawn so that max-left-right is uniform over 1-9
            # synthetic: how the numbers are painted, "small" (task version 1) or "large" (version 2: a larger
            # number disc, heavier digits; see billiards_scene.NUMBERS)
            "numbers": "small",
        }

    def _validate_opts(self) -> None:
        o = self.opts
        numbers = str(o.pop("numbers"))
        if numbers not in billiards_scene.NUMBERS:
            raise ConfigError(f"billiards: numbers must be one of {', '.join(billiards_scene.NUMBERS)}, "
                              f"got {numbers!r}")
        self.numbers = numbers
        if numbers != "small" and self.source == "synthetic":
            # Only the large numbers name themselves: version 1's options stay as they were, so its teacher id,
            # its shipped teacher and its cached dataset stay valid; the real source paints nothing.
            o["numbers"] = numbers
            self.version = billiards_scene.NUMBERS[numbers]["version"]
        if o["label_fn"] not in LABEL_FNS:
            raise ConfigError(f"billiards: unknown label_fn '{o['label_fn']}'; use one of {', '.join(LABEL_FNS)}")
        for key in ("n_train", "n_val", "n_test"):
            try:
                o[key] = int(o[key])
            except (TypeError, ValueError):
                raise ConfigError(f"billiards: {key} must be a positive integer, got {o[key]!r}") from None
            if o[key] < 1:
                raise ConfigError(f"billiards: {key} must be a positive integer, got {o[key]!r}")
        o["n_balls"] = _pair(o["n_balls"], int, "n_balls")
        if not 2 <= o["n_balls"][0] <= o["n_balls"][1] <= 12:
            raise ConfigError(f"billiards: n_balls must be 'lo,hi' with 2 <= lo <= hi <= 12, got {o['n_balls']}")
        o["ball_frac"] = _pair(o["ball_frac"], float, "ball_frac")
        if not 0.02 <= o["ball_frac"][0] <= o["ball_frac"][1] <= 0.25:
            raise ConfigError(f"billiards: ball_frac must be 'lo,hi' within [0.02, 0.25], got {o['ball_frac']}")
        if isinstance(o["balanced"], str):
            o["balanced"] = o["balanced"].lower() in ("1", "true", "yes")
        o["balanced"] = bool(o["balanced"])

    # -- layout ----------------------------------------------------------------------------------
    def real_root(self) -> Path | None:
        if self.data_root is None:
            return None
        for sub in ("billiard", "billiards"):
            if (self.data_root / sub).is_dir():
                return self.data_root / sub
        return self.data_root

    def check_layout(self, root: Path) -> None:
        for folder in SPLIT_DIRS.values():
            d = root / folder
            if not d.is_dir() or not any(p.stem.isdigit() for p in d.glob("*.png")):
                raise DataNotFoundError(f"billiards: no {{id}}.png images in {d}; pass --data-root DIR with "
                                        f"{self.expected_layout}")

    @staticmethod
    def _split_files(root: Path, split: str) -> list[tuple[Path, Path]]:
        d = root / SPLIT_DIRS[split]
        ids = sorted(int(p.stem) for p in d.glob("*.png") if p.stem.isdigit())  # numeric order, as DPS
        return [(d / f"{i}.png", d / f"{i}.json") for i in ids]

    # -- synthetic data on disk --------------------------------------------------------------------
    def generator_config(self) -> BilliardsConfig:
        o = self.opts
        return BilliardsConfig(size=self.img_size, n_train=o["n_train"], n_val=o["n_val"], n_test=o["n_test"],
                               n_balls=o["n_balls"], ball_frac=o["ball_frac"], balanced=o["balanced"], seed=self.seed,
                               numbers=self.numbers)

    def synthetic_root(self) -> Path:
        """The generated dataset for these settings and seed, written on first use (atomically)."""
        cfg = self.generator_config()
        out = cache_dir() / "synthetic" / "billiards" / cfg.digest()
        if not (out / "settings.json").is_file():
            total = cfg.n_train + cfg.n_val + cfg.n_test
            log.info("generating synthetic billiards (%d images at %dx%d) into %s", total, *cfg.size, out)
            secs = billiards_scene.generate(cfg, out)
            log.info("generated synthetic billiards in %.1f s", secs)
        return out

    def data_dir(self) -> Path:
        return self.real_root() if self.source == "real" else self.synthetic_root()

    # -- data ------------------------------------------------------------------------------------
    def _split(self, split: str) -> tuple[list[Path], list[list[Ball]]]:
        if split not in SPLIT_DIRS:
            raise ConfigError(f"billiards: unknown split '{split}'; use one of {', '.join(SPLIT_DIRS)}")
        if split not in self._index:
            files = self._split_files(self.data_dir(), split)
            if not files:
                raise DataNotFoundError(f"billiards: no {{id}}.png images in {self.data_dir() / SPLIT_DIRS[split]}")
            self._index[split] = ([png for png, _ in files], [read_balls(js) for _, js in files])
        return self._index[split]

    def labels(self, split: str) -> list[int]:
        paths, balls = self._split(split)
        out = []
        for png, bs in zip(paths, balls, strict=True):
            try:
                out.append(int(self.label_fn(bs)))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"billiards: label_fn {self.opts['label_fn']} fails on {png.with_suffix('.json')}: "
                                f"{exc}") from None
        return out

    def dataset(self, split: str, train: bool = False) -> Dataset:
        paths, _ = self._split(split)
        return _BilliardsFolder(paths, self.labels(split), self.img_size, train)

    def objects(self, split: str, index: int) -> list[dict]:
        """Balls of item ``index`` as ``{"box": (x0, y0, x1, y1), "label": number - 1, "color": str}`` in
        pixels of the un-augmented ``img_size`` image. Needs ``radius`` in the JSON (ours has it).

        With ``numbers=large`` (version 2) each ball also has ``read_box``, the box of its number disc: the
        teacher's per-patch losses label those cells, the ones that show the number, instead of the whole ball,
        whose rim cells show only its colour (``lwbench.training.teacher.cell_targets``)."""
        paths, balls = self._split(split)
        h0, w0 = _imageio.image_size(paths[index])
        sy, sx = self.img_size[0] / h0, self.img_size[1] / w0
        out = []
        for b in balls[index]:
            if "radius" not in b or len(b["position"]) < 2:
                raise DataError(f"billiards: {paths[index].with_suffix('.json')} has no ball radius / y position; "
                                "objects() needs them")
            (x, y), r = b["position"][:2], b["radius"]
            obj = {"box": ((x - r) * sx, (y - r) * sy, (x + r) * sx, (y + r) * sy), "label": b["number"] - 1,
                   "color": b["color"]}
            if self.version >= 2:
                rd = billiards_scene.number_disc_radius(b, self.numbers)
                obj["read_box"] = ((x - rd) * sx, (y - rd) * sy, (x + rd) * sx, (y + rd) * sy)
            out.append(obj)
        return out


def _pair(value: Any, cast: type, name: str) -> tuple:
    try:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        out = tuple(cast(v) for v in items)
    except ValueError:
        out = ()
    if len(out) == 1:
        out = (out[0], out[0])
    if len(out) != 2:
        raise ConfigError(f"billiards: {name} must be 'lo,hi', got {value!r}")
    return out
