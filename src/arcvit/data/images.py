"""One image decoder for training data, evaluation and `predict`: any PIL mode to an 8-bit RGB image.

``Image.convert("RGB")`` alone is silently wrong for several modes: it clips 16-bit and 32-bit greys to
0..255 (a 16-bit scan turns almost white), maps float images by value (0..1 turns black), drops alpha
(transparent pixels show whatever colour they happen to hold) and ignores the EXIF orientation (a phone
photo lies on its side). Here:

- EXIF orientation is applied first (``ImageOps.exif_transpose``).
- 16-bit greys (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) are scaled by their range: v / 257 (65535 → 255).
- 32-bit integer greys (``I``) whose values lie in 0..65535 are read the same way (PIL opens some 16-bit
  files as ``I``); any other range is stretched min → 0, max → 255.
- float greys (``F``) whose values lie in [0, 1] are scaled by 255; any other range is stretched min → 0,
  max → 255 (a constant image becomes black); NaN counts as 0.
- alpha (``RGBA``, ``LA``, ``PA``, palette transparency, premultiplied ``RGBa``/``La``) is composited on
  WHITE, as image viewers and browsers show a transparent image on a page.
- every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) goes through PIL's own
  conversion to RGB.
- images larger than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused, never decoded.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from arcvit.errors import DataError

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _stretch(values: np.ndarray) -> np.ndarray:
    """min → 0, max → 255; a constant image becomes 0."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as mode ``L``, scaled by its range (see the module docstring)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255.0
    else:
        scaled = _stretch(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an upright 8-bit RGB image, whatever its mode (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return _grey_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is unreadable by PIL's cheap check (headers, PNG chunk CRCs, the bomb limit), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
    except Exception as e:  # as in open_rgb: any failure of PIL's parsers means the file is unreadable
        return f"{type(e).__name__}: {e}"
    return None


def open_rgb(path: str | Path) -> Image.Image:
    """Decode the image file at ``path`` with `to_rgb`; any failure is one `DataError` naming the file.

    An image over PIL's decompression-bomb limit is refused (PIL only warns between 1x and 2x the limit).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused: {e}") from None
    except FileNotFoundError as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    except Exception as e:  # PIL's parsers raise many types on bad bytes; any of them means unreadable
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
