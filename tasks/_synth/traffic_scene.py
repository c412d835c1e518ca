"""Procedural street scenes with at most one small speed-limit sign (the synthetic ``traffic_signs``).

The scene is built so that the class is readable only at full resolution: the sign is a red ring
around a white disc with black digits "50" / "70" / "80", about a sixth of the image height across (14-18 %).
Downsampled 4x, the digits are a few grey pixels and the sign is a red blob. Decoys keep that blob
from being the answer on its own: blue mandatory-sign discs, red warning triangles and red rings
around a non-digit symbol appear with the same odds in every class, including EMPTY.

Every image is a pure function of ``(seed, split, index)``: the scene draws from a numpy generator
seeded with that tuple, so nothing is stored and any worker can render any index. The sign's
placement has its own stream, so :func:`sign_box` answers without rendering.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASS_NAMES = ("EMPTY", "50", "70", "80")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

_RED = (200, 20, 30)
_WHITE = (245, 245, 240)
_BLACK = (15, 15, 15)
_BLUE = (20, 70, 170)


@dataclass(frozen=True)
class SceneConfig:
    size: tuple[int, int]  # (H, W)
    sign_frac: tuple[float, float] = (0.14, 0.18)  # sign diameter / image height
    clutter: int = 12
    # High-contrast distractors at the sign's scale (striped barriers, text boards, chequered panels, dappled
    # foliage): a patch statistic (variance, edges) ranks them with or above the sign, so "where to look" must be
    # learned. 0 keeps the scenes of task version 1 pixel for pixel (no random draws are added).
    textures: tuple[int, int] = (0, 0)  # (min, max) per scene, uniform
    decoys: tuple[int, int] = (0, 2)  # (min, max) sign-shaped decoys per scene, uniform

    def cache_repr(self) -> str:
        """The scene cache's key for this config: version 1's repr when the later fields (textures, decoys) are at their
        defaults, so caches drawn before they existed stay valid (the pixels are the same)."""
        if (self.textures, self.decoys) == (SceneConfig.textures, SceneConfig.decoys):
            return f"SceneConfig(size={self.size!r}, sign_frac={self.sign_frac!r}, clutter={self.clutter!r})"
        return repr(self)


def rng_for(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, SPLIT_CODES[split], int(index), stream])


def label_of(index: int) -> int:
    """Classes cycle with the index: every split is exactly balanced, and so is any prefix of it."""
    return int(index) % len(CLASS_NAMES)


@functools.lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, int(size)))


def _sign_geometry(cfg: SceneConfig, rng: np.random.Generator) -> tuple[float, float, float]:
    """(cx, cy, diameter) in pixels, uniform over positions that keep the whole sign in the image."""
    h, w = cfg.size
    lo, hi = cfg.sign_frac
    d = min(rng.uniform(lo, hi) * h, 0.9 * min(h, w))
    cx = rng.uniform(d / 2, w - d / 2)
    cy = rng.uniform(d / 2, h - d / 2)
    return cx, cy, d


def sign_box(cfg: SceneConfig, seed: int, split: str, index: int) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of the speed-limit sign, or None for EMPTY scenes."""
    if label_of(index) == 0:
        return None
    cx, cy, d = _sign_geometry(cfg, rng_for(seed, split, index, 1))
    return (cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2)


