"""Build VTAB-1k task folders from TensorFlow Datasets (extra ``arcvit[tfds]``; imported only when used).

The public 1k slicing, as VTAB's task definitions (google-research/task_adaptation) apply it: each task names a
"train" and a "val" part of its TFDS splits; ``train800`` is the first 800 examples of the train part,
``val200`` the first 200 of the val part, ``train800val200`` their union, ``test`` the task's whole test part.
Percent boundaries are rounded to the closest example, as TFDS rounds ``train[90%:]``. Images are read one at a
time through ``tfds.data_source`` (random access, no TensorFlow needed) and written lossless (PNG) unless
``image_format`` is 'jpeg' (the lossy export of NOAH's release; PIL's default quality).

`TFDS_TASKS` holds the 19 tasks' definitions (builder, parts, label), written from VTAB's task files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from arcvit.errors import ConfigError, DataError
from arcvit.extras import require
from arcvit.fileio import write_text

Part = tuple[str, float, float]  # TFDS split, start and end in percent of it


@dataclass(frozen=True)
class TfdsTask:
    """One VTAB-1k task: the TFDS builder, its train/val/test parts and how an example becomes (image, label)."""

    builder: str
    train: Part
    val: Part
    test: Part
    example: Callable[[dict], tuple[np.ndarray, int]]


def _plain(example: dict) -> tuple[np.ndarray, int]:
    return example["image"], int(example["label"])


def _dsprites(attribute: str, original: int, classes: int = 16) -> Callable[[dict], tuple[np.ndarray, int]]:
    """A dSprites latent binned into ``classes`` (VTAB: floor(value / (original / classes))); the 0/1 image as
    0/255."""
    factor = original / classes

    def example(ex: dict) -> tuple[np.ndarray, int]:
        return np.where(ex["image"] > 0, 255, 0).astype(np.uint8), int(int(ex[attribute]) // factor)
    return example


def _attribute(name: str) -> Callable[[dict], tuple[np.ndarray, int]]:
    """A smallNORB latent as the label (azimuth: 18 values, elevation: 9)."""
    def example(ex: dict) -> tuple[np.ndarray, int]:
        return ex["image"], int(ex[name])
    return example


def _bin(value: float, thresholds: np.ndarray) -> int:
    """VTAB's binning: the last threshold below the value."""
    return int(np.flatnonzero(thresholds < value).max())


def _clevr_count(example: dict) -> tuple[np.ndarray, int]:
    """VTAB's CLEVR count task: objects in the scene, 3..10, as 0..7."""
    return example["image"], len(example["objects"]["size"]) - 3


CLEVR_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])  # depth of the closest object, 6 classes


def _clevr_distance(example: dict) -> tuple[np.ndarray, int]:
    depths = np.asarray(example["objects"]["pixel_coords"], dtype=np.float64).reshape(-1, 3)[:, 2]
    return example["image"], _bin(float(depths.min()) if depths.size else 100.0, CLEVR_THRESHOLDS)


KITTI_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])  # metres; the last class is "no vehicle"


def _kitti_closest_vehicle(example: dict) -> tuple[np.ndarray, int]:
    """VTAB's KITTI task: distance (z, metres) to the closest car, van or truck (types 0-2), in 4 bins."""
    objects = example["objects"]
    n = min(len(objects["type"]), len(objects["location"]))
    depths = [float(objects["location"][i][2]) for i in range(n) if objects["type"][i] < 3]
    distance = min(depths + [1000.0])
    return example["image"], _bin(distance, KITTI_THRESHOLDS)


def _whole(split: str) -> Part:
    return (split, 0, 100)


def _official(builder: str, example: Callable = _plain) -> TfdsTask:
    """A task whose TFDS train, validation and test splits are VTAB's parts as they are."""
    return TfdsTask(builder, _whole("train"), _whole("validation"), _whole("test"), example)


def _held_out(builder: str, train_percent: float, example: Callable = _plain) -> TfdsTask:
    """A task whose val part is the end of the TFDS train split; test is the TFDS test split."""
    return TfdsTask(builder, ("train", 0, train_percent), ("train", train_percent, 100), _whole("test"), example)


def _carved(builder: str, train_percent: float, val_percent: float, example: Callable = _plain) -> TfdsTask:
    """A task with only a TFDS train split: train, val and test are consecutive parts of it."""
    end = train_percent + val_percent
    return TfdsTask(builder, ("train", 0, train_percent), ("train", train_percent, end), ("train", end, 100), example)


