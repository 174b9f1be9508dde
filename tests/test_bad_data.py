"""Data that would otherwise be read silently wrong: odd label strings, a typo'd huge label, paths leaving the
data root, unreadable images skipped, single-class splits, classes never trained on. Small real files on disk."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_layouts import raises_data_error as data_error  # noqa: E402  (the layouts tests' own check)

from arcvit.data.layouts import load_split, warn_unseen_classes
from arcvit.errors import DataWarning


def write_task(root: Path, name: str, lines: dict[str, list[str]], images: int = 6) -> Path:
    """A VTAB-1k-layout task ``root/name`` with PNGs images/0..images-1.png and the given list files."""
    task = root / name
    (task / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(task / "images" / f"{i}.png")
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("".join(row + "\n" for row in rows))
    return task




def data_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.parametrize("label", ["٣", "1e3", "+1", "0x1", "1_0", "1.0", "١٢"])
def test_label_must_be_ascii_decimal(tmp_path, label):
    write_task(tmp_path, "t", {"test": ["images/0.png 0", f"images/1.png {label}"]})
    data_error(lambda: load_split(tmp_path, "t", "test", None), "test.txt:2", repr(label), "not a decimal integer")


def test_huge_label_in_custom_task_is_a_typo(tmp_path):
    write_task(tmp_path, "t", {"train800": ["images/0.png 0", "images/1.png 1", "images/2.png 10000000"],
                               "test": ["images/3.png 1"]})
    message = data_error(lambda: load_split(tmp_path, "t", "test", None),
                         "label 10000000 on", "train800.txt:3", "is larger than")
    assert "1000" in message and "classes.txt" in message


def test_custom_class_count_from_all_lists_and_bounded_by_names(tmp_path):
    task = write_task(tmp_path, "t", {"train800": ["images/0.png 0", "images/1.png 1500"],
                                      "test": ["images/3.png 1"]})
    data_error(lambda: load_split(tmp_path, "t", "test", None), "label 1500")
    (task / "classes.txt").write_text("".join(f"c{i}\n" for i in range(1501)))
    assert load_split(tmp_path, "t", "test", None).num_classes == 1501  # the names vouch for the labels


def test_label_outside_known_task_refused(tmp_path):
    write_task(tmp_path, "svhn", {"train800": ["images/0.png 3", "images/1.png 10"]})
    data_error(lambda: load_split(tmp_path, "svhn", "train800", None), "train800.txt:2", "label 10 outside 0..9")


def test_image_folder_named_after_a_known_task_with_too_many_classes(tmp_path):
    for c in range(3):
        (tmp_path / "patch_camelyon" / f"class{c}").mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "patch_camelyon" / f"class{c}" / "0.png")
    data_error(lambda: load_split(tmp_path, "patch_camelyon", "", None, layout="folder"),
               "3 class folders", "'patch_camelyon' has 2 classes")


@pytest.mark.parametrize("row, why", [("{abs}/images/0.png 0", "absolute path"),
                                      ("../../other/images/0.png 0", "outside the data root"),
                                      ("images/../../../other/images/0.png 0", "outside the data root"),
                                      ("link/0.png 0", "outside the data root")])
def test_list_paths_stay_inside_the_root(tmp_path, row, why):
    outside = write_task(tmp_path, "other", {})
    root = tmp_path / "root"
    task = write_task(root, "t", {"test": ["images/1.png 1", row.format(abs=outside)]})
    (task / "link").symlink_to(outside / "images", target_is_directory=True)
    data_error(lambda: load_split(root, "t", "test", None), "test.txt:2", why, "--allow-outside-root")
    assert len(load_split(root, "t", "test", None, allow_outside_root=True)) == 2


def test_symlinked_image_folder_out_of_root_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "cat"
    outside.mkdir(parents=True)
    Image.new("L", (4, 4)).save(outside / "0.png")
    (tmp_path / "root" / "train").mkdir(parents=True)
    (tmp_path / "root" / "train" / "cat").symlink_to(outside, target_is_directory=True)
    data_error(lambda: load_split(tmp_path / "root", "", "train", None, layout="folder"), "outside the data root")


def test_symlink_inside_the_root_is_fine(tmp_path):
    task = write_task(tmp_path, "t", {"test": ["alias/0.png 0", "images/1.png 1"]})
    (task / "alias").symlink_to(task / "images", target_is_directory=True)
    assert len(load_split(tmp_path, "t", "test", None)) == 2


@pytest.mark.parametrize("task", ["../other", "{abs}"])
def test_task_outside_the_root_refused(tmp_path, task):
    other = write_task(tmp_path, "other", {"test": ["images/0.png 0", "images/1.png 1"]})
    root = tmp_path / "root"
    root.mkdir()
    data_error(lambda: load_split(root, task.format(abs=other), "test", None), "--task", "data root")


def test_skip_corrupt_warns_with_count_and_paths(tmp_path):
    task = write_task(tmp_path, "t", {"test": [f"images/{i}.png {i % 2}" for i in range(6)]})
    for i in (1, 2, 3, 4):
        (task / "images" / f"{i}.png").write_bytes(b"not a png")
    caught = data_warnings(lambda: load_split(tmp_path, "t", "test", None, skip_corrupt=True))
    assert len(caught) == 1
    assert re.search(r"skipped 4 unreadable image\(s\): .*1\.png .*2\.png .*3\.png .* and 1 more$", caught[0])
    assert "4.png" not in caught[0]


def test_single_class_split_warns(tmp_path):
    write_task(tmp_path, "t", {"train800": ["images/0.png 2", "images/1.png 2"], "test": ["images/2.png 0",
                                                                                          "images/3.png 1"]})
    caught = data_warnings(lambda: load_split(tmp_path, "t", "train800", None))
    assert len(caught) == 1 and "every image has label 2" in caught[0]
    assert data_warnings(lambda: load_split(tmp_path, "t", "test", None)) == []


def test_classes_missing_from_train_are_named(tmp_path):
    task = write_task(tmp_path, "t", {"train800": ["images/0.png 0", "images/1.png 1"],
                                      "test": ["images/2.png 0", "images/3.png 2", "images/4.png 3"]})
    (task / "classes.txt").write_text("zero\none\ntwo\nthree\n")
    train, test = (load_split(tmp_path, "t", s, None) for s in ("train800", "test"))
    unseen = []
    caught = data_warnings(lambda: unseen.extend(warn_unseen_classes(train, test)))
    assert unseen == [2, 3] and len(caught) == 1 and "2 class(es) never appear in the training split" in caught[0]
    assert "2 (two), 3 (three)" in caught[0]
    assert data_warnings(lambda: warn_unseen_classes(train, train)) == []


@pytest.mark.parametrize("entry, why", [("/etc/hostname", "absolute path"), ("../../../outside.png", "outside the data root")])
def test_fgvc_entries_stay_inside_the_root(tmp_path, entry, why):
    task = tmp_path / "root" / "Stanford-dogs"
    (task / "Images").mkdir(parents=True)
    Image.new("L", (4, 4)).save(task / "Images" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "outside.png")
    (task / "train.json").write_text(json.dumps({"a.png": 3, entry: 5}))
    data_error(lambda: load_split(tmp_path / "root", "dogs", "train", None), "train.json", repr(entry), why)