def render(cfg: SceneConfig, seed: int, split: str, index: int) -> Image.Image:
    """The RGB scene for ``(seed, split, index)`` at ``cfg.size``."""
    h, w = cfg.size
    rng = rng_for(seed, split, index, 0)
    horizon = int(h * rng.uniform(0.35, 0.6))
    img = _background(rng, h, w, horizon)
    draw = ImageDraw.Draw(img)
    _road(draw, rng, h, w, horizon)
    lo, hi = cfg.sign_frac
    for _ in range(cfg.clutter):
        _clutter_item(draw, rng, h, w, horizon)
    if cfg.textures[1] > 0:  # its own stream: the rest of the scene draws what it drew in version 1
        trng = rng_for(seed, split, index, 2)
        for _ in range(int(trng.integers(cfg.textures[0], cfg.textures[1] + 1))):
            _texture_item(img, trng, h, w, 0.5 * (lo + hi) * h)
        draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(cfg.decoys[0], cfg.decoys[1] + 1))):  # decoy signs, same odds in every class
        d = rng.uniform(lo, hi) * h * rng.uniform(0.85, 1.2)
        d = min(d, 0.9 * min(h, w))
        cx, cy = rng.uniform(d / 2, w - d / 2), rng.uniform(d / 2, h - d / 2)
        _paste_supersampled(img, cx, cy, d, functools.partial(_decoy, rng=rng), extent=1.25)
    label = label_of(index)
    if label:
        cx, cy, d = _sign_geometry(cfg, rng_for(seed, split, index, 1))
        if rng.random() < 0.6:  # a pole under the sign, as on a real street
            pw = max(1.0, 0.08 * d)
            draw.rectangle([cx - pw / 2, cy, cx + pw / 2, min(h, cy + d * rng.uniform(1.5, 4.0))], fill=(110, 110, 115))
        weight = rng.uniform(0.0, 0.04)  # stroke weight varies, so ink amount does not give the digits away
        _paste_supersampled(img, cx, cy, d, functools.partial(_speed_sign, text=CLASS_NAMES[label], weight=weight))
    # Mild global brightness / colour cast, then a slight blur (camera optics).
    gains = rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, size=3)
    lut = np.clip(np.arange(256)[None, :] * gains[:, None], 0, 255).astype(np.uint8).ravel().tolist()
    img = img.point(lut)
    # 3x3 binomial-like kernel with a random centre weight: 3x cheaper than PIL's GaussianBlur.
    centre = float(rng.uniform(4.0, 16.0))
    return img.filter(ImageFilter.Kernel((3, 3), (1, 2, 1, 2, centre, 2, 1, 2, 1)))


# -- scene parts ---------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int, horizon: int) -> Image.Image:
    if rng.random() < 0.7:
        sky_top = rng.uniform((70, 120, 180), (150, 190, 240))
    else:  # overcast
        sky_top = np.full(3, rng.uniform(150, 210))
    sky_bottom = 0.5 * sky_top + 0.5 * rng.uniform(190, 240)
    ground_top = rng.uniform((80, 90, 60), (150, 150, 130))
    ground_bottom = ground_top * rng.uniform(0.6, 0.9)
    col = np.empty((h, 3), dtype=np.float32)
    col[:horizon] = np.linspace(sky_top, sky_bottom, horizon)
    col[horizon:] = np.linspace(ground_top, ground_bottom, h - horizon)
    arr = np.broadcast_to(col.astype(np.uint8)[:, None, :], (h, w, 3))
    return Image.fromarray(np.ascontiguousarray(arr))


def _road(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, horizon: int) -> None:
    vx = w * rng.uniform(0.3, 0.7)
    left, right = w * rng.uniform(-0.3, 0.25), w * rng.uniform(0.75, 1.3)
    grey = int(rng.uniform(70, 120))
    draw.polygon([(left, h), (right, h), (vx + 2, horizon), (vx - 2, horizon)], fill=(grey, grey, grey + 5))
    mid = (left + right) / 2
    mark = (235, 235, 225) if rng.random() < 0.7 else (230, 190, 40)
    for t0 in np.arange(0.0, 0.9, 0.15):  # dashed centre line, narrowing with distance
        t1 = t0 + 0.07
        p0 = (mid + (vx - mid) * t0, h + (horizon - h) * t0)
        p1 = (mid + (vx - mid) * t1, h + (horizon - h) * t1)
        draw.line([p0, p1], fill=mark, width=max(1, int(h / 80 * (1 - t0))))


