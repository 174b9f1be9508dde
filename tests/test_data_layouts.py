"""Data layouts on disk: real image files written by arcvit.data.writers from Fashion-MNIST, read back."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

import arcvit  # noqa: F401  (registers vit_pico_patch7_28 with timm)
from arcvit.data.idx import load_fashion_mnist
from arcvit.data.layouts import FGVC_TASKS, VTAB_TASKS, detect_layout, load_split, resolve_task
from arcvit.data.transforms import build_transform
from arcvit.data.writers import write_fgvc_task, write_image_folder, write_vtab_task
from arcvit.errors import ConfigError, DataError

TO_TENSOR = T.ToTensor()
CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist("test")
    return images[:40], labels[:40]


@pytest.fixture
def vtab_root(tmp_path: Path, fmnist) -> Path:
    """cifar with train800 = images 0..19, val200 = 20..29 (grey) and test = 30..39 (RGB)."""
    images, labels = fmnist
    rgb = np.repeat(images[30:, ..., None], 3, axis=-1)
    write_vtab_task(tmp_path / "cifar", {"train800": (images[:20], labels[:20]),
                                         "val200": (images[20:30], labels[20:30]), "test": (rgb, labels[30:])})
    return tmp_path


@pytest.fixture
def fgvc_root(tmp_path: Path, fmnist) -> Path:
    """Stanford-dogs with sparse, shifted class ids (3·label + 5) and its images under Images/."""
    images, labels = fmnist
    ids = labels * 3 + 5
    write_fgvc_task(tmp_path / "Stanford-dogs", {"train": (images[:20], ids[:20]), "val": (images[20:30], ids[20:30]),
                                                 "test": (images[30:], ids[30:])}, image_subdir="Images")
    return tmp_path


@pytest.fixture
def folder_root(tmp_path: Path, fmnist) -> Path:
    images, labels = fmnist
    write_image_folder(tmp_path / "fm" / "train", images[:30], labels[:30], CLASSES)
    return tmp_path / "fm"


def labels_of(dataset) -> list[int]:
    return [label for _, label in dataset.samples]


def raises_data_error(call, *parts: str) -> str:
    """Assert ``call()`` raises DataError whose one-line message names every part; return the message."""
    with pytest.raises(DataError, match="".join(f"(?=.*{re.escape(part)})" for part in parts)) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- registries -----------------------------------------------------------------------------------------

def test_registries_match_the_benchmarks():
    assert len(VTAB_TASKS) == 19 and len(FGVC_TASKS) == 5
    assert Counter(t.group for t in VTAB_TASKS.values()) == {"natural": 7, "specialized": 4, "structured": 8}
    assert [t.num_classes for t in FGVC_TASKS.values()] == [200, 555, 102, 120, 196]


@pytest.mark.parametrize("name,layout,folder", [
    ("CIFAR-100", "vtab", "cifar"), ("pcam", "vtab", "patch_camelyon"), ("clevr-count", "vtab", "clevr_count"),
    ("Flowers", "vtab", "oxford_flowers102"), ("flowers", "fgvc", "OxfordFlower"), ("cub", "fgvc", "CUB_200_2011"),
    ("stanford_cars", "fgvc", "Stanford-cars"),
])
def test_aliases(name, layout, folder):
    assert resolve_task(name, layout).folder == folder


# --- loading each layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("split,lo,hi", [("train800", 0, 20), ("val200", 20, 30),
                                         ("train800val200", 0, 30), ("test", 30, 40)])
def test_vtab_splits(vtab_root, fmnist, split, lo, hi):
    images, labels = fmnist
    data = load_split(vtab_root, "CIFAR-100", split, TO_TENSOR)
    assert (len(data), data.num_classes, len(data.class_names)) == (hi - lo, 100, 100)
    assert labels_of(data) == labels[lo:hi].tolist()
    x, y = data[0]
    assert x.shape == (3, 28, 28) and y == labels[lo]
    assert torch.equal((x * 255).round().to(torch.uint8)[1], torch.from_numpy(images[lo]))


def test_vtab_list_tolerates_blank_lines_and_spaces_in_paths(vtab_root, fmnist):
    task = vtab_root / "cifar"
    (task / "images" / "test" / "0.png").rename(task / "images" / "test" / "my image 0.png")
    (task / "test.txt").write_text("\nimages/test/my image 0.png  7\n\n  images/test/1.png\t3 \n\n")
    data = load_split(vtab_root, "cifar", "test", TO_TENSOR)
    assert labels_of(data) == [7, 3] and data[0][0].shape == (3, 28, 28)


def test_fgvc_remaps_ids_and_unions_trainval(fgvc_root, fmnist):
    ids = fmnist[1] * 3 + 5
    order = sorted(set(ids.tolist()))
    data = load_split(fgvc_root, "dogs", "trainval", TO_TENSOR)
    assert (len(data), data.num_classes) == (30, 120)
    assert labels_of(data) == [order.index(i) for i in ids[:30]]
    assert data.samples[0][0] == fgvc_root / "Stanford-dogs" / "Images" / "train" / "0.png"
    assert len(load_split(fgvc_root, "Stanford-dogs", "test", TO_TENSOR)) == 10


def test_image_folder_with_split_and_single_folder(folder_root, fmnist):
    labels = fmnist[1][:30]
    data = load_split(folder_root, "", "train", TO_TENSOR, layout="folder")
    assert (len(data), data.num_classes, data.class_names) == (30, 10, CLASSES)
    assert sorted(labels_of(data)) == sorted(labels.tolist())
    assert data[0][0].shape == (3, 28, 28)
    single = load_split(folder_root / "train", "", "", TO_TENSOR)
    assert single.fingerprint() == data.fingerprint()


def test_auto_detection(vtab_root, fgvc_root, folder_root):
    assert detect_layout(vtab_root, "cifar100") == "vtab"
    assert detect_layout(vtab_root / "cifar") == "vtab"
    assert detect_layout(fgvc_root, "dogs") == "fgvc"
    assert detect_layout(folder_root) == "folder"
    assert load_split(vtab_root / "cifar", "", "val200", TO_TENSOR).source.startswith("VTAB-1k cifar/val200")
    assert load_split(fgvc_root, "dogs", "val", TO_TENSOR).source.startswith("FGVC Stanford-dogs/val")
    assert load_split(folder_root.parent, "fm", "train", TO_TENSOR).num_classes == 10


def test_fingerprint_is_stable_and_tracks_labels(vtab_root):
    first = load_split(vtab_root, "cifar", "train800", TO_TENSOR).fingerprint()
    assert load_split(vtab_root, "cifar", "train800", None).fingerprint() == first
    lines = (vtab_root / "cifar" / "train800.txt").read_text().splitlines()
    path, label = lines[0].rsplit(maxsplit=1)
    lines[0] = f"{path} {(int(label) + 1) % 10}"
    (vtab_root / "cifar" / "train800.txt").write_text("\n".join(lines) + "\n")
    assert load_split(vtab_root, "cifar", "train800", TO_TENSOR).fingerprint() != first


# --- bad input ----------------------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    raises_data_error(lambda: load_split(tmp_path / "nowhere", "cifar", "test", TO_TENSOR), "nowhere")


def test_unknown_task(vtab_root):
    raises_data_error(lambda: load_split(vtab_root, "cifar10", "test", TO_TENSOR, layout="vtab"),
                      "cifar10", "VTAB-1k", "svhn", "layout 'vtab'")
    raises_data_error(lambda: load_split(vtab_root, "imagenet", "test", TO_TENSOR),
                      "imagenet", "VTAB-1k", "FGVC", "image folder", "Stanford-cars")
    raises_data_error(lambda: load_split(vtab_root, "eurosat", "test", TO_TENSOR),
                      str(vtab_root / "eurosat"), "train800.txt", "image folder")


def test_benchmark_folder_without_list_files_says_what_was_looked_for(vtab_root):
    (vtab_root / "dmlab").mkdir()
    raises_data_error(lambda: load_split(vtab_root, "dmlab", "test", TO_TENSOR),
                      str(vtab_root / "dmlab" / "test"), "also looked for VTAB-1k files", "train800.txt")


def test_missing_list_file_names_it_and_what_is_there(vtab_root):
    (vtab_root / "cifar" / "test.txt").unlink()
    raises_data_error(lambda: load_split(vtab_root, "cifar", "test", TO_TENSOR), "test.txt", "train800.txt")


def test_malformed_line(vtab_root):
    with open(vtab_root / "cifar" / "train800.txt", "a") as f:
        f.write("images/train800/0.png three\n")
    raises_data_error(lambda: load_split(vtab_root, "cifar", "train800", TO_TENSOR),
                      "train800.txt:21", "images/train800/0.png three")


def test_label_out_of_range(tmp_path, fmnist):
    write_vtab_task(tmp_path / "svhn", {"test": (fmnist[0][:3], np.array([0, 10, 1]))})
    raises_data_error(lambda: load_split(tmp_path, "svhn", "test", TO_TENSOR), "test.txt:2", "label 10")


def test_listed_image_missing(vtab_root):
    (vtab_root / "cifar" / "images" / "test" / "3.png").unlink()
    raises_data_error(lambda: load_split(vtab_root, "cifar", "test", TO_TENSOR), "test.txt:4", "3.png")


def test_empty_split(vtab_root):
    (vtab_root / "cifar" / "val200.txt").write_text("\n")
    raises_data_error(lambda: load_split(vtab_root, "cifar", "val200", TO_TENSOR), "val200.txt", "no images")


def test_fgvc_bad_json(fgvc_root):
    folder = fgvc_root / "Stanford-dogs"
    (folder / "val.json").write_text('{"val/0.png": "3"}')
    raises_data_error(lambda: load_split(fgvc_root, "dogs", "train", TO_TENSOR), "val.json", "val/0.png", "'3'")
    (folder / "val.json").write_text('{\n"val/0.png": 3,,\n}')
    raises_data_error(lambda: load_split(fgvc_root, "dogs", "val", TO_TENSOR), "val.json:2")
    (folder / "val.json").write_text(json.dumps({f"val/{i}.png": i for i in range(121)}))
    raises_data_error(lambda: load_split(fgvc_root, "dogs", "val", TO_TENSOR), "val.json", "120 classes")
    (folder / "test.json").unlink()
    raises_data_error(lambda: load_split(fgvc_root, "dogs", "test", TO_TENSOR), "test.json", "train.json")


def test_image_folder_missing_split(folder_root):
    raises_data_error(lambda: load_split(folder_root, "", "val", TO_TENSOR, layout="folder"), "val", "holds: train")


def test_corrupt_image_fails_on_read_or_is_skipped(vtab_root):
    bad = vtab_root / "cifar" / "images" / "train800" / "5.png"
    bad.write_bytes(bad.read_bytes()[:60])
    data = load_split(vtab_root, "cifar", "train800", TO_TENSOR)
    raises_data_error(lambda: data[5], str(bad))
    kept = load_split(vtab_root, "cifar", "train800val200", TO_TENSOR, skip_corrupt=True)
    assert len(kept) == 29 and [path for path, _ in kept.skipped] == [bad] and kept.skipped[0][1]
    assert bad not in [path for path, _ in kept.samples]


def test_bad_settings_are_config_errors(vtab_root):
    with pytest.raises(ConfigError, match="train800val200"):
        load_split(vtab_root, "cifar", "train", TO_TENSOR)
    with pytest.raises(ConfigError, match="'tfds'"):
        load_split(vtab_root, "cifar", "test", TO_TENSOR, layout="tfds")


# --- transforms ---------------------------------------------------------------------------------------------

TINY_CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
WHITE_GREY = Image.new("L", (20, 13), 255)


@pytest.fixture(scope="module")
def pico() -> torch.nn.Module:
    return timm.create_model("vit_pico_patch7_28")


@pytest.mark.parametrize("recipe", ["timm", "paper"])
@pytest.mark.parametrize("layout", ["vtab", "fgvc"])
@pytest.mark.parametrize("train", [True, False])
def test_transform_gives_model_input_size(pico, recipe, layout, train):
    x = build_transform(pico, recipe=recipe, train=train, layout=layout)(WHITE_GREY)
    assert x.shape == (3, 28, 28)


def test_transform_normalisation_follows_recipe(pico):
    timm_value = build_transform(pico, train=False)(WHITE_GREY)[0, 0, 0].item()
    paper_value = build_transform(pico, recipe="paper", train=False)(WHITE_GREY)[0, 0, 0].item()
    assert timm_value == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-3)  # the pico model's Fashion-MNIST stats
    assert paper_value == pytest.approx((1 - 0.485) / 0.229, abs=1e-3)  # ImageNet's


def test_paper_recipe_for_a_224_config():
    vtab = build_transform(TINY_CFG, recipe="paper", train=True, layout="vtab")
    assert vtab(WHITE_GREY).shape == (3, 224, 224)
    fgvc = build_transform(TINY_CFG, recipe="paper", train=True, layout="fgvc")
    assert [t.size for t in fgvc.transforms if isinstance(t, T.Resize)] == [256]
    assert fgvc(WHITE_GREY).shape == (3, 224, 224)
    assert build_transform(TINY_CFG, train=False)(WHITE_GREY).shape == (3, 224, 224)


def test_unknown_recipe(pico):
    with pytest.raises(ConfigError, match="'vpt'"):
        build_transform(pico, recipe="vpt", train=True)
