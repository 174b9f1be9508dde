"""Offline image sources, the restricted unpickler, rendered structured tasks and the mini-VTAB builder."""
from __future__ import annotations

import gzip
import os
import pickle
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from arcvit.data import render
from arcvit.data.mini import GROUPS, MARKER_NAME, MINI_TASKS, build_mini_suite, stratified_splits
from arcvit.data.sources import (
    animal_contours,
    animal_shapes,
    fashion_mnist,
    mnist5k,
    package_file,
    safe_unpickle_numpy,
    sklearn_digits,
)
from arcvit.errors import ConfigError, DataError

SHAPE_THRESHOLD = 110  # shapes are drawn at >= 170, background + specks + noise stay well below


# ---- real sources -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("load, shape, per_class", [
    (mnist5k, (5000, 28, 28), 500),
    (animal_shapes, (10000, 28, 28), 1000),
    (partial(fashion_mnist, "test"), (10000, 28, 28), 1000),
])
def test_balanced_sources_load(load, shape, per_class):
    source = load()
    assert source.images.shape == shape and source.images.dtype == np.uint8
    assert source.images.max() == 255
    assert np.bincount(source.labels).tolist() == [per_class] * 10 == [per_class] * source.num_classes


def test_sklearn_digits_scaled_to_full_range():
    source = sklearn_digits()
    assert source.images.shape == (1797, 8, 8) and source.images.max() == 255
    assert source.labels.min() == 0 and source.labels.max() == 9


def test_animal_contours_lie_on_the_silhouettes():
    shapes, contours = animal_shapes(), animal_contours()
    assert np.array_equal(shapes.labels, contours.labels)
    drawn = contours.images > 0
    assert np.array_equal(contours.images[drawn], shapes.images[drawn])
    assert 0.2 < drawn.sum() / (shapes.images >= 128).sum() < 0.8  # an outline, neither empty nor filled


def test_fashion_mnist_rejects_unknown_split():
    with pytest.raises(DataError, match="'valid'"):
        fashion_mnist("valid")


def test_missing_package_says_how_to_install():
    with pytest.raises(DataError, match="pip install --no-deps no-such-pkg"):
        package_file("arcvit_no_such_pkg", "data.csv", "no-such-pkg")


# ---- restricted unpickler -----------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_safe_unpickle_reads_numpy_arrays(tmp_path, compress):
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    raw = pickle.dumps(array, protocol=4)
    path = tmp_path / "array.pkl"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    assert np.array_equal(safe_unpickle_numpy(path), array)


def _calling_pickle(module: str, name: str, *args: str) -> bytes:
    """Protocol-0 bytes that, under plain pickle.loads, would call module.name(*args)."""
    return f"c{module}\n{name}\n(".encode() + b"".join(f"V{a}\n".encode() for a in args) + b"tR."


@pytest.mark.parametrize("module, name, make_args", [
    ("os", "system", lambda target: (f"touch {target}",)),
    ("builtins", "open", lambda target: (str(target), "w")),
])
def test_safe_unpickle_refuses_code_without_running_it(tmp_path, module, name, make_args):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(_calling_pickle(module, name, *make_args(target))))
    with pytest.raises(DataError, match=rf"evil\.pkl\.gz.*{module}\.{name}"):
        safe_unpickle_numpy(path)
    assert not target.exists()


def test_safe_unpickle_reports_corrupt_and_non_array_pickles(tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps(np.zeros(5), protocol=4)[:-10])
    with pytest.raises(DataError, match="truncated.pkl"):
        safe_unpickle_numpy(truncated)
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a numeric numpy array, got list"):
        safe_unpickle_numpy(listed)


# ---- rendered tasks -----------------------------------------------------------------------------------------

def _blobs(image: np.ndarray) -> list[np.ndarray]:
    """Centroids (x, y in continuous pixel units) of the 8-connected bright components, by flood fill."""
    bright = image > SHAPE_THRESHOLD
    seen = np.zeros_like(bright)
    centroids = []
    for start in zip(*np.nonzero(bright)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            i, j = queue.popleft()
            members.append((j + 0.5, i + 0.5))
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    n = (i + di, j + dj)
                    if 0 <= n[0] < image.shape[0] and 0 <= n[1] < image.shape[1] and bright[n] and not seen[n]:
                        seen[n] = True
                        queue.append(n)
        centroids.append(np.mean(members, axis=0))
    return centroids


def _axis_angle(image: np.ndarray) -> float:
    """Angle (degrees mod 180, y up) of the bright pixels' principal axis."""
    ys, xs = np.nonzero(image > SHAPE_THRESHOLD)
    x, y = xs - xs.mean(), -(ys - ys.mean())
    return float(np.degrees(0.5 * np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())) % 180)


RENDERERS = [render.render_count, render.render_location, render.render_orientation, render.render_distance]


@pytest.mark.parametrize("make", RENDERERS)
def test_render_is_deterministic_and_balanced(make):
    a, b, other = make(40, seed=7), make(40, seed=7), make(40, seed=8)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, other.images)
    assert a.images.shape == (40, 28, 28) and a.images.dtype == np.uint8
    counts = np.bincount(a.labels, minlength=a.num_classes)
    assert counts.max() - counts.min() <= 1
    assert len(set(a.class_names)) == a.num_classes == MINI_TASKS[a.name].num_classes


