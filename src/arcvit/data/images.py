"""One image decoder for training data, evaluation, `predict` and `serve`: any PIL mode to an 8-bit RGB image.

``Image.convert("RGB")`` alone is silently wrong for several modes: it clips 16-bit and 32-bit greys to
0..255 (a 16-bit scan turns almost white), maps float images by value (0..1 turns black), drops alpha
(transparent pixels show whatever colour they happen to hold) and ignores the EXIF orientation (a phone
photo lies on its side). Here:

- EXIF orientation is applied first (``ImageOps.exif_transpose``); an upright image is not copied.
- 16-bit greys (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) are scaled by their range: v / 257 (65535 → 255).
- 32-bit integer greys (``I``) whose values lie in 0..65535 are read the same way (PIL opens some 16-bit
  files as ``I``); any other range is stretched min → 0, max → 255.
- float greys (``F``) whose values lie in [0, 1] are scaled by 255; any other range is stretched min → 0,
  max → 255 (a constant image becomes black); NaN counts as 0.
- alpha (``RGBA``, ``LA``, ``PA``, palette transparency, premultiplied ``RGBa``/``La``) is composited on
  WHITE, as image viewers and browsers show a transparent image on a page.
- every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) goes through PIL's own
  conversion to RGB.

`decode` is the one way a file or an upload becomes pixels (training data, evaluation, `predict`, `serve`).
It refuses, from the header alone, before any pixel is decompressed: an image over PIL's decompression-bomb
limit (``Image.MAX_IMAGE_PIXELS``), and an image whose decoding would take more than a memory budget:
declared width x height x `decode_cost` (the bytes per pixel that decoding its mode and format peaks at,
measured; listed in the README's "Memory bound").
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from arcvit.errors import DataError

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_ROWS = 64  # rows of a 16/32-bit grey converted at a time: the float64 working copy stays small
# Bytes per declared pixel that `decode` peaks at, above the encoded file, by the decoded image's mode
# ("P+alpha": a palette with a transparent entry); measured at 4 M pixels and rounded up
# (tests/test_images.py checks them). A mode not listed is charged the most.
DECODE_COST = {"RGB": 5, "1": 6, "L": 6, "P": 6, "I;16": 9, "I;16B": 9, "I;16L": 9, "I;16N": 9, "CMYK": 9,
               "YCbCr": 9, "LAB": 9, "HSV": 9, "RGBA": 9, "I": 10, "F": 10, "P+alpha": 10, "RGBa": 13,
               "LA": 13, "La": 13, "PA": 13}
# Pillow's WebP decoder holds the file, the decoded frame and a copy of it beside the image: +13 per pixel.
FORMAT_COST = {"WEBP": 13}
BYTES_PER_PIXEL = 9  # the budget per pixel of a pixel limit: RGB, greys, palettes and CMYK fit under it
# PIL's own pixel limit at 9 bytes each (~805 MB): every RGB, grey, palette or CMYK image PIL opens fits.
MAX_DECODE_BYTES = Image.MAX_IMAGE_PIXELS * BYTES_PER_PIXEL


class ImageTooLarge(DataError):
    """An image refused from its header: over PIL's pixel limit, or over the memory budget for decoding."""


def _row_blocks(image: Image.Image) -> Iterator[np.ndarray]:
    """The image's values, ``_ROWS`` rows at a time, as float64 with NaN and +-inf read as 0."""
    width, height = image.size
    for top in range(0, height, _ROWS):
        block = np.asarray(image.crop((0, top, width, min(top + _ROWS, height))), dtype=np.float64)
        yield np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)


def _scaled(values: np.ndarray, mode: str, lo: float, hi: float) -> np.ndarray:
    """``values`` on 0..255, by the whole image's range ``lo``..``hi`` (see the module docstring)."""
    if mode in _SIXTEEN_BIT or (mode == "I" and lo >= 0 and hi <= 65535):
        return values / 257.0
    if mode == "F" and lo >= 0 and hi <= 1:
        return values * 255.0
    return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as mode ``L``, a block of rows at a time: a float64 copy of a whole
    scan would take 8 bytes a pixel, and each step of the arithmetic 8 more."""
    lo, hi = float("inf"), float("-inf")
    for block in _row_blocks(image):
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    out = np.empty((image.height, image.width), dtype=np.uint8)
    for top, block in zip(range(0, image.height, _ROWS), _row_blocks(image)):
        out[top:top + len(block)] = np.clip(np.rint(_scaled(block, image.mode, lo, hi)), 0, 255)
    return Image.fromarray(out, mode="L")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; ``image`` itself, not a copy, when it is upright."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an upright 8-bit RGB image, whatever its mode (see the module docstring)."""
    image = _upright(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return _grey_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, WHITE)
        rgb.paste(rgba, mask=rgba)  # alpha compositing on opaque white, without a third full-size image
        return rgb
    return image.convert("RGB")


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is unreadable by PIL's cheap check (headers, PNG chunk CRCs, the bomb limit), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
    except Exception as e:  # as in decode: any failure of PIL's parsers means the file is unreadable
        return f"{type(e).__name__}: {e}"
    return None


def decode_cost(image: Image.Image) -> int:
    """Bytes per pixel that decoding ``image`` (opened, not loaded) and converting it to RGB peaks at."""
    mode = "P+alpha" if image.mode == "P" and "transparency" in image.info else image.mode
    return DECODE_COST.get(mode, max(DECODE_COST.values())) + FORMAT_COST.get(image.format or "", 0)


def _check_memory(image: Image.Image, name: str, max_bytes: int) -> None:
    width, height = image.size
    needed = width * height * decode_cost(image)
    if needed > max_bytes:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels of mode {image.mode} ({image.format}) would take "
                            f"{needed / 1e6:.0f} MB to decode, over the limit of {max_bytes / 1e6:.0f} MB")


def decode(source: str | Path | bytes, *, name: str | None = None, formats: Sequence[str] | None = None,
           max_bytes: int = MAX_DECODE_BYTES,
           check_size: Callable[[tuple[int, int]], None] | None = None) -> Image.Image:
    """A file (a path) or an upload (bytes) as an upright 8-bit RGB image (`to_rgb`); any failure is one
    `DataError` naming it (``name``; by default the path, or "image"), an `ImageTooLarge` when its header is
    refused.

    ``formats``: the PIL formats tried (default: all). ``check_size(size)``: the caller's own check of the
    declared size, run before the memory budget and before decoding (it raises to refuse)."""
    in_memory = isinstance(source, (bytes, bytearray))
    name = name if name is not None else "image" if in_memory else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = io.BytesIO(source) if in_memory else source
            with Image.open(opened, formats=formats) as image:
                if check_size is not None:
                    check_size(image.size)
                _check_memory(image, name, max_bytes)
                image.load()
                return to_rgb(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{name}: refused: {e}") from None
    except UnidentifiedImageError as e:
        if formats:
            raise DataError(f"{name}: not an image in an accepted format ({', '.join(formats)})") from None
        raise DataError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    except Exception as e:  # PIL's parsers raise many types on bad bytes; any of them means unreadable
        detail = e if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{name}: cannot read image ({detail})") from None


def open_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path``, decoded by `decode` (every format PIL reads, the default memory budget)."""
    return decode(path)
