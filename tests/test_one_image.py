"""One image, one answer (issue 28): `predict`, the data loader behind `train`/`eval` and `serve` decode every
mode through one decoder (``arcvit.data.images.decode``) and feed the model the same tensor; and decoding
memory is bounded from the header for every accepted format (a small file declaring a huge float TIFF is
refused before any pixel is decompressed)."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving_support import BACKBONE, TASKS, make_adapters
from test_serve_hostile import _peak_growth, in_process, pico_model

TASK = "digits"  # one of serving_support's TASKS


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _ramp(size: tuple[int, int] = (40, 31)) -> np.ndarray:
    """A non-square gradient (so the resize and crop matter), values 0..1."""
    width, height = size
    return np.add.outer(np.arange(height), np.arange(width)) / (width + height - 2)


def _rotated_jpeg() -> bytes:
    image = Image.fromarray((_ramp()[..., None] * [255, 120, 30]).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return _save(image, "JPEG", exif=exif, quality=95)


def _palette_with_transparency() -> bytes:
    image = Image.fromarray((_ramp() * 200).astype(np.uint8)).convert("P")
    return _save(image, "PNG", transparency=0)


# name -> (file suffix, bytes): every mode whose plain convert("RGB") differs from arcvit's decoding
MODES = {
    "grey16_png": (".png", lambda: _save(Image.fromarray((_ramp() * 60000).astype(np.uint16)), "PNG")),
    "grey16_tiff": (".tif", lambda: _save(Image.fromarray((_ramp() * 60000).astype(np.uint16)), "TIFF")),
    "float_tiff": (".tif", lambda: _save(Image.fromarray(_ramp().astype(np.float32)), "TIFF")),
    "palette_alpha_png": (".png", _palette_with_transparency),
    "rgba_png": (".png", lambda: _save(Image.fromarray((np.dstack([_ramp()] * 4) * 255).astype(np.uint8)), "PNG")),
    "la_png": (".png", lambda: _save(Image.fromarray((_ramp() * 255).astype(np.uint8)).convert("LA"), "PNG")),
    "cmyk_jpeg": (".jpg", lambda: _save(Image.new("CMYK", (40, 31), (0, 200, 255, 30)), "JPEG")),
    "cmyk_tiff": (".tif", lambda: _save(Image.new("CMYK", (40, 31), (0, 200, 255, 30)), "TIFF")),
    "exif_rotated_jpeg": (".jpg", _rotated_jpeg),
    "rgba_webp": (".webp", lambda: _save(Image.fromarray((np.dstack([_ramp()] * 4) * 255).astype(np.uint8)),
                                         "WEBP", lossless=True)),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("adapters"), {TASK: TASKS[TASK]})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Each mode written once, as an ImageFolder test split (one class folder per mode)."""
    root = tmp_path_factory.mktemp("one_image")
    paths = {}
    for name, (suffix, make) in MODES.items():
        folder = root / "modes" / "test" / name
        folder.mkdir(parents=True)
        paths[name] = folder / f"image{suffix}"
        paths[name].write_bytes(make())
    return paths


def _recording(monkeypatch) -> list[torch.Tensor]:
    """Every tensor an eval transform built from now on returns, in order."""
    import arcvit.data.transforms as transforms
    seen, build = [], transforms.build_transform

    def recorded(*args, **kwargs):
        transform = build(*args, **kwargs)
        return lambda image: seen.append(transform(image)) or seen[-1]
    monkeypatch.setattr(transforms, "build_transform", recorded)
    return seen


def _predict_cli(adapters: Path, paths: list[Path], monkeypatch, capsys) -> tuple[list[torch.Tensor], list[dict]]:
    """What `arcvit predict` feeds the model for each image, and what it prints."""
    from arcvit.cli import main
    seen = _recording(monkeypatch)
    assert main(["predict", "--backbone", BACKBONE, "--adapter", str(adapters / TASK), "--accelerator", "cpu",
                 *map(str, paths)]) in (0, None)
    monkeypatch.undo()
    return seen, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _data_loader(root: Path, transform) -> dict[str, torch.Tensor]:
    """What `train` and `eval` feed the model: the ImageFolder split's items, by class folder."""
    from arcvit.data.layouts import load_split
    split = load_split(root, "modes", "test", transform, layout="folder")
    return {split.class_names[label]: x for x, label in (split[i] for i in range(len(split)))}


def test_every_mode_gets_the_same_input_and_answer_from_predict_eval_and_serve(adapters, images, monkeypatch,
                                                                                capsys):
    from arcvit.serving import ServeSettings, create_app
    names = list(MODES)
    predicted_inputs, printed = _predict_cli(adapters, [images[n] for n in names], monkeypatch, capsys)
    model = pico_model(adapters, [TASK])
    loaded = _data_loader(images[names[0]].parents[2].parent, model.transform)
    served_inputs, plain = [], model.transform
    model.transform = lambda image: served_inputs.append(plain(image)) or served_inputs[-1]
    with in_process(create_app(model, ServeSettings())) as server:
        served = [server.predict(images[n].read_bytes(), TASK) for n in names]
    for name, from_predict, from_serve, line, (status, body) in zip(names, predicted_inputs, served_inputs, printed,
                                                                     served):
        assert torch.equal(from_predict, loaded[name]), name  # the very same tensor, bit for bit
        assert torch.equal(from_predict, from_serve), name
        assert status == 200, (name, body)
        best = body["results"][0]["top"][0]
        assert best["label"] == line["label"] and abs(best["prob"] - line["prob"]) <= 1e-4, (name, best, line)
        with torch.no_grad():
            logits = model.predict(torch.stack([from_predict, from_serve]), [TASK, TASK])
        assert torch.equal(logits[0], logits[1]), name


