"""Reader for the IDX files that MNIST-style data sets ship in (Debian's dataset-fashion-mnist among them)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from arcvit.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (possibly gzip'd) IDX file into a numpy array, checking its header against its size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: IDX header says {dims} but the file holds {len(body)} bytes (truncated?)")
    return np.frombuffer(body, dtype=dtype).reshape(dims).copy()


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) as uint8 images (N, 28, 28) and int64 labels."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    images_file = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise DataError(f"{images_file}: Fashion-MNIST not found; install it with "
                        "`apt-get install dataset-fashion-mnist`")
    images = read_idx(images_file)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels
