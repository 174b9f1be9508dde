"""The offline "mini-VTAB" suite: eight small 28x28 grey tasks in VTAB's three groups, written to disk in the
NOAH VTAB-1k layout (train800 / val200 / train800val200 / test), so the whole benchmark pipeline can run on a
machine without network access.

Fashion-MNIST is deliberately absent: it is the shipped backbone's pretraining data.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from arcvit.data import render
from arcvit.data.sources import ArraySource, animal_contours, animal_shapes, mnist5k, sklearn_digits
from arcvit.data.writers import write_vtab_task
from arcvit.errors import ConfigError, DataError
from arcvit.fileio import write_json, write_text

GROUPS = ("natural", "specialized", "structured")
TRAIN_SIZE, VAL_SIZE = 800, 200
MARKER_NAME = ".mini_vtab_complete.json"  # written last: the build settings, group and class count
_FORMAT_VERSION = 2  # 2: classes.txt
_RENDER_POOL = 2000  # rendered tasks draw train/val/test from a fixed pool, so test_size <= 1000 for them


@dataclass(frozen=True)
class MiniTask:
    """How to make one task: ``source`` loads or renders its images; ``seed`` fixes its split sampling."""

    group: str
    source: Callable[[], ArraySource]
    num_classes: int
    description: str
    seed: int


def resized(source: ArraySource, size: int) -> ArraySource:
    """``source`` with every image resized to ``size`` x ``size`` by bicubic interpolation."""
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in source.images])
    return ArraySource(source.name, images, source.labels, source.class_names,
                       f"{source.description}, bicubic-resized to {size}x{size}")


def _sklearn_digits_28() -> ArraySource:
    return resized(sklearn_digits(), render.IMAGE_SIZE)


MINI_TASKS: Mapping[str, MiniTask] = MappingProxyType({
    "mnist5k": MiniTask("natural", mnist5k, 10, "handwritten digits (MNIST)", 101),
    "sklearn_digits": MiniTask("natural", _sklearn_digits_28, 10,
                               "8x8 scanned digits (UCI optdigits) upsampled to 28x28", 102),
    "animal_shapes": MiniTask("specialized", animal_shapes, 10, "animal silhouettes", 201),
    "animal_contours": MiniTask("specialized", animal_contours, 10, "outlines of the animal silhouettes", 202),
    "shapes_count": MiniTask("structured", partial(render.render_count, _RENDER_POOL, 301), 6,
                             "count 1-6 shapes (cf. clevr_count)", 301),
    "shapes_location": MiniTask("structured", partial(render.render_location, _RENDER_POOL, 302), 9,
                                "3x3 grid cell of a shape (cf. dsprites_loc)", 302),
    "shapes_orientation": MiniTask("structured", partial(render.render_orientation, _RENDER_POOL, 303), 8,
                                   "orientation of an elongated shape, 8 bins (cf. dsprites_ori)", 303),
    "shapes_distance": MiniTask("structured", partial(render.render_distance, _RENDER_POOL, 304), 4,
                                "distance between two shapes, 4 bins (cf. clevr_dist)", 304),
})


def stratified_splits(labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, each as class-balanced as the data allow.

    Samples are shuffled, ranked within their class, and dealt out in rank order (every class's first sample,
    then every class's second, ...), so consecutive slices of that order hold near-equal counts per class.
    """
    if sum(sizes) > len(labels):
        raise DataError(f"need {sum(sizes)} samples for splits of sizes {list(sizes)}, the source has {len(labels)}")
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = shuffled == c
        rank[members] = np.arange(members.sum())
    dealt = order[np.argsort(rank, kind="stable")]
    bounds = np.cumsum([0, *sizes])
    return [np.sort(dealt[lo:hi]) for lo, hi in pairwise(bounds)]


def build_mini_suite(root: str | Path, tasks: Iterable[str] | None = None, test_size: int = 500) -> dict[str, Path]:
    """Write the suite's tasks (default: all) under ``root/<task>/``; returns each task's folder.

    Idempotent: a folder whose completion marker (written last, atomically) matches this build is left alone;
    any other folder of that name, such as one a crash left half-written, is deleted and rebuilt.
    Deterministic: the same arguments always produce byte-identical files.
    """
    names = list(MINI_TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in MINI_TASKS]
    if unknown:
        raise ConfigError(f"unknown mini-VTAB task(s) {unknown}; choose from {list(MINI_TASKS)}")
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise ConfigError(f"test_size must be a positive integer, got {test_size!r}")
    root = Path(root)
    return {name: _build_task(root / name, name, test_size) for name in names}


def _build_task(task_dir: Path, name: str, test_size: int) -> Path:
    spec = MINI_TASKS[name]
    stamp = {"task": name, "group": spec.group, "num_classes": spec.num_classes, "version": _FORMAT_VERSION,
             "sizes": {"train800": TRAIN_SIZE, "val200": VAL_SIZE, "test": test_size}}
    if _read_marker(task_dir / MARKER_NAME) == stamp:
        return task_dir
    source = spec.source()
    size = render.IMAGE_SIZE
    if source.images.shape[1:] != (size, size) or source.num_classes != spec.num_classes:
        raise DataError(f"task {name!r}: source {source.name!r} gives images {source.images.shape[1:]} and "
                        f"{source.num_classes} classes, expected ({size}, {size}) and {spec.num_classes}")
    spare = len(source.labels) - TRAIN_SIZE - VAL_SIZE
    if test_size > spare:
        raise ConfigError(f"test_size {test_size} is too large for task {name!r}: its source has "
                          f"{len(source.labels)} images, leaving at most {spare} after train800 + val200")
    rng = np.random.default_rng(spec.seed)
    parts = stratified_splits(source.labels, [TRAIN_SIZE, VAL_SIZE, test_size], rng)
    splits = {key: (source.images[idx], source.labels[idx]) for key, idx in zip(("train800", "val200", "test"), parts)}
    if task_dir.exists():  # only once the new build is known to be possible
        shutil.rmtree(task_dir)
    write_vtab_task(task_dir, splits, image_format="png")
    write_text(task_dir / "classes.txt", "".join(f"{c}\n" for c in source.class_names))
    write_json(task_dir / MARKER_NAME, stamp)
    return task_dir


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