def _color(rng: np.random.Generator, lo: int = 30, hi: int = 220) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _clutter_item(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int, horizon: int) -> None:
    kind = rng.choice(6, p=(0.22, 0.18, 0.14, 0.2, 0.14, 0.12))
    if kind == 0:  # building, standing on the horizon, with a few windows
        bw, bh = w * rng.uniform(0.06, 0.25), h * rng.uniform(0.1, 0.4)
        x0, y1 = rng.uniform(-bw / 2, w - bw / 2), horizon + h * rng.uniform(-0.02, 0.05)
        draw.rectangle([x0, y1 - bh, x0 + bw, y1], fill=_color(rng, 60, 200))
        win = _color(rng, 20, 120) if rng.random() < 0.6 else (200, 210, 220)
        ww = bw / 7
        for _ in range(int(rng.integers(0, 7))):
            wx, wy = x0 + rng.uniform(0.1, 0.8) * bw, y1 - bh + rng.uniform(0.1, 0.8) * bh
            draw.rectangle([wx, wy, wx + ww, wy + ww * 1.3], fill=win)
    elif kind == 1:  # pole or tree trunk
        x, pw = rng.uniform(0, w), max(1.0, h * rng.uniform(0.005, 0.02))
        y0 = rng.uniform(0, horizon)
        draw.rectangle([x, y0, x + pw, rng.uniform(horizon, h)], fill=_color(rng, 40, 150))
    elif kind == 2:  # wire / marking line
        p0 = (rng.uniform(0, w), rng.uniform(0, h))
        p1 = (rng.uniform(0, w), rng.uniform(0, h))
        draw.line([p0, p1], fill=_color(rng, 20, 240), width=int(rng.integers(1, max(2, h // 100) + 1)))
    elif kind == 3:  # blob: tree crown, bush
        rx, ry = w * rng.uniform(0.02, 0.1), h * rng.uniform(0.02, 0.12)
        cx, cy = rng.uniform(0, w), rng.uniform(horizon - 0.3 * h, h)
        fill = (int(rng.integers(20, 90)), int(rng.integers(70, 160)), int(rng.integers(20, 80)))
        if rng.random() < 0.3:
            fill = _color(rng)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    elif kind == 4:  # car: body + two wheels, any colour (red ones too)
        cw = w * rng.uniform(0.06, 0.16)
        ch = cw * rng.uniform(0.35, 0.5)
        x0, y1 = rng.uniform(-cw / 2, w - cw / 2), rng.uniform(horizon, h)
        draw.rectangle([x0, y1 - ch, x0 + cw, y1 - ch * 0.25], fill=_color(rng, 20, 230))
        r = ch * 0.22
        for wx in (x0 + cw * 0.22, x0 + cw * 0.78):
            draw.ellipse([wx - r, y1 - 2 * r, wx + r, y1], fill=(25, 25, 25))
    else:  # billboard / box
        bw, bh = w * rng.uniform(0.03, 0.12), h * rng.uniform(0.03, 0.12)
        x0, y0 = rng.uniform(-bw / 2, w - bw / 2), rng.uniform(0, h - bh)
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=_color(rng, 10, 250))


_LETTERS = "ABCDEFGHIJKLMNPRSTUVWXYZ"  # no digits: a board must never read as a speed limit


def _texture_item(img: Image.Image, rng: np.random.Generator, h: int, w: int, d: float) -> None:
    """One high-contrast distractor about the sign's size ``d`` (0.8-1.8x), anywhere in the frame: near-black against
    near-white, so its patches' variance and edge energy match or beat the sign's."""
    kind = int(rng.choice(4))
    bw = int(d * rng.uniform(0.8, 1.8) * (1.4 if kind == 1 else 1.0))
    bh = int(d * rng.uniform(0.8, 1.5) * (0.8 if kind == 1 else 1.0))
    bw, bh = max(4, min(bw, w - 1)), max(4, min(bh, h - 1))
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    if kind == 0:  # striped barrier board: red/white or black/yellow diagonals
        a, b = [((200, 20, 30), (245, 245, 240)), ((15, 15, 15), (240, 200, 30)), ((15, 15, 15), (245, 245, 240))][
            int(rng.integers(3))]
        period = max(3, int(d * rng.uniform(0.12, 0.25)))
        yy, xx = np.mgrid[0:bh, 0:bw]
        stripe = ((xx + (yy if rng.random() < 0.5 else -yy)) // period) % 2 == 0
        arr = np.where(stripe[..., None], np.array(a, np.uint8), np.array(b, np.uint8))
    elif kind == 1:  # text board: black letters on a light board
        board = Image.new("RGB", (bw, bh), tuple(int(v) for v in rng.integers(215, 256, size=3)))
        bd = ImageDraw.Draw(board)
        lines = int(rng.integers(1, 4))
        size = max(6, int(bh / (lines + 0.3)))
        for i in range(lines):
            text = "".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 7))))
            bd.text((2, i * size), text, font=_font(size), fill=_BLACK, stroke_width=max(1, size // 8),
                    stroke_fill=_BLACK)
        img.paste(board, (x0, y0))
        return
    elif kind == 2:  # chequered panel
        cell = max(2, int(d * rng.uniform(0.06, 0.14)))
        yy, xx = np.mgrid[0:bh, 0:bw]
        on = ((yy // cell) + (xx // cell)) % 2 == 0
        dark, light = _color(rng, 0, 40), _color(rng, 215, 256)
        arr = np.where(on[..., None], np.array(dark, np.uint8), np.array(light, np.uint8))
    else:  # dappled foliage in hard sunlight: binary light/shade noise in greens
        grain = int(rng.integers(1, 3))
        mask = rng.random((bh // grain + 1, bw // grain + 1)) < rng.uniform(0.35, 0.65)
        mask = np.kron(mask, np.ones((grain, grain), bool))[:bh, :bw]
        shade = np.array([int(rng.integers(0, 30)), int(rng.integers(15, 50)), int(rng.integers(0, 25))], np.uint8)
        sun = np.array([int(rng.integers(200, 256)), int(rng.integers(230, 256)), int(rng.integers(150, 220))],
                       np.uint8)
        arr = np.where(mask[..., None], sun, shade)
    img.paste(Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))), (x0, y0))


def _decoy(draw: ImageDraw.ImageDraw, cx: float, cy: float, d: float, rng: np.random.Generator) -> None:
    r = d / 2
    kind = rng.choice(3, p=(0.45, 0.3, 0.25))
    if kind == 0:  # red ring around a non-digit symbol (prohibition sign)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_RED)
        ri = r * 0.76
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=_WHITE)
        sym = rng.integers(3)
        s = r * 0.45
        if sym == 0:  # truck silhouette
            draw.rectangle([cx - s, cy - s * 0.55, cx + s * 0.35, cy + s * 0.35], fill=_BLACK)
            draw.rectangle([cx + s * 0.4, cy - s * 0.15, cx + s, cy + s * 0.35], fill=_BLACK)
            for wx in (cx - s * 0.6, cx + s * 0.6):
                draw.ellipse([wx - s * 0.2, cy + s * 0.3, wx + s * 0.2, cy + s * 0.7], fill=_BLACK)
        elif sym == 1:  # horizontal bar
            draw.rectangle([cx - s * 1.1, cy - s * 0.3, cx + s * 1.1, cy + s * 0.3], fill=_BLACK)
        else:  # diagonal slash (no parking / no stopping)
            draw.line([(cx - ri * 0.7, cy - ri * 0.7), (cx + ri * 0.7, cy + ri * 0.7)], fill=_RED,
                      width=max(1, int(r * 0.25)))
    elif kind == 1:  # blue mandatory disc with a white arrow
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_BLUE)
        s = r * 0.55
        lw = max(1, int(r * 0.2))
        if rng.random() < 0.5:
            draw.line([(cx - s, cy), (cx + s * 0.4, cy)], fill=_WHITE, width=lw)
            draw.polygon([(cx + s, cy), (cx + s * 0.2, cy - s * 0.6), (cx + s * 0.2, cy + s * 0.6)], fill=_WHITE)
        else:
            draw.line([(cx, cy + s), (cx, cy - s * 0.4)], fill=_WHITE, width=lw)
            draw.polygon([(cx, cy - s), (cx - s * 0.6, cy - s * 0.2), (cx + s * 0.6, cy - s * 0.2)], fill=_WHITE)
    else:  # red-bordered warning triangle with a black mark
        t = [(cx, cy - r), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)]
        draw.polygon(t, fill=_RED)
        k = 0.68
        ti = [(cx + (x - cx) * k, cy + 0.12 * r + (y - cy) * k) for x, y in t]
        draw.polygon(ti, fill=(250, 235, 170) if rng.random() < 0.5 else _WHITE)
        s = r * 0.12
        draw.rectangle([cx - s, cy - r * 0.25, cx + s, cy + r * 0.25], fill=_BLACK)


def _speed_sign(draw: ImageDraw.ImageDraw, cx: float, cy: float, d: float, text: str, weight: float) -> None:
    r = d / 2
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_RED)
    ri = r * 0.78
    draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=_WHITE)
    size = round(d * 0.5)
    draw.text((cx, cy), text, font=_font(size), fill=_BLACK, anchor="mm", stroke_width=round(weight * size),
              stroke_fill=_BLACK)


_SUPERSAMPLE = 4


def _paste_supersampled(img: Image.Image, cx: float, cy: float, d: float, painter, extent: float = 1.0) -> None:
    """Paint a sign at 4x into a transparent patch, box-filter it down and alpha-paste it.

    Signs and decoys get the same anti-aliased edges, so edge quality is no cue to which is which,
    and digits a dozen pixels high keep their shapes (PIL's own text and ellipses are not anti-aliased)."""
    s = _SUPERSAMPLE
    half = extent * d / 2
    x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
    n = int(np.ceil(cx + half)) - x0 + 1
    m = int(np.ceil(cy + half)) - y0 + 1
    patch = Image.new("RGBA", (n * s, m * s), (0, 0, 0, 0))
    painter(ImageDraw.Draw(patch), (cx - x0) * s, (cy - y0) * s, d * s)
    patch = patch.reduce(s)
    img.paste(patch, (x0, y0), patch)
