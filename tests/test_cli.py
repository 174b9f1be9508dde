"""The `arcvit` command line: happy paths of every command, and every bad input the CLI documents
(docs/bad-inputs.md) giving one clear line on stderr, a non-zero exit code, no traceback, and no change to any
file that existed before.

Runs in-process (``arcvit.cli.main``) wherever no process is launched, so the whole file costs one small
training run; one test runs the real ``arcvit`` executable to check the exit code and stderr end to end.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import BACKBONE, TINY_TASK
from safetensors import safe_open
from safetensors.torch import save_file

from arcvit.cli import main

torch.set_num_threads(1)

EPOCHS = "2"
NUM_CLASSES = 6  # shapes_count: 1-6 shapes


class Evil:
    """Unpickling this runs ``exec``, which writes the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``arcvit ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse (--help, bad flags)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tiny_data, mini_data, tmp_path_factory):
    """A workspace: a backbone file, a finished run with its adapter, a merged checkpoint, and bad files."""
    import timm
    ws = tmp_path_factory.mktemp("cli_ws")
    torch.manual_seed(0)
    backbone = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    save_file(backbone.state_dict(), ws / "pico.safetensors")
    bb = ["--backbone", BACKBONE, "--checkpoint", ws / "pico.safetensors"]
    ns = {"root": ws, "bb": bb, "data": tiny_data, "mini": mini_data, "run": ws / "run",
          "adapter": ws / "run" / "adapter", "merged": ws / "merged.safetensors",
          "test_images": sorted((tiny_data / TINY_TASK / "images" / "test").glob("*.png"))}
    code, out, err = call_quiet(["train", *bb, "--data", tiny_data, "--task", TINY_TASK, "--epochs", EPOCHS,
                                 "--warmup-epochs", "0", "--batch-size", "16", "--accelerator", "cpu", "--quiet",
                                 "--out", ns["run"]])
    assert code == 0, err
    ns["train_stdout"] = out
    code, out, err = call_quiet(["merge", *bb, "--adapter", ns["adapter"], "--out", ns["merged"]])
    assert code == 0, err
    ns["merge_stdout"] = out
    _write_bad_files(ws, ns)
    return ns


