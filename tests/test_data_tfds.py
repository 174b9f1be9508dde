"""`arcvit data prepare vtab1k --source tfds`: the public 1k slicing and the per-task labels, checked on the
real TFDS split sizes (fast) and end to end with TFDS's own mock data (slow: thousands of PNGs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from arcvit.cli import main
from arcvit.data.manifest import read_manifest
from arcvit.data.prepare.tfds import TFDS_TASKS, _dsprites, _kitti_closest_vehicle, slices
from arcvit.data.verify import VTAB_TEST_SIZES


@pytest.mark.parametrize("task, sizes, val_start", [
    ("cifar", {"train": 50000, "test": 10000}, 45000),  # val200 = the 200 from 90 % of the training split
    ("eurosat", {"train": 27000}, 16200),
    ("dsprites_loc", {"train": 737280}, 589824),
    ("kitti", {"train": 6347, "validation": 423, "test": 711}, 0),
    ("resisc45", {"train": 31500}, 18900),
    ("svhn", {"train": 73257, "test": 26032}, 65931),
    ("smallnorb_azi", {"train": 24300, "test": 24300}, 0),  # val200 from the TFDS test split's first half
    ("clevr_dist", {"train": 70000, "validation": 15000}, 63000),  # test = the TFDS validation split
    ("dtd", {"train": 1880, "validation": 1880, "test": 1880}, 0),
])
def test_public_slicing_gives_the_release_sizes(task, sizes, val_start):
    got = slices(sizes, TFDS_TASKS[task])
    assert got["train800"][1:] == (0, 800)
    assert got["val200"][1:] == (val_start, val_start + 200)
    assert got["test"][2] - got["test"][1] == VTAB_TEST_SIZES[task]


def test_derived_labels():
    def kitti(types, depths):
        objects = {"type": np.array(types), "location": np.array([[0.0, 0.0, z] for z in depths])}
        return _kitti_closest_vehicle({"image": np.zeros((2, 2, 3), np.uint8), "objects": objects})[1]
    assert kitti([0], [5.0]) == 0 and kitti([2, 1], [30.0, 12.0]) == 1 and kitti([1], [25.0]) == 2
    assert kitti([3, 4], [2.0, 3.0]) == 3  # pedestrians and cyclists only: "no vehicle"
    assert kitti([], []) == 3  # no vehicle at all
    loc, ori = _dsprites("label_x_position", 32), _dsprites("label_orientation", 40)
    image = np.array([[[0], [1]]], np.uint8)
    assert [loc({"image": image, "label_x_position": v})[1] for v in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [ori({"image": image, "label_orientation": v})[1] for v in (0, 2, 3, 39)] == [0, 0, 1, 15]
    assert loc({"image": image, "label_x_position": 0})[0].tolist() == [[[0], [255]]]
    scene = {"image": image, "objects": {"size": np.zeros(5), "pixel_coords": np.array([[0, 0, 9.2], [0, 0, 8.7]])}}
    assert TFDS_TASKS["clevr_count"].example(scene)[1] == 2 and TFDS_TASKS["clevr_dist"].example(scene)[1] == 2


def test_every_vtab_task_is_defined_and_fgvc_is_refused(tmp_path, capsys):
    assert set(TFDS_TASKS) == set(VTAB_TEST_SIZES)
    assert main(["data", "prepare", "fgvc", "--source", "tfds", "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert "VTAB-1k tasks only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


MOCK_EXAMPLES = 2000  # per TFDS split: the smallest count whose 90 %..100 % part still holds val200's 200


class _MockSplit:
    """TFDS's random fake examples for one split. mock_data's own data source seeds every split alike (so a
    task's test split would repeat its training images, which verify rightly refuses); this one seeds each
    split apart."""

    def __init__(self, features, seed: int) -> None:
        from tensorflow_datasets.testing.mocking import RandomFakeGenerator
        self.examples = RandomFakeGenerator(features, MOCK_EXAMPLES, seed=seed)

    def __len__(self) -> int:
        return MOCK_EXAMPLES

    def __getitem__(self, index: int):
        return self.examples[index]


def _mock_source(builder, split, **kwargs):
    return _MockSplit(builder.info.features, seed={"train": 1, "validation": 2, "test": 3}[split] * 10**6)


@pytest.mark.slow
def test_mock_tfds_three_tasks_sliced_labelled_and_verified(tmp_path, capsys):
    """cifar (natural), kitti (structured, derived label) and eurosat (specialized) from TFDS's mock data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tmp_path / "root"
    tasks = {"cifar": (100, MOCK_EXAMPLES), "kitti": (4, MOCK_EXAMPLES), "eurosat": (10, MOCK_EXAMPLES // 5)}
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=str(tmp_path / "tfds"),
                                as_data_source_fn=_mock_source):
        code = main(["data", "prepare", "vtab1k", "--source", "tfds", "--out", str(root), "--tasks", *tasks,
                     "--any-size", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["source"].startswith("tfds ")
    manifest = read_manifest(root)["tasks"]
    for task, (classes, test_size) in tasks.items():
        splits = manifest[task]["splits"]
        assert [splits[s]["images"] for s in ("train800", "val200", "train800val200", "test")] == [800, 200, 1000,
                                                                                                   test_size]
        assert manifest[task]["formats"] == {"PNG": 1000 + test_size}
        labels = [int(line.rsplit(" ", 1)[1]) for line in (root / task / "train800val200.txt").read_text().splitlines()]
        assert 0 <= min(labels) and max(labels) < classes and len(set(labels)) > 1
        assert manifest[task]["source"].startswith(f"tfds {TFDS_TASKS[task].builder.split(':')[0]}/")
    assert main(["data", "verify", str(root), "--tasks", *tasks, "--any-size", "--quiet"]) == 0
