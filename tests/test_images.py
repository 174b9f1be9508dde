"""arcvit.data.images: every PIL mode decodes to the 8-bit RGB pixels its range means (values checked, not
just "no crash"), EXIF orientation is applied, and decompression bombs are refused. Files are written to disk
and read back, as training, eval and predict read them."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcvit.data.images import image_problem, open_rgb, to_rgb
from arcvit.data.layouts import load_split
from arcvit.errors import DataError

RAMP16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # → 0, 1, 128, 255
EXPECTED = np.array([[0, 1, 128, 255]], dtype=np.uint8)


def grey16(mode: str) -> Image.Image:
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, RAMP16.shape[::-1], RAMP16.astype(dtype).tobytes())


def rgb(image: Image.Image) -> np.ndarray:
    out = open_rgb(image) if isinstance(image, Path) else to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out)


def grey_equals(array: np.ndarray, expected: np.ndarray) -> None:
    assert array.shape == (*expected.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(array[..., c], expected)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_png_scaled_by_257(tmp_path, mode):
    image = grey16(mode)
    path = tmp_path / "grey16.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")  # PIL keeps the 16 bits (I;16 or I)
    grey_equals(rgb(path), EXPECTED)
    grey_equals(rgb(image), EXPECTED)


def test_32bit_int_tiff(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray(RAMP16.astype(np.int32), mode="I").save(path)
    grey_equals(rgb(path), EXPECTED)  # 0..65535: read as 16-bit
    wide = np.array([[-1000, 0, 1000, 3000]], dtype=np.int32)
    Image.fromarray(wide, mode="I").save(path)
    grey_equals(rgb(path), np.array([[0, 64, 128, 255]], dtype=np.uint8))  # other ranges: min-max stretch


def test_float_tiff(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32), mode="F").save(path)
    grey_equals(rgb(path), np.array([[0, 128, 255, 64]], dtype=np.uint8))  # [0, 1] → ×255
    Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32), mode="F").save(path)
    grey_equals(rgb(path), np.array([[0, 128, 255, 128]], dtype=np.uint8))  # stretched; NaN counts as 0


def test_rgba_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    np.testing.assert_array_equal(rgb(path)[0], [[255, 0, 0], [255, 255, 255], [127, 127, 127]])


def test_la_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[10, 255], [10, 0]]], dtype=np.uint8), mode="LA").save(path)
    np.testing.assert_array_equal(rgb(path)[0], [[10, 10, 10], [255, 255, 255]])


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([200, 10, 20, 0, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path)
    np.testing.assert_array_equal(rgb(path)[0], [[200, 10, 20], [0, 0, 0]])
    image.save(path, transparency=1)  # palette entry 1 transparent: white, like any other alpha
    np.testing.assert_array_equal(rgb(path)[0], [[200, 10, 20], [255, 255, 255]])


def test_cmyk_jpeg_and_bilevel(tmp_path):
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    np.testing.assert_array_equal(rgb(path)[0, 0], [255, 0, 0])
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(path)
    np.testing.assert_array_equal(rgb(path)[0], [[0, 0, 0], [255, 255, 255]])


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = [255, 0, 0]  # red top-left of a 3-wide, 2-high image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100, subsampling=0)
    out = rgb(path)
    assert out.shape == (3, 2, 3)  # upright: 2 wide, 3 high
    assert out[0, 1, 0] > 200 and out[0, 1, 1] < 60  # red now at the top-right
    assert rgb(out_image := open_rgb(path)).shape == (3, 2, 3)  # decoding twice does not rotate twice
    assert out_image.size == (2, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 20_000])  # 1.4e8 pixels: PIL only warns; 4e8: PIL raises
def test_decompression_bomb_refused(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(DataError, match="bomb.png: refused: Image size") as info:
        open_rgb(path)
    assert "\n" not in str(info.value)
    assert "Decompression" in image_problem(path)


def test_training_data_uses_the_decoder(tmp_path):
    """A 16-bit image in a VTAB-1k list reaches the transform scaled, not clipped to white."""
    task = tmp_path / "grey16"
    (task / "images").mkdir(parents=True)
    grey16("I;16").save(task / "images" / "0.png")
    grey16("I;16").save(task / "images" / "1.png")
    (task / "test.txt").write_text("images/0.png 0\nimages/1.png 1\n")
    image, _ = load_split(tmp_path, "grey16", "test", None)[0]
    grey_equals(np.asarray(image), EXPECTED)
