"""Training end to end on real image folders in every layout, protocols, determinism, run-folder contents."""
import csv
import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import arcvit_command, subprocess_env
from safetensors.torch import load_file, save_file

from arcvit.backends.timm.create import create_backbone
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


def _run(root, task, out, on_epoch_end=None, **kw):
    return train(BACKBONE, DataSpec(str(root), task), _cfg(**kw), out, pretrained=False, progress=False,
                 max_steps_per_epoch=3, on_epoch_end=on_epoch_end)


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
    _run(tmp_path / "data", "digits", tmp_path / "c", seed=1)
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
                                         ("method", "nosuch"), ("protocol", "test"), ("rank", 0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "warmup_epochs" else "warmup"):
        _cfg(**{field: value})


# ------------------------------------------------------------------ guards (issue 9) and the tuner's hooks


def _vtab(root, digits, task="digits"):
    images, labels, _ = digits
    write_vtab_task(root / task, {"train800": (images[:80], labels[:80]), "val200": (images[80:120], labels[80:120]),
                                  "test": (images[120:], labels[120:])})
    return root


class _Stop(Exception):
    pass


def _stop_after_first_epoch(epoch, row):
    raise _Stop(epoch)


def test_resume_refuses_another_task_data_backbone_weights_or_method(tmp_path, digits):
    data = _vtab(tmp_path / "data", digits)
    shutil.copytree(data / "digits", data / "digits2")
    other_root = shutil.copytree(data, tmp_path / "data2")
    weights = tmp_path / "backbone.safetensors"
    save_file(create_backbone(BACKBONE, 10, pretrained=False).state_dict(), weights)
    out = tmp_path / "run"
    start = dict(backbone=BACKBONE, data=DataSpec(str(data), "digits"), cfg=_cfg(), out_dir=out, checkpoint=weights,
                 pretrained=False, progress=False, max_steps_per_epoch=3)
    with pytest.raises(_Stop, match="^1$"):  # an exception from the hook ends training and propagates unchanged
        train(**start, on_epoch_end=_stop_after_first_epoch)
    settings = (out / "settings.json").read_bytes()

    def refused(field, **change):
        with pytest.raises(ConfigError, match="--resume with other settings than the run started with") as e:
            train(**(start | change), resume=True)
        message = str(e.value)
        assert "--resume with other settings than the run started with" in message and f"{field}:" in message
        assert len(message.splitlines()) == 1
        assert (out / "settings.json").read_bytes() == settings
    refused("data.root", data=DataSpec(str(other_root), "digits"))
    refused("data.task", data=DataSpec(str(data), "digits2"))
    refused("backbone", backbone=f"{BACKBONE}.fmnist_arcvit", checkpoint=None, pretrained=True)
    refused("pretrained", pretrained=True)  # the same --checkpoint, without --random-init
    refused("checkpoint_sha256", checkpoint=None)
    refused("method", cfg=_cfg(method="bitfit", rank=None))
    original = weights.read_bytes()
    save_file(create_backbone(BACKBONE, 10, pretrained=False).state_dict(), weights)  # same name, other weights
    refused("checkpoint_sha256")
    weights.write_bytes(original)
    listing = data / "digits" / "train800val200.txt"  # the training split of protocol "final"
    lines = listing.read_text()
    listing.write_text("".join(lines.splitlines(keepends=True)[:-1]))
    refused("data_fingerprints.train")
    listing.write_text(lines)
    results = train(**start, resume=True)  # unchanged settings (and data) still resume
    assert results["selected_epoch"] == 2
    settings = (out / "settings.json").read_bytes()
    refused("data.task", data=DataSpec(str(data), "digits2"))  # a finished run answers only its own question
    assert train(**start, resume=True) == results


@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_diverging_run_stops_with_one_line_and_keeps_its_checkpoints(clip, train_argv, capsys, tmp_path):
    from arcvit.cli import main
    from arcvit.training.checkpoint import load_latest_checkpoint
    out = tmp_path / "run"
    code = main([*train_argv(out, "--lr", "1e6", "--grad-clip", clip)])
    stdout, err = capsys.readouterr()
    assert code == 1 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"arcvit train: error: {out}: training diverged at epoch "), err
    assert ("the loss is not a finite number" if clip == "0" else "is not a finite number") in lines[0]
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    finished = len(list(csv.DictReader((out / "metrics.csv").open()))) if (out / "metrics.csv").exists() else 0
    ckpt = load_latest_checkpoint(out / "checkpoints")
    assert (ckpt.epoch if ckpt else 0) == finished  # every finished epoch's checkpoint, none of the failed one


def test_a_loss_gone_bad_after_an_epoch_stops_the_run_and_keeps_its_checkpoint(tmp_path, digits):
    from timm.models.vision_transformer import VisionTransformer

    from arcvit.errors import TrainingDiverged
    from arcvit.training.checkpoint import load_latest_checkpoint
    data = _vtab(tmp_path / "data", digits)
    armed = []

    def nan_logits(module, inputs, output):  # from epoch 2 on, as if the model had overflowed
        if armed and isinstance(module, VisionTransformer):
            return output * float("nan")
    handle = torch.nn.modules.module.register_module_forward_hook(nan_logits)
    try:
        with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 2, step 1: the loss is not a finite"):
            _run(data, "digits", tmp_path / "run", epochs=3, on_epoch_end=lambda epoch, row: armed.append(epoch))
    finally:
        handle.remove()
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "adapter").exists()
    ckpt = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.epoch == 1 and all(t.isfinite().all() for t in ckpt.tensors.values())