def test_a_16bit_grey_is_not_clipped_on_its_way_to_the_server(images):
    """The defect: serve decoded with convert("RGB"), which clips a 16-bit grey to white."""
    from arcvit.data.images import open_rgb
    from arcvit.serving.images import decode_image
    served = np.asarray(decode_image(images["grey16_png"].read_bytes()))
    assert np.array_equal(served, np.asarray(open_rgb(images["grey16_png"])))
    assert served.min() == 0 and 100 < served.mean() < 160  # the ramp, not a white page


# ---- decoding memory, bounded from the header ------------------------------------------------------------

def _declaring(data: bytes, width: int, height: int) -> bytes:
    """A little-endian TIFF whose first IFD's ImageWidth and ImageLength now say ``width`` x ``height``."""
    assert data[:4] == b"II*\0"
    out = bytearray(data)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", out, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<H" if kind == 3 else "<I", out, entry + 8, value)
    return bytes(out)


def _huge_float_tiff(tmp_path: Path) -> Path:
    """A ~1 kB file whose header declares a 9000 x 9000 float32 TIFF (81 M pixels: 324 MB as floats)."""
    small = _save(Image.fromarray(np.zeros((16, 16), dtype=np.float32)), "TIFF", compression="tiff_deflate")
    path = tmp_path / "huge.tif"
    path.write_bytes(_declaring(small, 9000, 9000))
    with Image.open(path) as image:
        assert image.size == (9000, 9000) and image.mode == "F"
    return path


def test_predict_refuses_a_small_file_declaring_a_huge_float_tiff(adapters, tmp_path, capsys):
    from arcvit.cli import main
    path = _huge_float_tiff(tmp_path)
    assert path.stat().st_size < 2000
    code = main(["predict", "--backbone", BACKBONE, "--adapter", str(adapters / TASK), "--accelerator", "cpu",
                 str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"arcvit predict: error: {path}: 9000x9000 pixels of mode F (TIFF) would take 810 MB to "
                   "decode, over the limit of 805 MB")


def test_the_refusal_comes_before_any_big_allocation(tmp_path):
    from arcvit.data.images import ImageTooLarge, decode
    path = _huge_float_tiff(tmp_path)
    caught = []

    def run():
        with pytest.raises(ImageTooLarge, match="9000x9000 pixels of mode F") as e:
            decode(path)
        caught.append(e.value)
    assert _peak_growth(run) < 16 << 20 and caught


@pytest.mark.parametrize("fmt, mode, cost", [("WEBP", "RGB", 18), ("WEBP", "RGBA", 22), ("TIFF", "F", 10),
                                             ("PNG", "RGB", 5), ("PNG", "LA", 13), ("JPEG", "CMYK", 9)])
def test_the_cost_per_pixel_depends_on_mode_and_format(fmt, mode, cost):
    from arcvit.data.images import decode_cost
    with Image.open(io.BytesIO(_save(Image.new(mode, (4, 4)), fmt))) as image:
        assert (image.format, image.mode) == (fmt, mode)
        assert decode_cost(image) == cost


def test_serve_refuses_a_webp_over_its_budget_with_413():
    """A WebP costs 18 bytes a pixel: one of 5000 x 5000 (within the 36 M-pixel budget) would take 450 MB."""
    from arcvit.serving.images import UploadError, decode_image
    data = _save(Image.new("RGB", (5000, 5000)), "WEBP", quality=1)
    with pytest.raises(UploadError, match=r"^image: 5000x5000 pixels of mode RGB \(WEBP\) would take 450 MB to "
                                          r"decode, over the limit of 324 MB$") as e:
        decode_image(data)
    assert e.value.status == 413


_MEASURE = r"""
import ctypes, io, json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from arcvit.data.images import decode, decode_cost

def read(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024

fmt, mode, side = sys.argv[1], sys.argv[2], 1500
values = np.random.default_rng(0).integers(0, 255, (side, side, 4), dtype=np.uint8)
image = Image.fromarray(values, "RGBA").convert(mode) if mode not in ("I;16", "F") else Image.fromarray(
    values[..., 0].astype(np.uint16 if mode == "I;16" else np.float32) * (257 if mode == "I;16" else 1 / 255))
buffer = io.BytesIO(); image.save(buffer, format=fmt); data = buffer.getvalue()
del image, buffer, values
with Image.open(io.BytesIO(data)) as opened:
    cost = decode_cost(opened)
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = read("VmRSS:"); Path("/proc/self/clear_refs").write_text("5")
decode(data)
print(json.dumps([read("VmHWM:") - base, cost * side * side]))
"""


@pytest.mark.slow  # ~1 min: one fresh process per format and mode
@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "I;16"),
                                       ("TIFF", "F"), ("TIFF", "CMYK"), ("JPEG", "L"), ("WEBP", "RGB"),
                                       ("WEBP", "RGBA"), ("GIF", "P"), ("BMP", "RGB")])
def test_decoding_stays_within_its_stated_cost(fmt, mode):
    import subprocess
    import sys

    from conftest import subprocess_env
    done = subprocess.run([sys.executable, "-c", _MEASURE, fmt, mode], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth, stated = json.loads(done.stdout.splitlines()[-1])
    assert growth <= stated, (fmt, mode, growth, stated)
