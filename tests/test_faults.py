"""Faults, driven for real: ``arcvit train`` processes killed with SIGKILL, checkpoint files truncated,
corrupted or swapped for a pickle. A resumed run must end exactly where an uninterrupted one does, a damaged
checkpoint must be reported and the previous good one used, and nothing a user has must be deleted.

The uninterrupted baseline is the session's ``reference_run`` (conftest): CPU, seed 0, one thread, 3 epochs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import arcvit_command, subprocess_env

from arcvit.training.checkpoint import load_latest_checkpoint

torch.set_num_threads(1)

TOLERANCE = 1e-6


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outcome(resumed, reference) -> float:
    """Same results (timing aside), same metrics rows, same adapter tensors (within TOLERANCE)."""
    assert resumed.results == reference.results
    assert resumed.metrics == reference.metrics
    diff = resumed.max_adapter_diff(reference)
    assert diff <= TOLERANCE, f"adapter tensors differ by {diff}"
    return diff


def kill_when(command: list[str], trigger: Path, timeout: float = 240) -> tuple[int, float]:
    """Start ``command``; SIGKILL it as soon as ``trigger`` exists. Returns (exit status, seconds to the kill)."""
    started = time.monotonic()
    with subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        while not trigger.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (status {proc.returncode}) before {trigger.name} appeared:\n"
                                     f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() - started > timeout:
                proc.kill()
                raise AssertionError(f"{trigger} did not appear within {timeout} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return proc.returncode, time.monotonic() - started


def assert_files_whole(out: Path) -> None:
    """What a killed run left is whole: every JSON parses, metrics.csv has complete rows, and every checkpoint
    that has a checksum file matches it (files are written to a temporary name and renamed into place)."""
    for path in out.rglob("*.json"):
        if not path.name.startswith("."):
            json.loads(path.read_text())
    metrics = out / "metrics.csv"
    if metrics.exists():
        rows = metrics.read_text().splitlines()
        assert all(len(row.split(",")) == len(rows[0].split(",")) for row in rows)
    for sidecar in (out / "checkpoints").glob("epoch-*.json"):
        weights = sidecar.with_suffix(".safetensors")
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == json.loads(sidecar.read_text())["sha256"]


KILL_POINTS = [  # the kill lands a few milliseconds after the file appears
    pytest.param("settings.json", id="during_epoch_1", marks=pytest.mark.slow),  # before any checkpoint
    pytest.param("checkpoints/epoch-0001.safetensors", id="while_saving_checkpoint_1", marks=pytest.mark.slow),
    pytest.param("checkpoints/epoch-0001.json", id="during_epoch_2"),
    pytest.param("checkpoints/epoch-0003.json", id="during_final_test", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("trigger", KILL_POINTS)
def test_sigkill_then_resume_matches_uninterrupted(trigger, reference_run, read_run, train_argv, arcvit_cli,
                                                   tmp_path):
    out = tmp_path / "run"
    status, seconds = kill_when([*arcvit_command(), *train_argv(out)], out / trigger)
    if status == 0:
        pytest.skip(f"the run finished before the kill landed ({seconds:.1f} s)")
    assert status == -signal.SIGKILL
    assert not (out / "results.json").exists()
    assert_files_whole(out)
    left = sorted(p.name for p in (out / "checkpoints").glob("epoch-*")) if (out / "checkpoints").exists() else []

    done = arcvit_cli(*train_argv(out, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["test_top1"] == reference_run.results["test_top1"]
    good = [n for n in left if n.endswith(".json")]
    if good:  # resumed from the newest checkpoint that has its checksum file
        assert f"at epoch {int(good[-1][6:10])}" in done.stderr, done.stderr
    diff = assert_same_outcome(read_run(out), reference_run)
    notes = [line for line in done.stderr.splitlines() if line.startswith(("warning", "resumed"))]
    temporary = sorted(p.name for p in out.rglob(".*.tmp"))
    print(f"\nkilled after {seconds:.1f} s ({trigger}); left {left}, temporary files {temporary}; "
          f"resume said {notes}; max adapter diff {diff:g}")


def _interrupted_copy(reference, dest: Path) -> Path:
    """The reference run as it stood after its last checkpoint: settings, metrics, checkpoints (epochs 2, 3)."""
    dest.mkdir()
    for name in ("settings.json", "metrics.csv"):
        shutil.copyfile(reference.folder / name, dest / name)
    shutil.copytree(reference.folder / "checkpoints", dest / "checkpoints")
    assert sorted(p.name for p in (dest / "checkpoints").glob("epoch-*.safetensors")) == [
        "epoch-0002.safetensors", "epoch-0003.safetensors"]
    return dest


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(reference_run, read_run, train_argv,
                                                                    arcvit_cli, tmp_path):
    out = _interrupted_copy(reference_run, tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0003.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    done = arcvit_cli(*train_argv(out, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("warning: skipped checkpoint epoch-0003.safetensors: checksum mismatch (truncated or corrupt)"
            in done.stderr), done.stderr
    assert "at epoch 2" in done.stderr, done.stderr
    diff = assert_same_outcome(read_run(out), reference_run)  # epoch 3 was trained again, to the same weights
    notes = [line for line in done.stderr.splitlines() if line.startswith(("warning", "resumed"))]
    print(f"\ntruncated epoch 3: resume said {notes}; max adapter diff {diff:g}")


# -------------------------------------------------- checkpoint files damaged on disk (no training run needed)


@pytest.fixture
def checkpoints(reference_run, tmp_path) -> Path:
    return _interrupted_copy(reference_run, tmp_path / "run") / "checkpoints"


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "checksum mismatch (truncated or corrupt)"),
    ("flip_byte", "checksum mismatch (truncated or corrupt)"),  # same size, one bit pattern changed
    ("empty", "checksum mismatch (truncated or corrupt)"),
    ("no_checksum_file", "no valid checksum file (interrupted while saving)"),  # killed between the two writes
    ("garbled_checksum_file", "no valid checksum file (interrupted while saving)"),
])
def test_damaged_newest_checkpoint_falls_back(damage, reason, checkpoints):
    newest = checkpoints / "epoch-0003.safetensors"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:-100])
    elif damage == "flip_byte":
        _flip_byte(newest, newest.stat().st_size // 2)
    elif damage == "empty":
        newest.write_bytes(b"")
    elif damage == "no_checksum_file":
        newest.with_suffix(".json").unlink()
    else:
        newest.with_suffix(".json").write_text('{"epoch": 3, "sha2')
    ckpt = load_latest_checkpoint(checkpoints)
    assert ckpt.epoch == 2 and ckpt.state["epoch"] == 2 and ckpt.tensors
    assert ckpt.skipped == [f"epoch-0003.safetensors: {reason}"]


def test_every_checkpoint_damaged_means_start_over(checkpoints):
    for weights in checkpoints.glob("epoch-*.safetensors"):
        _flip_byte(weights, 10)
    ckpt = load_latest_checkpoint(checkpoints)
    assert ckpt.epoch == 0 and not ckpt.tensors  # train() starts from scratch, after printing the two warnings
    assert len(ckpt.skipped) == 2
    assert load_latest_checkpoint(checkpoints.parent / "nothing_here") is None


def test_pickle_disguised_as_checkpoint_is_refused_unexecuted(checkpoints, tmp_path):
    """A pickle in place of the newest checkpoint, even with a checksum file that matches it, is never unpickled."""
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)
    newest = checkpoints / "epoch-0003.safetensors"
    torch.save({"param/x": Evil()}, newest)
    sidecar = newest.with_suffix(".json")
    sidecar.write_text(json.dumps({"epoch": 3, "file": newest.name,
                                   "sha256": hashlib.sha256(newest.read_bytes()).hexdigest()}))
    ckpt = load_latest_checkpoint(checkpoints)
    assert ckpt.epoch == 2
    assert len(ckpt.skipped) == 1 and ckpt.skipped[0].startswith("epoch-0003.safetensors: unreadable")
    assert not marker.exists()


# ---------------------------------------------------------------- refusing to touch existing run folders


def _call(argv, capsys):
    from arcvit.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_existing_checkpoints_without_resume_is_an_error_and_deletes_nothing(reference_run, train_argv,
                                                                             capsys, tmp_path):
    out = _interrupted_copy(reference_run, tmp_path / "run")
    before = snapshot(out)
    code, stdout, err = _call(train_argv(out), capsys)
    assert code == 1 and stdout == ""
    assert err.strip().splitlines() == [f"arcvit train: error: {out}: holds checkpoints of an earlier run; "
                                        "pass --resume to continue it, or choose another --out"]
    assert snapshot(out) == before


def test_finished_run_is_never_overwritten(reference_run, train_argv, capsys, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run.folder, out)
    before = snapshot(out)
    code, _, err = _call(train_argv(out), capsys)
    assert code == 1 and "finished already" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = _call(train_argv(out, "--resume"), capsys)  # --resume on a finished run: its results
    assert code == 0 and json.loads(stdout) == json.loads((out / "results.json").read_text())
    assert snapshot(out) == before
