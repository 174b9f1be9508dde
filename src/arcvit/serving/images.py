"""Decoding untrusted uploads with the decoder training, evaluation and `predict` use, under the server's limits.

The upload is decoded by ``arcvit.data.images.decode`` (so one image gets one answer, whichever command reads
it), with three limits of the server's own, all checked from the header before any pixel is decompressed: the
pixel budget (a small PNG that would expand to gigabytes, a decompression bomb), what the model's resize would
make of the image (``serving/pixels.py``), and the memory decoding its mode and format takes (the pixel budget
x 9 bytes). Only the formats the README lists are opened: PIL would otherwise also try EPS/PostScript (which
runs Ghostscript), PSD, ICO, PCX and a dozen more.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image

from arcvit.data.images import BYTES_PER_PIXEL, ImageTooLarge, decode
from arcvit.errors import DataError

MAX_PIXELS = 36_000_000  # 6000 x 6000: far above any model input, far below a memory problem
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what an upload may be (README, "Serving")
# The most memory decoding and transforming one upload takes, above the upload's own bytes, per pixel of the
# budget: decoding peaks at `arcvit.data.images.decode_cost` bytes per declared pixel (refused beyond this
# budget); the decoded image and the model's resize of it (within the pixel budget) then take 4 bytes a pixel
# each (tests/test_serve_hostile.py checks the bound).
DECODE_BYTES_PER_PIXEL = BYTES_PER_PIXEL


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

    def check_size(size: tuple[int, int]) -> None:
        width, height = size
        if width * height > max_pixels:
            raise UploadError(f"image: {width}x{height} pixels is over the limit of {max_pixels} "
                              "(a decompression bomb?)", status=413)
        scaled = resized(size) if resized is not None else 0
        if scaled > max_pixels:
            raise UploadError(f"image: {width}x{height} pixels would be resized to {scaled} pixels for this "
                              f"model, over the limit of {max_pixels} (crop it closer to square)", status=422)
    try:
        return decode(data, name="image", formats=FORMATS, max_bytes=max_pixels * DECODE_BYTES_PER_PIXEL,
                      check_size=check_size)
    except UploadError:
        raise
    except ImageTooLarge as e:
        raise UploadError(str(e), status=413) from None
    except DataError as e:
        raise UploadError(str(e)) from None
