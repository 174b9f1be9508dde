"""Decoding untrusted uploads: a size cap before reading, a pixel cap before decoding, any decoder error a 4xx.

PIL reads the header lazily, so an image's size is known before its pixels are decompressed: a small PNG that
would expand to gigabytes (a decompression bomb) is refused from its header alone.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from arcvit.errors import DataError

MAX_PIXELS = 36_000_000  # 6000 x 6000: far above any model input, far below a memory problem


class UploadError(DataError):
    """An upload that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The upload as an RGB image, fully decoded; UploadError for anything unreadable or too large."""
    if not data:
        raise UploadError("image: the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"image: {width}x{height} pixels is over the limit of {max_pixels} "
                                  "(a decompression bomb?)", status=413)
            image.load()
            return image.convert("RGB")
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(f"image: refused as a decompression bomb ({e})", status=413) from None
    except Exception as e:  # noqa: BLE001  any decoder failure on untrusted bytes is a bad upload, not a crash
        # PIL names the in-memory buffer (its address) in some messages: keep only what says why
        detail = str(e).split(" <_io.")[0] if isinstance(e, UnidentifiedImageError) else str(e)
        raise UploadError(f"image: not a readable image ({type(e).__name__}: {detail})") from None