def test_count_images_hold_label_plus_one_blobs():
    source = render.render_count(36, seed=1)
    assert [len(_blobs(im)) for im in source.images] == (source.labels + 1).tolist()


def test_location_label_is_the_grid_cell_of_the_shape():
    source = render.render_location(36, seed=1)
    cell = 28 / 3
    for image, label in zip(source.images, source.labels):
        [(x, y)] = _blobs(image)
        assert int(y // cell) * 3 + int(x // cell) == label
    assert source.class_names[0] == "top-left" and source.class_names[8] == "bottom-right"


def test_orientation_label_is_the_angle_bin():
    source = render.render_orientation(32, seed=1)
    for image, label in zip(source.images, source.labels):
        off = (_axis_angle(image) - (label + 0.5) * 22.5 + 90) % 180 - 90
        assert abs(off) < 20, (label, _axis_angle(image))  # bin half-width 11.25 plus pixelation slack


def test_distance_label_is_the_distance_bin():
    source = render.render_distance(32, seed=1)
    for image, label in zip(source.images, source.labels):
        first, second = _blobs(image)
        lo, hi = (float(v) for v in source.class_names[label].removesuffix(" px").split("-"))
        assert lo <= np.hypot(*(first - second)) < hi


def test_render_rejects_non_positive_size():
    with pytest.raises(ConfigError, match="shapes_count"):
        render.render_count(0)


# ---- mini-VTAB suite ----------------------------------------------------------------------------------------

def test_registry_covers_the_three_groups_with_matching_class_counts():
    groups = [spec.group for spec in MINI_TASKS.values()]
    assert all(2 <= groups.count(g) for g in GROUPS) and set(groups) == set(GROUPS)
    assert "fashion_mnist" not in " ".join(MINI_TASKS)  # the backbone's pretraining data
    for name, spec in MINI_TASKS.items():
        if isinstance(spec.source, partial):  # a renderer: a few images suffice
            source = spec.source.func(12)
        else:
            source = spec.source()
            assert source.images.shape[1:] == (28, 28)
        assert source.num_classes == spec.num_classes, name


def test_stratified_splits_are_disjoint_and_balanced():
    labels = np.repeat(np.arange(5), [30, 30, 30, 30, 12])
    parts = stratified_splits(labels, [40, 20, 30], np.random.default_rng(0))
    assert [len(p) for p in parts] == [40, 20, 30]
    assert len(np.unique(np.concatenate(parts))) == 90
    assert np.bincount(labels[parts[0]]).tolist() == [8] * 5
    with pytest.raises(DataError, match="need 200 samples"):
        stratified_splits(labels, [100, 100], np.random.default_rng(0))


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_mini_suite_is_complete_idempotent_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the writer fsyncs every PNG; durability is not tested here
    tasks = ["sklearn_digits", "shapes_location"]
    built = build_mini_suite(tmp_path / "a", tasks, test_size=30)
    assert list(built) == tasks
    for name, folder in built.items():
        lines = {split: (folder / f"{split}.txt").read_text().splitlines()
                 for split in ("train800", "val200", "train800val200", "test")}
        assert [len(v) for v in lines.values()] == [800, 200, 1000, 30]
        paths = [line.rsplit(maxsplit=1)[0] for line in lines["train800val200"] + lines["test"]]
        assert len(set(paths)) == 1030 and all((folder / p).read_bytes()[:4] == b"\x89PNG" for p in paths[:5])
        train_counts = np.bincount([int(line.rsplit(maxsplit=1)[1]) for line in lines["train800"]])
        assert len(train_counts) == MINI_TASKS[name].num_classes and train_counts.max() - train_counts.min() <= 1

    location = built["shapes_location"]
    before = _snapshot(location)
    build_mini_suite(tmp_path / "a", ["shapes_location"], test_size=30)
    assert _snapshot(location) == before  # complete: untouched, same mtimes

    (location / MARKER_NAME).unlink()  # as if a crash interrupted the build
    (location / "stray.tmp").write_text("half-written")
    build_mini_suite(tmp_path / "a", ["shapes_location"], test_size=30)
    rebuilt = _snapshot(location)
    assert rebuilt.keys() == before.keys()  # the stray file is gone
    assert all(rebuilt[k][0] == before[k][0] for k in before)  # re-rendered and rewritten byte for byte
    assert rebuilt[MARKER_NAME][1] != before[MARKER_NAME][1]

def test_build_mini_suite_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="'imagenet'"):
        build_mini_suite(tmp_path, ["imagenet"])
    with pytest.raises(ConfigError, match="test_size"):
        build_mini_suite(tmp_path, ["mnist5k"], test_size=0)
    with pytest.raises(ConfigError, match="'sklearn_digits'.*at most 797"):
        build_mini_suite(tmp_path, ["sklearn_digits"], test_size=800)
    assert not (tmp_path / "sklearn_digits").exists()
