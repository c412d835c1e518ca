"""Image reading and light augmentation shared by the image-classification tasks.

Reading goes through one function so that every unreadable file becomes a one-line
:class:`~lwbench.errors.DataError` naming the file (PIL decodes lazily, so a truncated JPEG only
fails at ``load()``, deep inside a DataLoader worker, with a message that names no file).
Augmentations draw from torch's RNG, which DataLoader seeds per worker (numpy's is not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lwbench.errors import DataError, DataNotFoundError


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` to RGB, resized to ``size`` = (H, W) when given.

    For JPEGs the decoder is asked for the smallest DCT scale (1/2, 1/4, 1/8) still at least
    ``size``: decoding a 1280x960 frame for a 320x240 input is then about 4x faster, and the
    final resize stays area-averaged."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size[1], size[0]))
            img = _to_rgb(img, path)
    except FileNotFoundError:
        raise DataNotFoundError(f"image file not found: {path}") from None
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DataError(f"cannot read image {path}: {exc}; replace or delete the file") from None
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """``img`` as 8-bit RGB. PIL's ``convert("RGB")`` clips a 16-bit greyscale PNG (mode ``I;16``, or ``I`` in
    older Pillow) to 0..255, which turns nearly every pixel white; keep its high byte instead, as PIL itself does
    for 48-bit RGB and 64-bit RGBA PNGs. Other high-bit modes (32-bit integer or float, from TIFF and the like)
    have no scale to assume, so they are refused naming the file."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        arr = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit float"
        raise DataError(f"cannot read image {path}: {kind} pixels (PIL mode {img.mode}) have no 8-bit scale to "
                        f"assume; save it as an 8-bit (or 16-bit PNG) image")
    return img.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DataNotFoundError(f"image file not found: {path}") from None
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}; replace or delete the file") from None
    return h, w


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def light_augment(x: torch.Tensor, max_shift: float = 0.04, jitter: float = 0.1) -> torch.Tensor:
    """Random translation and colour jitter of a float (3, H, W) image in [0, 1].

    No flips and no rotations: digits read mirrored are other symbols, and left/right is
    the label in billiards. The translation pads by replicating the border (as in IPS's
    ``RandomAffine(translate=...)`` recipe, but without black bands a model could key on).
    """
    _, h, w = x.shape
    sy, sx = round(max_shift * h), round(max_shift * w)
    if sy or sx:
        dy = int(torch.randint(-sy, sy + 1, ()).item()) if sy else 0
        dx = int(torch.randint(-sx, sx + 1, ()).item()) if sx else 0
        padded = F.pad(x[None], (sx, sx, sy, sy), mode="replicate")[0]
        x = padded[:, sy + dy: sy + dy + h, sx + dx: sx + dx + w]
    if jitter > 0:
        b, c, s = (1.0 + (torch.rand(3) * 2 - 1) * jitter).tolist()
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = gray + (x - gray) * s  # saturation
        x = (x - x.mean()) * c + x.mean()  # contrast
        x = x * b  # brightness
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()
