"""Training end to end on real image folders in every layout, protocols, determinism, run-folder contents."""
import csv
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from arcvit.data.sources import mnist5k
from arcvit.data.writers import write_fgvc_task, write_image_folder, write_vtab_task
from arcvit.errors import ConfigError
from arcvit.training.loop import DataSpec, TrainConfig, train

BACKBONE = "vit_pico_patch7_28"


@pytest.fixture(scope="module")
def digits():
    source = mnist5k()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(source.labels))[:160]
    return source.images[idx], source.labels[idx], source.class_names


def _cfg(**kw):
    base = dict(method="arc", rank=4, epochs=2, warmup_epochs=1, batch_size=16, eval_batch_size=64)
    return TrainConfig(**(base | kw))


def _run(root, task, out, **kw):
    return train(BACKBONE, DataSpec(str(root), task), _cfg(**kw), out, pretrained=False, progress=False,
                 max_steps_per_epoch=3)


def test_vtab_layout_final_protocol_writes_a_complete_run_folder(tmp_path, digits):
    images, labels, _ = digits
    write_vtab_task(tmp_path / "data" / "digits", {"train800": (images[:80], labels[:80]),
                                                   "val200": (images[80:120], labels[80:120]),
                                                   "test": (images[120:], labels[120:])})
    out = tmp_path / "run"
    results = _run(tmp_path / "data", "digits", out)
    assert results["protocol"] == "final" and results["train_images"] == 120 and results["test_images"] == 40
    assert results["selected_epoch"] == 2 and results["val_top1"] is None
    settings = json.loads((out / "settings.json").read_text())
    assert settings["data"]["splits"] == {"train": "train800val200", "test": "test"}
    assert set(settings["data_fingerprints"]) == {"train", "test"}
    assert settings["train"]["seed"] == 0 and settings["versions"]["timm"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert json.loads((out / "results.json").read_text()) == results


def test_select_protocol_reports_test_at_the_best_validation_epoch(tmp_path, digits):
    images, labels, _ = digits
    write_vtab_task(tmp_path / "data" / "digits", {"train800": (images[:80], labels[:80]),
                                                   "val200": (images[80:120], labels[80:120]),
                                                   "test": (images[120:], labels[120:])})
    results = _run(tmp_path / "data", "digits", tmp_path / "run", protocol="select", epochs=3)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    val = [float(r["val_top1"]) for r in rows]
    assert results["selected_epoch"] == 1 + val.index(max(val))
    assert results["val_top1"] == max(val) and results["train_images"] == 80


def test_fgvc_json_layout(tmp_path, digits):
    images, labels, _ = digits
    write_fgvc_task(tmp_path / "Stanford-dogs", {"train": (images[:64], labels[:64]),
                                                 "val": (images[64:96], labels[64:96]),
                                                 "test": (images[96:], labels[96:])}, image_subdir="Images")
    results = _run(tmp_path, "dogs", tmp_path / "run", method="bitfit", rank=None)
    assert results["train_images"] == 96 and results["test_images"] == 64  # trainval = train + val
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["data"]["layout"] == "fgvc" and settings["num_classes"] == 120
    assert (tmp_path / "run" / "trainable.safetensors").is_file()


def test_image_folder_layout(tmp_path, digits):
    images, labels, names = digits
    names = [f"{i}_{n}" for i, n in enumerate(names)]
    write_image_folder(tmp_path / "data" / "train", images[:100], labels[:100], names)
    write_image_folder(tmp_path / "data" / "test", images[100:], labels[100:], names)
    results = _run(tmp_path / "data", "", tmp_path / "run", method="linear", rank=None)
    assert results["train_images"] == 100 and results["test_images"] == 60


def test_same_seed_same_run(tmp_path, digits):
    images, labels, _ = digits
    write_vtab_task(tmp_path / "data" / "digits", {"train800": (images[:80], labels[:80]),
                                                   "val200": (images[80:120], labels[80:120]),
                                                   "test": (images[120:], labels[120:])})
    a = _run(tmp_path / "data", "digits", tmp_path / "a")
    b = _run(tmp_path / "data", "digits", tmp_path / "b")
    c = _run(tmp_path / "data", "digits", tmp_path / "c", seed=1)
    ta, tb, tc = (load_file(tmp_path / r / "adapter" / "adapter.safetensors") for r in "abc")
    assert all((ta[k] == tb[k]).all() for k in ta)
    assert any((ta[k] != tc[k]).any() for k in ta)
    assert a["test_top1"] == b["test_top1"]


def test_finished_run_is_not_overwritten(tmp_path, digits):
    images, labels, _ = digits
    write_vtab_task(tmp_path / "data" / "digits", {"train800": (images[:80], labels[:80]),
                                                   "val200": (images[80:120], labels[80:120]),
                                                   "test": (images[120:], labels[120:])})
    _run(tmp_path / "data", "digits", tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="finished already"):
        _run(tmp_path / "data", "digits", tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    resumed = train(BACKBONE, DataSpec(str(tmp_path / "data"), "digits"), _cfg(), tmp_path / "run",
                    pretrained=False, progress=False, resume=True)
    assert resumed == json.loads(before)


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("batch_size", 0), ("epochs", 0), ("warmup_epochs", 5),
                                         ("method", "dora"), ("protocol", "test"), ("rank", 0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "warmup_epochs" else "warmup"):
        _cfg(**{field: value})