def call_quiet(argv: list) -> tuple[int, str, str]:
    """``call`` for fixtures, which cannot use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _copy_task(src: Path, dst: Path) -> Path:
    """A copy of a VTAB-1k task: list files, classes.txt and images (a symlink out of the data root would be
    refused)."""
    shutil.copytree(src, dst)
    return dst


def _edit_line(path: Path, index: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[index] = new
    path.write_text("".join(lines))


def _write_bad_files(ws: Path, ns: dict) -> None:
    import arcvit
    from arcvit.backends.timm.create import create_backbone
    from arcvit.core.adapter_file import CONFIG_NAME, WEIGHTS_NAME
    task = ns["data"] / TINY_TASK
    bad = ws / "bad"
    bad.mkdir()
    # Pickles disguised as checkpoints under every suffix arcvit reads.
    for suffix in (".pth", ".bin", ".ckpt", ".safetensors", ".npz"):
        torch.save({"weight": Evil(ws / "PWNED")}, bad / f"evil{suffix}")
    with open(bad / "evil_plain_pickle.pth", "wb") as f:  # pickle.dump, not torch.save: no zip container
        pickle.dump({"weight": Evil(ws / "PWNED")}, f)
    (bad / "notes.txt").write_text("hello")
    (bad / "not_an_image.png").write_text("this is text, not a PNG\n")
    png = task / "images" / "test" / "0.png"
    (bad / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    # Data sets, each with one fault in an otherwise good copy of the tiny task.
    data = bad / "data"
    t = _copy_task(task, data / "label_oob" / "svhn")  # a registered VTAB-1k task: 10 classes
    (t / "classes.txt").unlink()
    _edit_line(t / "test.txt", 3, "images/test/3.png 12\n")
    t = _copy_task(task, data / "label_neg" / TINY_TASK)
    _edit_line(t / "test.txt", 3, "images/test/3.png -1\n")
    t = _copy_task(task, data / "label_text" / TINY_TASK)
    _edit_line(t / "test.txt", 3, "images/test/3.png three\n")
    t = _copy_task(task, data / "class_names" / TINY_TASK)
    (t / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    t = _copy_task(task, data / "missing_image" / TINY_TASK)
    _edit_line(t / "test.txt", 3, "images/test/no_such_file.png 2\n")
    t = _copy_task(task, data / "empty_split" / TINY_TASK)
    (t / "test.txt").write_text("")
    for name, image in (("corrupt_image", bad / "truncated.png"), ("non_image", bad / "not_an_image.png")):
        t = _copy_task(task, data / name / TINY_TASK)
        shutil.copyfile(image, t / "images" / "test" / "5.png")  # 5.png is listed in test.txt
        shutil.copyfile(image, t / "images" / "train800" / "7.png")  # ... and 7.png in train800.txt
    folder = data / "image_folder"  # an ImageFolder (train/ and test/) with a text file named .png
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (folder / split / c).mkdir(parents=True)
            for i in range(8):
                shutil.copyfile(task / "images" / "train800" / f"{i}.png", folder / split / c / f"{i}.png")
    shutil.copyfile(bad / "not_an_image.png", folder / "train" / "dog" / "fake.png")
    (bad / "bad.toml").write_text("[defaults\nlr = 0.1\n")
    (bad / "unknown.toml").write_text("[defaults]\nlearning_rate = 0.1\n")
    (bad / "types.toml").write_text("[defaults]\nlr = 'fast'\n")

    # Adapters: truncated, missing config, for another rank, mixed from two runs, a pickle in disguise.
    good = ns["adapter"]
    config = json.loads((good / CONFIG_NAME).read_text())

    def adapter_copy(name: str) -> Path:
        shutil.copytree(good, bad / name)
        return bad / name
    a = adapter_copy("adapter_truncated")
    (a / WEIGHTS_NAME).write_bytes((good / WEIGHTS_NAME).read_bytes()[:1000])
    a = adapter_copy("adapter_no_config")
    (a / CONFIG_NAME).unlink()
    a = adapter_copy("adapter_not_json")
    (a / CONFIG_NAME).write_text("{not json")
    model = create_backbone(BACKBONE, NUM_CLASSES, checkpoint=ws / "pico.safetensors")
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=4))
    arcvit.save_adapter(model, bad / "adapter_rank4")
    a = adapter_copy("adapter_mixed")  # rank-4 weights beside the rank-50 run's config
    shutil.copyfile(bad / "adapter_rank4" / WEIGHTS_NAME, a / WEIGHTS_NAME)
    a = adapter_copy("adapter_other_rank")  # ... with the checksum edited to match: only the shapes differ
    shutil.copyfile(bad / "adapter_rank4" / WEIGHTS_NAME, a / WEIGHTS_NAME)
    (a / CONFIG_NAME).write_text(json.dumps(config | {"weights_sha256": _sha(a / WEIGHTS_NAME)}))
    a = adapter_copy("adapter_pickle")  # a pickle as adapter.safetensors, checksum edited to match
    shutil.copyfile(bad / "evil.pth", a / WEIGHTS_NAME)
    (a / CONFIG_NAME).write_text(json.dumps(config | {"weights_sha256": _sha(a / WEIGHTS_NAME)}))
    shutil.copyfile(ws / "pico.safetensors", bad / "plain_backbone.safetensors")  # not a merged checkpoint
    a = adapter_copy("adapter_short_names")  # 5 class names for 6 classes
    (a / CONFIG_NAME).write_text(json.dumps(config | {"extra": config["extra"] | {
        "class_names": config["extra"]["class_names"][:5]}}))
    a = adapter_copy("adapter_nan")  # a NaN in one adapter tensor, checksum edited to match
    with safe_open(a / WEIGHTS_NAME, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    first = min(k for k in tensors if k.startswith("site."))
    tensors[first][0] = float("nan")
    save_file(tensors, a / WEIGHTS_NAME, metadata=metadata)
    (a / CONFIG_NAME).write_text(json.dumps(config | {"weights_sha256": _sha(a / WEIGHTS_NAME)}))
    flipped = bytearray(ns["merged"].read_bytes())
    flipped[-3] ^= 0xFF  # in the last tensor's bytes: the header still parses
    (bad / "merged_flipped.safetensors").write_bytes(bytes(flipped))
    (bad / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))
    _write_bad_data(task, data)


def _write_bad_data(task: Path, data: Path) -> None:
    """Data sets whose labels or paths are wrong in ways int() or a plain path join would accept."""
    t = _copy_task(task, data / "label_unicode" / TINY_TASK)
    _edit_line(t / "test.txt", 3, "images/test/3.png \u0663\n")  # ARABIC-INDIC DIGIT THREE: int() takes it
    t = _copy_task(task, data / "label_huge" / TINY_TASK)
    _edit_line(t / "train800.txt", 6, "images/train800/6.png 100000000\n")
    t = _copy_task(task, data / "path_absolute" / TINY_TASK)
    _edit_line(t / "test.txt", 3, f"{task / 'images' / 'test' / '3.png'} 2\n")
    t = _copy_task(task, data / "path_escape" / TINY_TASK)
    _edit_line(t / "test.txt", 3, "../" * 40 + str(task.relative_to(task.anchor)) + "/images/test/3.png 2\n")
    t = _copy_task(task, data / "path_symlink" / TINY_TASK)
    (t / "outside").symlink_to(task / "images", target_is_directory=True)
    _edit_line(t / "test.txt", 3, "outside/test/3.png 2\n")
    _copy_task(task, data / "renamed" / "shapes_renamed")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- happy paths


def test_help(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0 and out.startswith("usage: arcvit")
    for command in ("train", "eval", "predict", "merge", "params", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["train", "eval", "predict", "merge", "params", "demo"])
def test_command_help(command, capsys):
    code, out, _ = call([command, "--help"], capsys)
    assert code == 0 and out.startswith("usage: arcvit " + command)


def test_train_writes_a_complete_run(ws):
    results = json.loads((ws["run"] / "results.json").read_text())
    assert json.loads(ws["train_stdout"]) == results
    assert results["task"] == TINY_TASK and results["method"] == "arc" and results["selected_epoch"] == int(EPOCHS)
    assert results["train_images"] == 200 and results["test_images"] == 60
    for name in ("settings.json", "metrics.csv", "adapter/adapter.safetensors", "adapter/adapter_config.json"):
        assert (ws["run"] / name).is_file(), name
    assert len((ws["run"] / "metrics.csv").read_text().splitlines()) == 1 + int(EPOCHS)


def test_eval_adapter_merge_and_merged_agree(ws, capsys):
    """eval --adapter reproduces train's test accuracy; --merge and a merged checkpoint give the same."""
    data = ["--data", ws["data"], "--task", TINY_TASK]
    merged_info = json.loads(ws["merge_stdout"])
    assert merged_info["max_abs_logit_diff"] < 1e-4 and merged_info["num_classes"] == NUM_CLASSES
    tops = {}
    for name, source in (("adapter", [*ws["bb"], "--adapter", ws["adapter"]]),
                         ("adapter --merge", [*ws["bb"], "--adapter", ws["adapter"], "--merge"]),
                         ("merged", ["--merged", ws["merged"]])):
        code, out, err = call(["eval", *source, *data], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["images"] == 60 and result["split"] == "test"
        tops[name] = result["top1"]
    trained = json.loads((ws["run"] / "results.json").read_text())["test_top1"]
    assert tops == {"adapter": trained, "adapter --merge": trained, "merged": trained}


def test_eval_other_split_and_skip_corrupt(ws, capsys):
    code, out, err = call(["eval", *ws["bb"], "--adapter", ws["adapter"], "--data", ws["data"], "--task", TINY_TASK,
                           "--split", "val200"], capsys)
    assert code == 0, err
    assert json.loads(out)["images"] == 40
    bad = ws["root"] / "bad" / "data" / "corrupt_image"
    code, out, err = call(["eval", *ws["bb"], "--adapter", ws["adapter"], "--data", bad, "--task", TINY_TASK,
                           "--skip-corrupt"], capsys)
    assert code == 0, err
    assert json.loads(out)["images"] == 59  # the truncated image is dropped, not fatal
    assert err.startswith("arcvit eval: warning: VTAB-1k shapes_tiny/test") and "skipped 1 unreadable image(s): " \
        f"{bad / TINY_TASK / 'images' / 'test' / '5.png'} (" in err and len(err.splitlines()) == 1, err


def test_adapter_on_another_task_warns_and_outside_root_allowed(ws, capsys):
    data = ws["root"] / "bad" / "data"
    code, out, err = call(["eval", *ws["bb"], "--adapter", ws["adapter"], "--data", data / "renamed",
                           "--task", "shapes_renamed"], capsys)
    assert code == 0 and json.loads(out)["images"] == 60
    assert err == ("arcvit eval: warning: the adapter was trained on task 'shapes_tiny', evaluated here on "
                   "'shapes_renamed'\n")
    code, out, err = call(["eval", *ws["bb"], "--adapter", ws["adapter"], "--data", data / "path_symlink",
                           "--task", TINY_TASK, "--allow-outside-root"], capsys)
    assert code == 0 and json.loads(out)["images"] == 60 and err == "", err


def test_train_warns_about_classes_missing_from_train(ws, capsys, tmp_path):
    task = _copy_task(ws["data"] / TINY_TASK, tmp_path / "data" / TINY_TASK)
    for split in ("train800", "val200", "train800val200"):  # no image of class 5 (six shapes) left to train on
        lines = (task / f"{split}.txt").read_text().splitlines()
        (task / f"{split}.txt").write_text("".join(line.replace(" 5", " 4") + "\n" if line.endswith(" 5")
                                                   else line + "\n" for line in lines))
    code, _, err = call(["train", *ws["bb"], "--data", tmp_path / "data", "--task", TINY_TASK, "--epochs", "1",
                         "--warmup-epochs", "0", "--batch-size", "32", "--accelerator", "cpu", "--quiet",
                         "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "never appear in the training split" in line]
    assert len(warning) == 1 and warning[0].startswith("arcvit train: warning: VTAB-1k shapes_tiny/test")
    assert warning[0].endswith(": 5 (6 shapes)"), warning[0]


def test_outputs_follow_the_umask(ws):
    """Written atomically through a 0600 temporary file, outputs still get the mode the umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (ws["run"] / "results.json", ws["adapter"] / "adapter.safetensors",
                 ws["adapter"] / "adapter_config.json", ws["merged"]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_merge_force_overwrites_and_records_a_checksum(ws, capsys, tmp_path):
    out = tmp_path / "merged.safetensors"
    out.write_text("an old file")
    code, _, err = call(["merge", *ws["bb"], "--adapter", ws["adapter"], "--out", out, "--force"], capsys)
    assert code == 0, err
    with safe_open(out, framework="pt") as new, safe_open(ws["merged"], framework="pt") as first:
        assert len(new.metadata()["tensors_sha256"]) == 64
        assert new.metadata() == first.metadata()  # the same merge (safetensors orders the header at random)


def test_offline_hub_fails_fast_in_one_line(ws, capsys, tmp_path, monkeypatch):
    """Unreachable Hub: huggingface_hub's offline mode for the download (no retries), one line, then restored."""
    from huggingface_hub import constants

    from arcvit.backends.timm import hub
    assert hub.from_hub("vit_base_patch16_224") and not hub.from_hub(BACKBONE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: False)
    code, _, err = call(["eval", "--backbone", "vit_tiny_patch16_224", "--adapter", ws["adapter"], "--data",
                         ws["data"], "--task", TINY_TASK], capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "'vit_tiny_patch16_224': the Hugging Face Hub is unreachable" in err and "--checkpoint" in err
    assert constants.HF_HUB_OFFLINE is False


def test_predict_adapter_and_merged_agree(ws, capsys):
    images = ws["test_images"][:4]
    rows = {}
    for name, source in (("adapter", [*ws["bb"], "--adapter", ws["adapter"]]), ("merged", ["--merged", ws["merged"]])):
        code, out, err = call(["predict", *source, *images], capsys)
        assert code == 0, err
        rows[name] = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows["adapter"]] == [str(p) for p in images]
    classes = (ws["data"] / TINY_TASK / "classes.txt").read_text().split("\n")
    for a, m in zip(rows["adapter"], rows["merged"]):
        assert a["label"] == m["label"] and a["class"] == m["class"] == classes[a["label"]]
        assert abs(a["prob"] - m["prob"]) <= 2e-4


def test_params_vit_base(capsys):
    """ViT-B/16, 100 classes: the paper's 96,432 ARC parameters (r=50), plus the 76,900-parameter head."""
    code, out, err = call(["params", "--backbone", "vit_base_patch16_224", "--num-classes", "100"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["adapter_params"] == 96_432 == 2 * 768 * 50 + 2 * 12 * (50 + 768)
    assert info["head_params"] == 768 * 100 + 100
    assert info["trainable_params"] == 96_432 + 76_900
    assert info["backbone_params"] == 85_875_556
    assert info["total_params"] == info["backbone_params"] + 96_432
    assert info["trainable_percent"] == round(100 * 173_332 / 85_875_556, 4)
    code, out, err = call(["params", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                           "--method", "arc_att"], capsys)
    assert code == 0 and json.loads(out)["adapter_params"] == 48_216


def test_params_lora_counts_its_matrices_and_one_head(capsys):
    """LoRA r=8 on each block's qkv and fc1 (ARC's sites): 12 x 8 x ((768 + 2304) + (768 + 3072)); PEFT's trained
    copy of the head is counted once."""
    code, out, err = call(["params", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                           "--method", "lora"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["adapter_params"] == 12 * 8 * (768 + 2304 + 768 + 3072) == 663_552
    assert info["head_params"] == 76_900
    assert info["trainable_params"] == 663_552 + 76_900


# ----------------------------------------------------------------------------------------------- bad inputs
#
# Each case: (id, argv built from the workspace, exit code, fragments the one-line message must contain).
# Paths are written {root}, {data}, ... and filled in from the workspace. docs/bad-inputs.md lists the same.

T = ["train", "{bb}", "--data", "{data}", "--task", TINY_TASK, "--epochs", "2", "--warmup-epochs", "0",
     "--batch-size", "16", "--accelerator", "cpu", "--quiet", "--out", "{new_run}"]
E = ["eval", "{bb}", "--adapter", "{adapter}", "--task", TINY_TASK]
ED = [*E, "--data", "{data}"]
BAD = "{root}/bad"
BAD_CASES = [
    # wrong paths
    ("data_root_missing", ["train", "{bb}", "--data", "{root}/nowhere", "--task", TINY_TASK, "--out", "{new_run}"],
     1, ["nowhere", "not found"]),
    ("task_missing", ["train", "{bb}", "--data", "{data}", "--task", "no_such_task", "--out", "{new_run}"],
     1, ["no_such_task", "no data for task"]),
    ("split_unknown", [*ED, "--split", "train9"], 1, ["train9", "choose one of"]),
    ("adapter_missing", [*ED[:3], "{root}/no_adapter", *ED[4:]], 1, ["no_adapter", "no such adapter folder"]),
    ("checkpoint_missing", ["eval", "--backbone", BACKBONE, "--checkpoint", "{root}/nope.pth", "--adapter",
                            "{adapter}", "--data", "{data}", "--task", TINY_TASK], 1,
     ["nope.pth", "no such checkpoint file"]),
    ("merged_missing", ["eval", "--merged", "{root}/nope.safetensors", "--data", "{data}", "--task", TINY_TASK], 1,
     ["nope.safetensors", "not a readable safetensors file"]),
    ("config_missing", [*T, "--config", "{root}/nope.toml"], 1, ["nope.toml", "no such config file"]),
    ("predict_image_missing", ["predict", "{bb}", "--adapter", "{adapter}", "{root}/nope.png"], 1,
     ["nope.png", "cannot read image"]),
    ("out_is_a_file", [*T[:-1], "{root}/pico.safetensors"], 1, ["pico.safetensors", "not a folder"]),
    ("merge_out_is_a_folder", ["merge", "{bb}", "--adapter", "{adapter}", "--out", "{run}"], 1,
     ["run", "is a folder"]),
    ("out_finished_run", [*T[:-1], "{run}"], 1, ["run", "finished already"]),
    # non-image files, corrupt images
    ("predict_non_image", ["predict", "{bb}", "--adapter", "{adapter}", BAD + "/notes.txt"], 1,
     ["notes.txt", "cannot read image"]),
    ("predict_corrupt_image", ["predict", "{bb}", "--adapter", "{adapter}", BAD + "/truncated.png"], 1,
     ["truncated.png", "cannot read image"]),
    ("eval_non_image", [*E, "--data", BAD + "/data/non_image"], 1, ["5.png", "cannot read image"]),
    ("eval_corrupt_image", [*E, "--data", BAD + "/data/corrupt_image"], 1, ["5.png", "cannot read image"]),
    ("train_corrupt_image", [*T[:3], BAD + "/data/corrupt_image", *T[4:]], 1, ["7.png", "cannot read image"]),
    ("train_non_image_in_folder", [*T[:3], BAD + "/data/image_folder", "--task", "", *T[6:]], 1,
     ["fake.png", "cannot read image"]),
    ("list_image_missing", [*E, "--data", BAD + "/data/missing_image"], 1,
     ["test.txt:4", "no_such_file.png", "not found"]),
    ("split_empty", [*E, "--data", BAD + "/data/empty_split"], 1, ["test.txt", "no images"]),
    # wrong label ranges, mismatched class counts
    ("label_out_of_range", ["eval", "{bb}", "--adapter", "{adapter}", "--data", BAD + "/data/label_oob",
                            "--task", "svhn"], 1, ["test.txt:4", "label 12 outside 0..9"]),
    ("label_negative", [*E, "--data", BAD + "/data/label_neg"], 1, ["test.txt:4", "label -1 outside 0..5"]),
    ("label_not_integer", [*E, "--data", BAD + "/data/label_text"], 1, ["test.txt:4", "three"]),
    ("label_unicode_digit", [*E, "--data", BAD + "/data/label_unicode"], 1,
     ["test.txt:4", "'\u0663' is not a decimal integer"]),
    ("label_huge_typo", [*E, "--data", BAD + "/data/label_huge"], 1,
     ["label 100000000 on", "train800.txt:7", "is larger than"]),
    ("list_path_absolute", [*E, "--data", BAD + "/data/path_absolute"], 1,
     ["test.txt:4", "absolute path", "--allow-outside-root"]),
    ("list_path_escape", [*E, "--data", BAD + "/data/path_escape"], 1,
     ["test.txt:4", "outside the data root", "--allow-outside-root"]),
    ("list_path_symlink_out", [*E, "--data", BAD + "/data/path_symlink"], 1,
     ["test.txt:4", "outside/test/3.png", "outside the data root"]),
    ("task_outside_root", [*E[:-1], "../" + TINY_TASK, "--data", BAD + "/data/label_neg"], 1,
     ["--task", "outside the data root"]),
    ("class_names_count", [*E, "--data", BAD + "/data/class_names"], 1, ["classes.txt", "5 names for 6 classes"]),
    ("eval_other_task_classes", ["eval", "{bb}", "--adapter", "{adapter}", "--data", "{mini}", "--task", "mnist5k"],
     1, ["mnist5k", "10 classes", "adapter has 6"]),
    ("eval_merged_other_task_classes", ["eval", "--merged", "{merged}", "--data", "{mini}", "--task", "mnist5k"],
     1, ["mnist5k", "10 classes", "merged checkpoint has 6"]),
    # adapter files for another backbone or rank, damaged adapters
    ("adapter_other_backbone", ["eval", "--backbone", "vit_tiny_patch16_224", "--random-init", "--adapter",
                                "{adapter}", "--data", "{data}", "--task", TINY_TASK], 1,
     ["adapter", "trained on vit_pico_patch7_28", "not on vit_tiny_patch16_224"]),
    ("adapter_other_weights", ["eval", "--backbone", BACKBONE, "--random-init", "--adapter", "{adapter}",
                               "--data", "{data}", "--task", TINY_TASK], 1, ["adapter", "backbone weights differ"]),
    ("adapter_other_rank", [*ED[:3], BAD + "/adapter_other_rank", *ED[4:]], 1,
     ["adapter.safetensors", "shape", "another rank"]),
    ("adapter_mixed_files", [*ED[:3], BAD + "/adapter_mixed", *ED[4:]], 1,
     ["adapter.safetensors", "checksum does not match"]),
    ("adapter_truncated", [*ED[:3], BAD + "/adapter_truncated", *ED[4:]], 1,
     ["adapter.safetensors", "checksum does not match"]),
    ("adapter_no_config", [*ED[:3], BAD + "/adapter_no_config", *ED[4:]], 1, ["adapter_config.json", "missing"]),
    ("adapter_config_not_json", [*ED[:3], BAD + "/adapter_not_json", *ED[4:]], 1,
     ["adapter_config.json", "not valid JSON"]),
    ("merge_adapter_other_rank", ["merge", "{bb}", "--adapter", BAD + "/adapter_other_rank", "--out", "{merged}",
                                  "--force"],
     1, ["adapter.safetensors", "another rank"]),
    ("adapter_class_names_short", [*ED[:3], BAD + "/adapter_short_names", *ED[4:]], 1,
     ["adapter_config.json", "5 names for num_classes 6"]),
    ("merged_flipped_byte", ["eval", "--merged", BAD + "/merged_flipped.safetensors", "--data", "{data}",
                             "--task", TINY_TASK], 1, ["merged_flipped.safetensors", "checksum mismatch"]),
    ("merge_nonfinite", ["merge", "{bb}", "--adapter", BAD + "/adapter_nan", "--out", "{new_run}.safetensors"], 1,
     ["not written", "non-finite"]),
    ("predict_nonfinite", ["predict", "{bb}", "--adapter", BAD + "/adapter_nan", "{data}/" + TINY_TASK +
                           "/images/test/0.png"], 1, ["0.png", "not finite"]),
    ("predict_decompression_bomb", ["predict", "{bb}", "--adapter", "{adapter}", BAD + "/bomb.png"], 1,
     ["bomb.png", "refused", "decompression bomb"]),
    ("merge_out_exists", ["merge", "{bb}", "--adapter", "{adapter}", "--out", "{merged}"], 1,
     ["merged.safetensors", "exists", "--force"]),
    ("merge_out_is_its_adapter", ["merge", "{bb}", "--adapter", "{adapter}", "--out",
                                  "{adapter}/adapter.safetensors", "--force"], 1, ["adapter.safetensors", "never"]),
    ("merge_out_is_its_checkpoint", ["merge", "{bb}", "--adapter", "{adapter}", "--out", "{root}/pico.safetensors",
                                     "--force"], 1, ["pico.safetensors", "never"]),
    ("merge_no_adapter", ["merge", "{bb}", "--out", "{new_run}.safetensors"], 2, ["--adapter", "required"]),
    ("out_empty", [*T[:-1], ""], 1, ["--out", "empty"]),
    *([("train_cuda_without_gpu", [*T[:-4], "cuda", *T[-3:]], 1, ["--accelerator cuda", "no CUDA GPU"]),
       ("eval_cuda_without_gpu", [*ED, "--accelerator", "cuda"], 1, ["--accelerator cuda", "no CUDA GPU"]),
       ("predict_cuda_without_gpu", ["predict", "{bb}", "--adapter", "{adapter}", "--accelerator", "cuda",
                                     "{data}/" + TINY_TASK + "/images/test/0.png"], 1,
        ["--accelerator cuda", "no CUDA GPU"])] if not torch.cuda.is_available() else []),
    ("merged_not_merged", ["eval", "--merged", BAD + "/plain_backbone.safetensors", "--data", "{data}",
                           "--task", TINY_TASK], 1, ["plain_backbone.safetensors", "not a merged arcvit checkpoint"]),
    # pickles disguised as checkpoints: refused, never unpickled (the marker file is checked after each case)
    *[(f"pickle_as{suffix.replace('.', '_')}", ["eval", "--backbone", BACKBONE, "--checkpoint", BAD + f"/evil{suffix}",
                                                "--adapter", "{adapter}", "--data", "{data}", "--task", TINY_TASK],
       1, [f"evil{suffix}", why]) for suffix, why in ((".pth", "refused"), (".bin", "refused"), (".ckpt", "refused"),
                                                      (".safetensors", "not a readable safetensors file"),
                                                      (".npz", "cannot load this .npz"))],
    ("pickle_plain_as_pth", ["eval", "--backbone", BACKBONE, "--checkpoint", BAD + "/evil_plain_pickle.pth",
                             "--adapter", "{adapter}", "--data", "{data}", "--task", TINY_TASK], 1,
     ["evil_plain_pickle.pth", "refused", "Unsupported operand"]),
    ("pickle_train_checkpoint", ["train", "--backbone", BACKBONE, "--checkpoint", BAD + "/evil.pth",
                                 *T[2:]], 1, ["evil.pth", "refused", "Unsupported global"]),
    ("pickle_as_merged", ["eval", "--merged", BAD + "/evil.pth", "--data", "{data}", "--task", TINY_TASK], 1,
     ["evil.pth", "not a readable safetensors file"]),
    ("pickle_as_adapter", [*ED[:3], BAD + "/adapter_pickle", *ED[4:]], 1,
     ["adapter.safetensors", "not a readable safetensors file"]),
    # absurd flag values
    ("rank_zero", [*T, "--rank", "0"], 2, ["--rank", "from 1 to 65536", "'0'"]),
    ("lr_negative", [*T, "--lr", "-0.1"], 2, ["--lr", "0 < x <= 1000000", "'-0.1'"]),
    ("lr_infinite", [*T, "--lr", "inf"], 2, ["--lr", "0 < x <= 1000000", "'inf'"]),
    ("lr_nan", [*T, "--lr", "nan"], 2, ["--lr", "'nan'"]),
    ("batch_larger_than_data", [*T, "--batch-size", "5000"], 1, ["batch_size 5000", "200 images"]),
    ("batch_zero", [*T, "--batch-size", "0"], 2, ["--batch-size", "from 1 to 65536", "'0'"]),
    ("epochs_zero", [*T, "--epochs", "0"], 2, ["--epochs", "from 1 to 100000", "'0'"]),
    ("warmup_too_long", [*T, "--warmup-epochs", "5"], 1, ["warmup_epochs", "5"]),
    ("dropout_one", [*T, "--adapter-dropout", "1.0"], 2, ["--adapter-dropout", "0 <= x < 1", "'1.0'"]),
    ("label_smoothing_two", [*T, "--label-smoothing", "2"], 2, ["--label-smoothing", "0 <= x < 1", "'2'"]),
    ("weight_decay_infinite", [*T, "--weight-decay", "inf"], 2, ["--weight-decay", "'inf'"]),
    ("seed_negative", [*T, "--seed", "-1"], 2, ["--seed", "from 0 to 4294967295", "'-1'"]),
    ("devices_zero", [*T, "--devices", "0"], 2, ["--devices", "from 1 to 1024", "'0'"]),
    ("workers_negative", [*T, "--num-workers", "-2"], 2, ["--num-workers", "'-2'"]),
    ("precision_unknown", [*T, "--precision", "fp7"], 2, ["--precision", "fp7"]),
    ("accelerator_unknown", [*T, "--accelerator", "abacus"], 2, ["--accelerator", "abacus"]),
    ("strategy_unknown", [*T, "--strategy", "telepathy"], 2, ["--strategy", "telepathy"]),
    ("eval_batch_zero", [*ED, "--batch-size", "0"], 2, ["--batch-size", "from 1 to 65536", "'0'"]),
    ("params_rank_zero", ["params", "--backbone", "vit_base_patch16_224", "--rank", "0"], 2, ["--rank", "'0'"]),
    ("params_no_classes", ["params", "--backbone", "vit_base_patch16_224", "--num-classes", "0"], 2,
     ["--num-classes", "from 1 to 100000", "'0'"]),
    ("params_batch_zero", ["params", "--backbone", "vit_base_patch16_224", "--batch-size", "0"], 2,
     ["--batch-size", "'0'"]),
    ("backbone_unknown", ["params", "--backbone", "vit_bsae_patch16_224"], 1,
     ["vit_bsae_patch16_224", "did you mean", "vit_base_patch16_224"]),
    ("config_unparsable", [*T, "--config", BAD + "/bad.toml"], 1, ["bad.toml", "cannot parse"]),
    ("config_unknown_setting", [*T, "--config", BAD + "/unknown.toml"], 1, ["unknown.toml", "learning_rate"]),
    ("config_wrong_type", [*T, "--config", BAD + "/types.toml"], 1, ["types.toml", "fast"]),
    ("flag_not_a_number", [*T, "--batch-size", "lots"], 2, ["--batch-size", "lots"]),
    ("method_unknown", [*T, "--method", "magic"], 2, ["--method", "magic"]),
    ("flag_unknown", [*T, "--learning-rate", "0.1"], 2, ["--learning-rate"]),
    ("data_flag_missing", ["eval", "{bb}", "--adapter", "{adapter}"], 2, ["--data"]),
]


def _fill(argv: list[str], ws: dict, new_run: Path) -> list[str]:
    values = {"root": ws["root"], "data": ws["data"], "mini": ws["mini"], "run": ws["run"],
              "adapter": ws["adapter"], "merged": ws["merged"], "new_run": new_run}
    filled = []
    for a in argv:
        if a == "{bb}":
            filled += [str(x) for x in ws["bb"]]
        else:
            filled.append(a.format(**values))
    return filled


@pytest.mark.parametrize("case, argv, code, fragments", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(case, argv, code, fragments, ws, capsys, tmp_path):
    new_run = tmp_path / "run"
    watched = (ws["root"], ws["data"])
    before = snapshot(*watched)
    got, out, err = call(_fill(argv, ws, new_run), capsys)
    lines = err.strip().splitlines()
    assert got == code, f"exit code {got}, stderr: {err}"
    assert "Traceback" not in err + out
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    command = argv[0]
    assert lines[0].startswith(f"arcvit {command}: error: ") or (code == 2 and lines[0].startswith("arcvit"))
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert snapshot(*watched) == before, "a file that existed before was changed or removed"
    assert not (ws["root"] / "PWNED").exists(), "a pickle was unpickled"
    assert not (new_run / "results.json").exists() and not (new_run / "checkpoints").exists()
    assert not (new_run / "adapter").exists()
    if os.environ.get("ARCVIT_BAD_INPUTS_LOG"):  # the observations docs/bad-inputs.md is written from
        message = lines[0]
        for key in ("new_run", "run", "merged", "mini", "data", "root"):
            value = str({"new_run": new_run, **ws}[key])
            message = message.replace(value, f"<{key}>")
        with open(os.environ["ARCVIT_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"case": case, "argv": argv, "code": got, "message": message}) + "\n")


def test_bad_inputs_table_is_documented():
    """docs/bad-inputs.md lists every case this file tries."""
    doc = (Path(__file__).parents[1] / "docs" / "bad-inputs.md").read_text()
    missing = [case for case, *_ in BAD_CASES if f"`{case}`" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks {missing}"


def test_malicious_pickle_refused_by_the_real_command(ws, arcvit_cli, tmp_path):
    """End to end through the installed executable: exit code 1, one line, no traceback, nothing executed."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": Evil(marker)}, evil)
    out = tmp_path / "run"
    done = arcvit_cli("train", "--backbone", BACKBONE, "--checkpoint", evil, "--data", ws["data"], "--task", TINY_TASK,
                      "--epochs", "2", "--warmup-epochs", "0", "--accelerator", "cpu", "--quiet", "--out", out,
                      timeout=180)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"arcvit train: error: {evil}: refused: the file holds pickled objects other than "
                               "tensors, and arcvit only loads weights safely (Unsupported global: GLOBAL exec was "
                               "not an allowed global by default.)"), lines[0]
    assert not marker.exists()
    assert not (out / "results.json").exists()
    # the same file really does run code when unpickled unsafely: the test's pickle is a real attack
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_hub_probe_goes_through_the_configured_proxy(monkeypatch):
    """Behind a proxy the Hub's own host may be unreachable directly: the probe asks the proxy instead."""
    import socket

    from huggingface_hub import constants

    from arcvit.backends.timm.hub import hub_reachable
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # a name that never resolves
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "")
    assert not hub_reachable(timeout=1)
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub_reachable(timeout=1)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable(timeout=1)
