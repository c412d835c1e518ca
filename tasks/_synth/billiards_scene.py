"""Numbered billiard balls on a green table, written in the on-disk format of DPS's billiard dataset.

DPS (google-research/ptopk_patch_selection, ``lib/datasets/billiard.py``) reads
``{train,valid,test}/{id}.png`` with a ``{id}.json`` beside each image: a JSON list with one object
per ball, of which the label functions use ``position[0]`` (horizontal), ``number`` (1-9) and
``color`` (green, blue, purple, yellow, red, orange). We write exactly that, plus ``position[1]``
and ``radius`` in pixels, so the same loader serves our images and theirs.

Colours are drawn independently of numbers (unlike a real pool set, where the colour would give
the number away at low resolution). The number sits in a white disc, legible at full resolution
and a smudge after 4x downsampling. By default the numbers are drawn so that the default label,
``max-left-right``, is uniform over its 9 classes (with independent uniform numbers, P(max = 9) is
17/81 and P(max = 1) is 1/81).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lwbench.errors import ConfigError

VERSION = 1  # bump when the images change, so cached datasets are regenerated
# How the number is painted (task option ``numbers``): the task version each style is. "small" (version 1): a white
# disc of 0.57 x the ball radius, digits about 12 px tall on the quick profile's balls; the 1000-step quick teacher
# read 18% of them (chance 11%). "large" (version 2): a disc of 0.75 x the radius and heavier strokes, digits about
# 16-20 px, about one 16-px patch, still a few pixels at the selector's 0.3x resolution.
NUMBERS: dict[str, dict] = {
    "small": {"version": 1, "disc": 0.57, "stroke": (0.0, 0.05)},
    "large": {"version": 2, "disc": 0.75, "stroke": (0.04, 0.08)},
}
COLORS = {
    "green": (30, 140, 60),
    "blue": (30, 70, 190),
    "purple": (120, 50, 160),
    "yellow": (235, 200, 30),
    "red": (200, 30, 30),
    "orange": (240, 120, 20),
}
SPLIT_DIRS = {"train": "train", "val": "valid", "test": "test"}  # our split name -> DPS folder
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class BilliardsConfig:
    size: tuple[int, int] = (256, 384)  # (H, W)
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 1000
    n_balls: tuple[int, int] = (3, 6)  # inclusive range
    ball_frac: tuple[float, float] = (0.10, 0.12)  # ball diameter / image height
    balanced: bool = True
    seed: int = 0
    numbers: str = "small"  # a key of NUMBERS

    def digest(self) -> str:
        fields = asdict(self)
        if fields["numbers"] == "small":  # version 1's digest, so its cached datasets stay valid
            del fields["numbers"]
        blob = json.dumps({"version": VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, int(size)))


def sample_balls(cfg: BilliardsConfig, rng: np.random.Generator) -> list[dict]:
    """Non-overlapping balls on the felt, with an unambiguous leftmost and rightmost ball.

    Balls keep a margin from the cushions of at least 5% of the width, so the training crop
    (a translation of up to 4%) never cuts one off."""
    h, w = cfg.size
    rail = 0.06 * h
    for _ in range(1000):
        n = int(rng.integers(cfg.n_balls[0], cfg.n_balls[1] + 1))
        balls: list[dict] = []
        for _ in range(200 * n):
            if len(balls) == n:
                break
            r = rng.uniform(*cfg.ball_frac) * h / 2
            mx, my = rail + r + 0.05 * w, rail + r + 0.05 * h
            x, y = rng.uniform(mx, w - mx), rng.uniform(my, h - my)
            if all((x - b["position"][0]) ** 2 + (y - b["position"][1]) ** 2 > (r + b["radius"] + 0.15 * r) ** 2
                   for b in balls):
                balls.append({"position": [round(x, 2), round(y, 2)], "radius": round(r, 2)})
        if len(balls) < max(2, cfg.n_balls[0]):
            continue
        xs = sorted(b["position"][0] for b in balls)
        if xs[1] - xs[0] < 0.5 * balls[0]["radius"] or xs[-1] - xs[-2] < 0.5 * balls[0]["radius"]:
            continue  # leftmost / rightmost would be a judgement call
        break
    else:  # only with absurd settings (tiny image, huge balls)
        raise ConfigError(f"billiards: cannot place {cfg.n_balls} balls of {cfg.ball_frac} x height on a {h}x{w} "
                          "image; lower n_balls or ball_frac, or raise img_size")
    numbers = rng.integers(1, 10, size=len(balls))
    if cfg.balanced:  # max(number of leftmost, number of rightmost) uniform over 1..9
        left = min(range(len(balls)), key=lambda i: balls[i]["position"][0])
        right = max(range(len(balls)), key=lambda i: balls[i]["position"][0])
        top = int(rng.integers(1, 10))
        other = int(rng.integers(1, top + 1))
        if rng.random() < 0.5:
            top, other = other, top
        numbers[left], numbers[right] = top, other
    names = list(COLORS)
    for b, num in zip(balls, numbers, strict=True):
        b["number"] = int(num)
        b["color"] = names[int(rng.integers(len(names)))]
    return [{"position": b["position"], "number": b["number"], "color": b["color"], "radius": b["radius"]}
            for b in balls]


def render(cfg: BilliardsConfig, balls: list[dict], rng: np.random.Generator) -> Image.Image:
    h, w = cfg.size
    img = _table(cfg, rng)
    for b in balls:
        _paste_ball(img, b, rng, NUMBERS[cfg.numbers])
    gains = rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, size=3)
    lut = np.clip(np.arange(256)[None, :] * gains[:, None], 0, 255).astype(np.uint8).ravel().tolist()
    return img.point(lut)


def _table(cfg: BilliardsConfig, rng: np.random.Generator) -> Image.Image:
    """Felt lit from a random point (a smooth vignette), wooden rails, six pockets.

    The lighting is computed at 1/8 resolution and upsampled: the felt is smooth anyway, and a smooth
    image compresses ~6x better as PNG (mottled felt made the default dataset 285 MB)."""
    h, w = cfg.size
    felt = np.array(rng.uniform((20, 100, 45), (45, 140, 70)), dtype=np.float32)
    sh, sw = h // 8 + 2, w // 8 + 2
    ly, lx = rng.uniform(-0.4, 0.4, size=2)
    yy = np.linspace(-1, 1, sh, dtype=np.float32)[:, None] - ly
    xx = np.linspace(-1, 1, sw, dtype=np.float32)[None, :] - lx
    shade = 1.05 - rng.uniform(0.12, 0.25) * (xx**2 + yy**2)
    small = np.clip(felt * shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    rail = 0.06 * h
    wood = tuple(int(v) for v in rng.uniform((80, 40, 15), (130, 75, 35)))
    for box in ([0, 0, w, rail], [0, h - rail, w, h], [0, 0, rail, h], [w - rail, 0, w, h]):
        d.rectangle(box, fill=wood)
    inner = tuple(int(v * 0.75) for v in felt)
    d.rectangle([rail, rail, w - rail, h - rail], outline=inner, width=max(1, int(0.012 * h)))
    pr = 0.045 * h
    for px, py in ((rail, rail), (w / 2, rail * 0.8), (w - rail, rail), (rail, h - rail), (w / 2, h - rail * 0.8),
                   (w - rail, h - rail)):
        d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=(12, 12, 12))
    return img


def number_disc_radius(ball: dict, numbers: str) -> float:
    """Radius in pixels of the white disc that carries the ball's number (the part of the ball one reads)."""
    return NUMBERS[numbers]["disc"] * ball["radius"]


