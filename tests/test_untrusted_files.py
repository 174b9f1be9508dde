"""Every file arcvit reads back is untrusted (issue 28): archives and folders given to `arcvit data prepare`, a
hand-edited MANIFEST.json, run folders given to `arcvit report`. Each hostile file goes through the real
command (arcvit's ``main``) and must end in one line on stderr naming the member, file or field, exit 1, no
traceback, and nothing of what was there before changed. ``ARCVIT_BAD_INPUTS_LOG=log.jsonl`` appends what each
case printed (docs/bad-inputs.md's rows are written from it)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_data_prepare import TASKS, build_tasks, prepare_argv, verify_argv, zip_folder

from arcvit.cli import main
from arcvit.data.manifest import MANIFEST

pytestmark = pytest.mark.usefixtures("one_thread")


def call(argv: list, capsys) -> tuple[int, str, list[str]]:
    """``arcvit ARGV`` in this process: exit code, stdout, stderr lines (logged when $ARCVIT_BAD_INPUTS_LOG)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    if os.environ.get("ARCVIT_BAD_INPUTS_LOG"):
        with open(os.environ["ARCVIT_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"argv": [str(a) for a in argv], "code": code, "stderr": err}) + "\n")
    return code, out, err.strip().splitlines()


def one_line(code: int, err: list[str], command: str, *words: str) -> None:
    """Exit 1 and exactly one error line (beside any warnings about the tiny data), from ``command``, holding
    every one of ``words``."""
    err = [line for line in err if not line.startswith(f"arcvit {command}: warning: ")]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"arcvit {command}: error: ") and "Traceback" not in err[0], err[0]
    for word in words:
        assert word in err[0], (word, err[0])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- data prepare: members that cannot be read

def _patch_member(archive: Path, name: str, *, flags: int | None = None, method: int | None = None) -> Path:
    """Rewrite ``name``'s general-purpose flags or compression method in both its local and central headers
    (zipfile writes neither an encrypted member nor an unknown method itself)."""
    data, encoded = bytearray(archive.read_bytes()), name.encode()
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = data.find(signature)
        while at >= 0:
            if data[at + name_at: at + name_at + len(encoded)] == encoded:
                if flags is not None:
                    data[at + flag_at: at + flag_at + 2] = flags.to_bytes(2, "little")
                if method is not None:
                    data[at + flag_at + 2: at + flag_at + 4] = method.to_bytes(2, "little")
            at = data.find(signature, at + 1)
    archive.write_bytes(bytes(data))
    return archive


def _zip_plus(tmp_path: Path, source: Path, name: str, data: bytes = b"x" * 100) -> Path:
    archive = zip_folder(source, tmp_path / "bad.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return archive


LONG = "vtab-1k/cifar/images/" + "n" * 300 + ".png"
UNREADABLE = {  # id: (make the source, words of the one line)
    "encrypted_member": (lambda t, s: _patch_member(_zip_plus(t, s, "vtab-1k/cifar/secret.png"),
                                                    "vtab-1k/cifar/secret.png", flags=1),
                         ["member 'vtab-1k/cifar/secret.png' is encrypted"]),
    "unknown_compression": (lambda t, s: _patch_member(_zip_plus(t, s, "vtab-1k/cifar/ppmd.png"),
                                                       "vtab-1k/cifar/ppmd.png", method=98),
                            ["member 'vtab-1k/cifar/ppmd.png' cannot be read: compression method 98"]),
    "name_too_long": (lambda t, s: _zip_plus(t, s, LONG), [f"member {LONG!r} cannot be written", "too long"]),
    "fifo_in_folder": (lambda t, s: (os.mkfifo(s / "dtd/images/pipe.png"), s)[1],
                       ["dtd/images/pipe.png: is a FIFO, not a regular file"]),
    "path_too_long_in_folder": (lambda t, s: _deep_file(s / "dtd"), ["cannot be written", "too long"]),
}


def _deep_file(task: Path) -> Path:
    """A file whose path is just under PATH_MAX in the source: its copy in the staging folder is longer."""
    folder = task
    while len(str(folder)) < 3800:
        folder /= "d" * 200
    folder.mkdir(parents=True)
    (folder / ("f" * (4090 - len(str(folder))))).write_bytes(b"x")
    return task.parent


@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_member_ends_prepare_in_one_line_and_placed_tasks_stay(case, tmp_path, capsys):
    """The root holds a verified copy first; a --force prepare from the hostile source leaves it byte-identical."""
    good = build_tasks(tmp_path / "good")
    root = tmp_path / "root"
    assert call(prepare_argv(root, good), capsys)[0] == 0
    before = digests(root)
    make, words = UNREADABLE[case]
    bad = make(tmp_path, build_tasks(tmp_path / "src"))
    code, _, err = call(prepare_argv(root, bad, "--force"), capsys)
    one_line(code, err, "data", *words)
    assert digests(root) == before and not list(root.glob(".arcvit-prepare-*"))


# ---------------------------------------------------------------- data prepare: the total write budget

def _zip_of_zips(tmp_path: Path, source: Path, copies: int = 8, zeros: int = 4 << 20) -> Path:
    """A small zip holding the tasks and ``copies`` inner zips of ``zeros`` zero bytes each (a few KB each)."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(zeros))
    archive = zip_folder(source, tmp_path / "bomb.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        for n in range(copies):
            zf.writestr(f"vtab-1k/extra/part{n}.zip", inner.getvalue())
    return archive


def _tar_gz_stream(tmp_path: Path, source: Path, zeros: int = 24 << 20) -> Path:
    """A .tar.gz whose one large member is only found while streaming (tar declares no total up front)."""
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname="vtab")
        info = tarfile.TarInfo("vtab/extra/zeros.bin")
        info.size = zeros
        tf.addfile(info, io.BytesIO(bytes(zeros)))
    return archive


@pytest.mark.parametrize("make", [_zip_of_zips, _tar_gz_stream], ids=["zip_of_zips", "tar_gz_member"])
def test_a_prepare_stops_at_its_total_budget(make, tmp_path, capsys):
    bomb = make(tmp_path, build_tasks(tmp_path / "src"))
    assert bomb.stat().st_size < 200_000
    root = tmp_path / "root"
    budget = 16 << 20
    code, _, err = call(prepare_argv(root, bomb, "--max-total-gb", f"{budget / 2**30}"), capsys)
    one_line(code, err, "data", f"past {budget:,} bytes written in all", "--max-total-gb raises the limit")
    written = int(err[0].split("(")[-1].split(" written so far")[0].replace(",", ""))
    assert written <= budget
    assert not list(root.glob(".arcvit-prepare-*")) and not any((root / t).exists() for t in TASKS)
    assert call(prepare_argv(root, bomb), capsys)[0] == 0  # the default budget takes it


# ---------------------------------------------------------------- a hand-edited MANIFEST.json

def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def _folder_instead(root: Path) -> None:
    (root / MANIFEST).unlink()
    (root / MANIFEST).mkdir()


MANIFESTS = {  # id: (damage the manifest of a verified root, words of the one line)
    "digest_not_hex": (lambda r: _edit_manifest(r, lambda m: m["tasks"]["kitti"].update(digest="z" * 64)),
                       "field tasks.kitti.digest: expected 64 hex digits, got 'zzzz"),
    "digest_a_number": (lambda r: _edit_manifest(r, lambda m: m["tasks"]["kitti"].update(digest=12)),
                        "field tasks.kitti.digest: expected 64 hex digits, got '12'"),
    "entry_a_list": (lambda r: _edit_manifest(r, lambda m: m["tasks"].update(kitti=[1, 2])),
                     "field tasks.kitti: expected an object, got list"),
    "splits_a_string": (lambda r: _edit_manifest(r, lambda m: m["tasks"]["cifar"].update(splits="all")),
                        "field tasks.cifar.splits: expected an object"),
    "source_a_number": (lambda r: _edit_manifest(r, lambda m: m["tasks"]["cifar"].update(source=7)),
                        "field tasks.cifar.source: expected a string, got int"),
    "tasks_a_list": (lambda r: _edit_manifest(r, lambda m: m.update(tasks=[])), "no 'tasks' object"),
    "nested_deeply": (lambda r: (r / MANIFEST).write_text("[" * 100_000 + "]" * 100_000),
                      "unreadable manifest (nested too deeply)"),
    "a_folder": (_folder_instead, "unreadable manifest (Is a directory)"),
}


@pytest.fixture(scope="module")
def verified_root(tmp_path_factory) -> Path:
    top = tmp_path_factory.mktemp("verified")
    root = top / "root"
    assert main(prepare_argv(root, build_tasks(top / "src"))) == 0
    return root


@pytest.mark.parametrize("case", MANIFESTS)
def test_a_hand_edited_manifest_is_one_line_for_verify_prepare_and_train(case, tmp_path, verified_root, capsys):
    root = tmp_path / "root"
    shutil.copytree(verified_root, root)
    damage, words = MANIFESTS[case]
    damage(root)
    before = digests(root)
    one_line(*call(verify_argv(root), capsys)[::2], "data", str(root / MANIFEST), words)
    code, _, err = call(prepare_argv(root, zip_folder(build_tasks(tmp_path / "src"), tmp_path / "a.zip"),
                                     "--force"), capsys)
    one_line(code, err, "data", str(root / MANIFEST), words)
    code, _, err = call(["train", "--data", root, "--task", "kitti", "--backbone", "vit_pico_patch7_28",
                         "--random-init", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "2", "--accelerator", "cpu",
                         "--quiet",
                         "--out", tmp_path / "run"], capsys)
    one_line(code, err, "train", str(root / MANIFEST), words)
    assert digests(root) == before and not (tmp_path / "run" / "results.json").exists()


# ---------------------------------------------------------------- arcvit report: run folders

def _write_run(out: Path, seed: str = "0", results: dict | None = None, settings: dict | None = None) -> Path:
    """A finished kitti/linear run folder named ``seed<seed>``, as the training loop writes it (trimmed)."""
    folder = out / "runs" / "kitti" / "linear" / f"seed{seed}"
    folder.mkdir(parents=True)
    base_settings = {"backbone": "vit_pico_patch7_28", "checkpoint": None, "pretrained": False,
                     "data": {"splits": {"train": "train800val200", "test": "test"}},
                     "train": {"method": "linear", "seed": 0, "protocol": "final", "lr": 0.01},
                     "data_manifest": {"digest": "a" * 64, "source": "archive vtab-1k.zip"}}
    base_results = {"task": "kitti", "method": "linear", "seed": 0, "test_top1": 0.375, "trainable_params": 10,
                    "protocol": "final", "wall_time_s": 1.5}
    for name, content, base in (("settings.json", settings, base_settings), ("results.json", results, base_results)):
        (folder / name).write_text(json.dumps(base | content if isinstance(content, dict) else
                                              base if content is None else content))
    return folder


def _plan(out: Path, plan) -> None:
    (out / "bench.json").write_text(json.dumps(plan))


REPORTS = {  # id: (make the bench folder, the file named, words of the one line)
    "top1_in_percent": (lambda o: _write_run(o, results={"test_top1": 37.5}), "seed0/results.json",
                        "field test_top1: expected a fraction in [0, 1] (a top-1 accuracy, not in %), got float 37.5"),
    "top1_nan": (lambda o: _write_run(o, results={"test_top1": float("nan")}), "seed0/results.json",
                 "field test_top1: expected a fraction in [0, 1]"),
    "top1_string": (lambda o: _write_run(o, results={"test_top1": "0.9"}), "seed0/results.json",
                    "field test_top1: expected a fraction in [0, 1] (a top-1 accuracy, not in %), got str '0.9'"),
    "top1_missing": (lambda o: _write_run(o, results=["test_top1"]), "seed0/results.json",
                     "field (the file): expected an object, got list"),
    "params_negative": (lambda o: _write_run(o, results={"trainable_params": -3}), "seed0/results.json",
                        "field trainable_params: expected a whole number >= 0, got int -3"),
    "wall_time_inf": (lambda o: _write_run(o, results={"wall_time_s": float("inf")}), "seed0/results.json",
                      "field wall_time_s: expected a finite number or null"),
    "settings_train_a_list": (lambda o: _write_run(o, settings={"train": ["linear"]}), "seed0/settings.json",
                              "field train: expected an object, got list"),
    "settings_splits_missing": (lambda o: _write_run(o, settings={"data": {}}), "seed0/settings.json",
                                "field data.splits: expected an object, got NoneType None"),
    "settings_digest_not_hex": (lambda o: _write_run(o, settings={"data_manifest": {"digest": "zz", "source": None}}),
                                "seed0/settings.json", "field data_manifest.digest: expected 64 hex digits"),
    "plan_seeds_text": (lambda o: (_write_run(o), _plan(o, {"suite": "vtab1k", "seeds": ["0"]})), "bench.json",
                        "field seeds: expected a list of int, got list ['0']"),
    "plan_a_list": (lambda o: (_write_run(o), _plan(o, [1, 2])), "bench.json",
                    "field (the file): expected an object, got list"),
    "seed00_beside_seed0": (lambda o: (_write_run(o), _write_run(o, "00")), "seed00",
                            "the same run as", "(task kitti, method linear, seed 0); keep one of the two folders"),
    "seed_arabic_digit": (lambda o: (_write_run(o, "1"), _write_run(o, "\u0661")), "seed1",
                          "(task kitti, method linear, seed 1)"),
}


@pytest.mark.parametrize("case", REPORTS)
def test_report_refuses_a_hostile_run_folder_in_one_line(case, tmp_path, capsys):
    make, named, *words = REPORTS[case]
    make(tmp_path)
    before = digests(tmp_path)
    code, _, err = call(["report", tmp_path, "--suite", "vtab1k"], capsys)
    one_line(code, err, "report", named, *words)
    assert digests(tmp_path) == before  # no report written


def test_a_healthy_run_folder_still_reports(tmp_path, capsys):
    _write_run(tmp_path)
    _write_run(tmp_path, "1", results={"test_top1": 0.5, "val_top1": None})
    assert call(["report", tmp_path, "--suite", "vtab1k"], capsys)[0] == 0
    assert "| linear |" in (tmp_path / "report.md").read_text() and "43.8 ± 8.8" in (tmp_path / "report.md").read_text()
