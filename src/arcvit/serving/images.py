"""Decoding untrusted uploads: a size cap before reading, a pixel cap before decoding, any decoder error a 4xx.

PIL reads the header lazily, so an image's size is known before its pixels are decompressed: a small PNG that
would expand to gigabytes (a decompression bomb), or a thin one that the model's resize would blow up
(``serving/pixels.py``), is refused from its header alone. Only the formats the README lists are opened: PIL
would otherwise also try EPS/PostScript (which runs Ghostscript), PSD, ICO, PCX and a dozen more.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

from PIL import Image, UnidentifiedImageError

from arcvit.errors import DataError

MAX_PIXELS = 36_000_000  # 6000 x 6000: far above any model input, far below a memory problem
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what an upload may be (README, "Serving")
# The most memory decoding and transforming one upload takes, above the upload's own bytes, per pixel of the
# budget: PIL holds 4 bytes per pixel for RGB, RGBA, CMYK and 32-bit greys; the decoded image and its RGB
# copy (or its EXIF-rotated copy, or a resize output within the budget) are alive together at the peak
# (measured: 8.3 bytes per pixel; tests/test_serve_hostile.py checks the bound).
DECODE_BYTES_PER_PIXEL = 9


class UploadError(DataError):
    """An upload that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS,
                 resized: Callable[[tuple[int, int]], int] | None = None) -> Image.Image:
    """The upload as an RGB image, fully decoded; UploadError for anything unreadable or too large.

    ``resized(size)``: the most pixels the model's transform will hold for an image of that size (checked
    against ``max_pixels`` too, before decoding)."""
    if not data:
        raise UploadError("image: the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"image: {width}x{height} pixels is over the limit of {max_pixels} "
                                  "(a decompression bomb?)", status=413)
            scaled = resized((width, height)) if resized is not None else 0
            if scaled > max_pixels:
                raise UploadError(f"image: {width}x{height} pixels would be resized to {scaled} pixels for this "
                                  f"model, over the limit of {max_pixels} (crop it closer to square)", status=422)
            image.load()
            return image.convert("RGB")
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(f"image: refused as a decompression bomb ({e})", status=413) from None
    except Exception as e:  # noqa: BLE001  any decoder failure on untrusted bytes is a bad upload, not a crash
        if isinstance(e, UnidentifiedImageError):
            raise UploadError(f"image: not an image in an accepted format ({', '.join(FORMATS)})") from None
        raise UploadError(f"image: not a readable image ({type(e).__name__}: {e})") from None