TFDS_TASKS: dict[str, TfdsTask] = {
    "cifar": _held_out("cifar100:3.*.*", 90),
    "caltech101": _held_out("caltech101:3.*.*", 90),
    "dtd": _official("dtd:3.*.*"),
    "oxford_flowers102": _official("oxford_flowers102:2.*.*"),
    "oxford_iiit_pet": _held_out("oxford_iiit_pet:3.*.*", 80),
    "svhn": _held_out("svhn_cropped:3.*.*", 90),
    "sun397": _official("sun397/tfds:4.*.*"),
    "patch_camelyon": _official("patch_camelyon:2.*.*"),
    "eurosat": _carved("eurosat/rgb:2.*.*", 60, 20),
    "resisc45": _carved("resisc45:3.*.*", 60, 20),
    "diabetic_retinopathy": _official("diabetic_retinopathy_detection/btgraham-300:3.*.*"),
    "clevr_count": TfdsTask("clevr:3.*.*", ("train", 0, 90), ("train", 90, 100), _whole("validation"), _clevr_count),
    "clevr_dist": TfdsTask("clevr:3.*.*", ("train", 0, 90), ("train", 90, 100), _whole("validation"),
                           _clevr_distance),
    "dmlab": _official("dmlab:2.0.0"),
    "smallnorb_azi": TfdsTask("smallnorb:2.*.*", _whole("train"), ("test", 0, 50), ("test", 50, 100),
                              _attribute("label_azimuth")),
    "smallnorb_ele": TfdsTask("smallnorb:2.*.*", _whole("train"), ("test", 0, 50), ("test", 50, 100),
                              _attribute("label_elevation")),
    "dsprites_loc": TfdsTask("dsprites:2.*.*", ("train", 0, 80), ("train", 80, 90), ("train", 90, 100),
                             _dsprites("label_x_position", 32)),
    "dsprites_ori": TfdsTask("dsprites:2.*.*", ("train", 0, 80), ("train", 80, 90), ("train", 90, 100),
                             _dsprites("label_orientation", 40)),
    "kitti": _official("kitti:3.*.*", _kitti_closest_vehicle),
}
FORMATS = {"png": "PNG", "jpeg": "JPEG"}


def _bounds(size: int, part: Part) -> tuple[int, int]:
    _, start, end = part
    return int(size * start / 100 + 0.5), int(size * end / 100 + 0.5)


def slices(sizes: dict[str, int], task: TfdsTask) -> dict[str, tuple[str, int, int]]:
    """(TFDS split, first index, end index) of train800, val200 and test, given each TFDS split's size."""
    out = {}
    for name, part, count in (("train800", task.train, 800), ("val200", task.val, 200), ("test", task.test, None)):
        lo, hi = _bounds(sizes[part[0]], part)
        if count is not None:
            if hi - lo < count:
                raise DataError(f"TFDS {task.builder} {part[0]}[{part[1]:g}%:{part[2]:g}%] holds {hi - lo} "
                                f"examples, fewer than the {count} of {name}")
            hi = lo + count
        out[name] = (part[0], lo, hi)
    return out


def _write(source: Any, indices: range, task: TfdsTask, folder: Path, split: str, fmt: str) -> list[str]:
    lines = []
    (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    for n, index in enumerate(indices):
        image, label = task.example(source[index])
        array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
        rel = f"images/{split}/{n:06d}.{fmt.lower().replace('jpeg', 'jpg')}"
        Image.fromarray(np.ascontiguousarray(array)).save(folder / rel, format=FORMATS[fmt])
        lines.append(f"{rel} {label}\n")
    return lines


def build_task(name: str, folder: Path, image_format: str = "png", data_dir: str | None = None,
               log: Callable[[str], None] = lambda line: None) -> str:
    """Write VTAB-1k task ``name`` from TFDS into ``folder`` (a staging folder: the caller verifies and places
    it); returns the source label for the manifest (builder, version, image format)."""
    if image_format not in FORMATS:
        raise ConfigError(f"--format {image_format!r}: choose one of {', '.join(FORMATS)}")
    tfds = require("tensorflow_datasets", "tfds", "--source tfds")
    task = TFDS_TASKS[name]
    builder = tfds.builder(task.builder, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")  # random access without TensorFlow
    needed = {part[0] for part in (task.train, task.val, task.test)}
    sources = {split: builder.as_data_source(split=split) for split in sorted(needed)}
    lists = {}
    for split, (tfds_split, lo, hi) in slices({s: len(src) for s, src in sources.items()}, task).items():
        log(f"{name}: writing {split} from {builder.info.full_name} {tfds_split}[{lo}:{hi}]")
        lists[split] = _write(sources[tfds_split], range(lo, hi), task, folder, split, image_format)
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        write_text(folder / f"{split}.txt", "".join(lines))
    return f"tfds {builder.info.full_name} {image_format}"