def _paste_ball(img: Image.Image, ball: dict, rng: np.random.Generator, style: dict) -> None:
    """A shaded ball with its number, painted at 4x and box-filtered down (PIL draws no anti-aliasing)."""
    s = _SUPERSAMPLE
    (x, y), r = ball["position"], ball["radius"]
    x0, y0 = int(np.floor(x - 1.3 * r)), int(np.floor(y - 1.3 * r))
    n = int(np.ceil(2.6 * r)) + 2
    patch = Image.new("RGBA", (n * s, n * s), (0, 0, 0, 0))
    d = ImageDraw.Draw(patch)
    cx, cy, R = (x - x0) * s, (y - y0) * s, r * s
    d.ellipse([cx - R + 0.15 * R, cy - R + 0.25 * R, cx + R + 0.25 * R, cy + R + 0.3 * R], fill=(0, 0, 0, 90))
    base = np.array(COLORS[ball["color"]], dtype=np.float32)
    for k in range(6):  # darker rim -> lighter centre, offset towards the light (upper left)
        t = k / 6
        c = tuple(int(v) for v in np.clip(base * (0.55 + 0.6 * t), 0, 255))
        rr = R * (1 - 0.55 * t)
        ox, oy = -0.25 * R * t, -0.25 * R * t
        d.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=c)
    rw = style["disc"] * R
    d.ellipse([cx - rw, cy - rw, cx + rw, cy + rw], fill=(245, 245, 238))
    size = round(0.85 * 2 * rw)
    weight = rng.uniform(*style["stroke"])  # varies, so the amount of ink is a weak cue to the number
    d.text((cx, cy + 0.04 * R), str(ball["number"]), font=_font(size), fill=(10, 10, 10), anchor="mm",
           stroke_width=round(weight * size), stroke_fill=(10, 10, 10))
    hr = 0.16 * R
    hx, hy = cx - 0.5 * R, cy - 0.55 * R
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255, 170))
    patch = patch.reduce(s)
    img.paste(patch, (x0, y0), patch)


def generate(cfg: BilliardsConfig, out: Path, progress=None) -> float:
    """Write the dataset to ``out`` (which must not exist) atomically: everything goes to a temporary
    sibling folder that is renamed into place when complete, so an interrupted run leaves no partial
    dataset behind and two concurrent runs cannot interleave. Returns seconds spent."""
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        for split, folder in SPLIT_DIRS.items():
            (tmp / folder).mkdir(parents=True)
            code = {"train": 0, "val": 1, "test": 2}[split]
            for i in range(getattr(cfg, f"n_{split}")):
                rng = np.random.default_rng([int(cfg.seed) % 2**63, code, i])
                balls = sample_balls(cfg, rng)
                render(cfg, balls, rng).save(tmp / folder / f"{i}.png", compress_level=3)
                (tmp / folder / f"{i}.json").write_text(json.dumps(balls))
                if progress is not None:
                    progress(1)
        (tmp / "settings.json").write_text(json.dumps({"version": VERSION, **asdict(cfg)}, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "settings.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0