def test_a_run_folder_takes_one_training_process_at_a_time(train_argv, arcvit_cli, tmp_path):
    from arcvit.training.runfolder import run_lock
    out = tmp_path / "run"
    first = subprocess.Popen([*arcvit_command(), *train_argv(out, "--epochs", "500")], env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "settings.json").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock, changes nothing while the second one tries
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for extra in ((), ("--resume",)):
            second = arcvit_cli(*train_argv(out, "--epochs", "500", *extra))
            assert second.returncode == 1 and second.stdout == ""
            assert second.stderr.strip().splitlines() == [
                f"arcvit train: error: {out}: another arcvit process is training into this run folder; wait for "
                "it to finish, or choose another --out"]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        first.kill()
        first.wait()
    with run_lock(out):  # a killed process holds nothing
        pass


def test_16_mixed_on_cpu_records_the_precision_it_ran(tmp_path, digits, capfd):
    data = _vtab(tmp_path / "data", digits)
    train(BACKBONE, DataSpec(str(data), "digits"), _cfg(epochs=1, warmup_epochs=0, precision="16-mixed",
                                                        accelerator="cpu"),
          tmp_path / "run", pretrained=False, progress=False, max_steps_per_epoch=1)
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["precision"] == "bf16-mixed" and settings["train"]["precision"] == "16-mixed"
    assert "warning: precision 16-mixed is not available on cpu; training runs bf16-mixed" in capfd.readouterr().err


def test_tuner_hooks_see_each_final_row_and_skip_the_test_split(tmp_path, digits):
    data = _vtab(tmp_path / "data", digits)
    (data / "digits" / "test.txt").write_text("not a list file\n")  # loading it would fail
    seen = []

    def hook(epoch, row):
        assert (tmp_path / "run" / "checkpoints" / f"epoch-{epoch:04d}.json").is_file()
        seen.append((epoch, dict(row)))
    results = train(BACKBONE, DataSpec(str(data), "digits"), _cfg(protocol="select"), tmp_path / "run",
                    pretrained=False, progress=False, max_steps_per_epoch=3, on_epoch_end=hook,
                    evaluate_test=False)
    assert [e for e, _ in seen] == [1, 2] and all("val_top1" in row for _, row in seen)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [float(r["val_top1"]) for r in rows] == [row["val_top1"] for _, row in seen]
    assert results["test_top1"] is None and results["test_images"] is None
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_top1"] is None
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("key", [0, "blocks.0.attn.qkv.adapters.default.scale"])  # DDP's ids, FSDP's names
def test_checkpoint_format_round_trips_what_fabric_hands_it(key, tmp_path):
    from arcvit.training.checkpoint import SafeCheckpointIO
    state = {"model": {"head.weight": torch.randn(3, 4)},
             "optimizer": {"state": {key: {"step": torch.tensor(5.0), "exp_avg": torch.randn(3, 4), "flag": 1}},
                           "param_groups": [{"lr": 0.1, "params": [key]}]},
             "scheduler": {"last_epoch": 5}, "loop": {"epoch": 2, "metrics": [{"epoch": 1}], "rng/torch": torch.ones(3)}}
    io = SafeCheckpointIO(keep=1)
    io.save_checkpoint(state, tmp_path / "epoch-0001.safetensors")
    io.save_checkpoint(state, tmp_path / "epoch-0002.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.json", "epoch-0002.safetensors"]
    back = io.load_checkpoint(tmp_path / "epoch-0002.safetensors")
    assert back["scheduler"] == state["scheduler"] and back["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [key]}]
    slots = back["optimizer"]["state"][key]
    assert slots["flag"] == 1 and torch.equal(slots["exp_avg"], state["optimizer"]["state"][key]["exp_avg"])
    assert torch.equal(back["model"]["head.weight"], state["model"]["head.weight"])
    assert back["loop"]["epoch"] == 2 and torch.equal(back["loop"]["rng/torch"], torch.ones(3))


def test_a_run_folder_of_arcvit_01_resumes_with_the_placement_it_started_with(tmp_path, digits):
    """0.1 placed ARC's adapters on qkv/fc1 ("sequential") and recorded no arc_impl; today's default is "fused"."""
    data = _vtab(tmp_path / "data", digits)
    out = tmp_path / "run"
    start = dict(backbone=BACKBONE, data=DataSpec(str(data), "digits"), out_dir=out, pretrained=False,
                 progress=False, max_steps_per_epoch=3)
    with pytest.raises(_Stop, match="^1$"):
        train(**start, cfg=_cfg(arc_impl="sequential"), on_epoch_end=_stop_after_first_epoch)
    settings = json.loads((out / "settings.json").read_text())
    del settings["train"]["arc_impl"]  # as arcvit 0.1 wrote it
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="does not hold the parameters this run trains"):
        train(**start, cfg=_cfg(arc_impl="fused"), resume=True)  # another placement is refused, never half-loaded
    results = train(**start, cfg=_cfg(), resume=True)
    assert results["selected_epoch"] >= 1
    assert json.loads((out / "settings.json").read_text())["train"]["arc_impl"] == "sequential"
