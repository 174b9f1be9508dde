"""Write image arrays as real image files in the layouts `arcvit.data.layouts` reads.

Used by the tests, the offline demo and the offline benchmark, so that they exercise exactly the code path
a downloaded VTAB-1k / FGVC / ImageFolder data set goes through. Every file is written atomically; folders
that already exist are reused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from arcvit.errors import ConfigError, DataError
from arcvit.fileio import atomic_path, write_json, write_text

Split = tuple[np.ndarray, np.ndarray]
VTAB_WRITABLE_SPLITS = ("train800", "val200", "test")
FGVC_WRITABLE_SPLITS = ("train", "val", "test")


def _checked(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 N×H×W (grey) or N×H×W×3, one integer label each."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"images: expected uint8 N×H×W or N×H×W×3, got {images.dtype} {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise DataError(f"labels: expected {len(images)} integers, got {labels.dtype} {labels.shape}")
    return images, labels


def _check_splits(splits: dict[str, Split], allowed: Sequence[str]) -> None:
    unknown = sorted(set(splits) - set(allowed))
    if unknown:
        raise ConfigError(f"splits {unknown}: choose from {', '.join(allowed)}")


def _write_images(base: Path, subdir: str, images: np.ndarray, labels: np.ndarray,
                  image_format: str) -> list[tuple[str, int]]:
    """Write image i to ``base/subdir/<i>.<format>``; return (path relative to base, label) pairs."""
    images, labels = _checked(images, labels)
    pil_format = Image.registered_extensions().get(f".{image_format.lower()}")
    if pil_format not in Image.SAVE:
        raise ConfigError(f"image_format {image_format!r}: PIL cannot write it")
    entries = []
    for i, (array, label) in enumerate(zip(images, labels)):
        rel = f"{subdir}/{i}.{image_format}"
        with atomic_path(base / rel) as tmp:
            Image.fromarray(array).save(tmp, format=pil_format)
        entries.append((rel, int(label)))
    return entries


def write_vtab_task(task_dir: str | Path, splits: dict[str, Split], image_format: str = "png") -> Path:
    """A NOAH-style VTAB-1k task folder: images/<split>/<i>.<format> and <split>.txt list files
    (plus train800val200.txt when both train800 and val200 are given)."""
    task_dir = Path(task_dir)
    _check_splits(splits, VTAB_WRITABLE_SPLITS)
    lists = {split: _write_images(task_dir, f"images/{split}", *arrays, image_format)
             for split, arrays in splits.items()}
    if "train800" in lists and "val200" in lists:
        lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, entries in lists.items():
        write_text(task_dir / f"{split}.txt", "".join(f"{rel} {label}\n" for rel, label in entries))
    return task_dir


def write_fgvc_task(task_dir: str | Path, splits: dict[str, Split], image_subdir: str = "images",
                    image_format: str = "png") -> Path:
    """A VPT-style FGVC folder: <split>.json mapping paths relative to ``image_subdir`` ('' for the
    folder itself) to the given class ids, images under <image_subdir>/<split>/."""
    task_dir = Path(task_dir)
    _check_splits(splits, FGVC_WRITABLE_SPLITS)
    for split, arrays in splits.items():
        entries = _write_images(task_dir / image_subdir, split, *arrays, image_format)
        write_json(task_dir / f"{split}.json", dict(entries))
    return task_dir


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       image_format: str = "png") -> Path:
    """An ImageFolder: root/<class name>/<i>.<format>, a folder for every class even when it gets no image.

    ``class_names`` must be sorted, because readers number classes in sorted-name order.
    """
    root = Path(root)
    names = list(class_names)
    if names != sorted(set(names)) or any(not n or n.startswith(".") or "/" in n for n in names):
        raise DataError(f"class_names {names}: need unique, sorted folder names (no '/', not hidden), "
                        "since readers number classes in sorted order")
    images, labels = _checked(images, labels)
    if labels.size and not 0 <= labels.min() <= labels.max() < len(names):
        raise DataError(f"labels: expected 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
        _write_images(root, name, images[labels == label], labels[labels == label], image_format)
    return root
