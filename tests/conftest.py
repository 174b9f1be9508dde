"""Shared fixtures: real data folders on disk, the `arcvit` command, and one reference training run.

- ``mini_data``: the offline mini-VTAB suite (tasks "shapes_count" and "mnist5k", test_size 100) built once per
  session with `build_mini_suite` into a temporary folder: real NOAH-layout PNG folders.
- ``tiny_data``: a smaller VTAB-1k-layout task, "shapes_tiny" (160 train800 / 40 val200 / 60 test PNGs copied
  from shapes_count), for end-to-end training runs that must take seconds, not minutes.
- ``arcvit_cli``: run the installed ``arcvit`` command in a subprocess (one thread per process, no progress bars).
- ``reference_run``: one uninterrupted single-process ``arcvit train`` run with ``TRAIN_FLAGS``, the baseline
  that the fault tests (kill / truncate, then resume) and the DDP test compare against. When a selected test
  uses it, it starts in the background at the start of the session.

Every subprocess gets ``OMP_NUM_THREADS=1``: the test machines have two cores, and torch with more threads
than cores is many times slower. The fault and DDP tests need bitwise-reproducible runs, so every run that is
compared with another is started the same way.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

MINI_TASKS = ("shapes_count", "mnist5k")
MINI_TEST_SIZE = 100
TINY_TASK = "shapes_tiny"
TINY_SIZES = {"train800": 160, "val200": 40, "test": 60}

BACKBONE = "vit_pico_patch7_28"  # the shipped tag has no weights file yet: random init, seeded by the run
# A run of ~20 s on two busy cores: 3 epochs of 10 steps (160 images, global batch 16), `select` protocol so that
# the checkpoints also carry the best epoch's weights, dropout 0 so that no random number depends on the process
# count. 160 divides by 16 and by 2 x 8, so one process and two see exactly the same batches.
TRAIN_FLAGS = ("--backbone", BACKBONE, "--random-init", "--task", TINY_TASK, "--epochs", "3", "--warmup-epochs", "1",
               "--batch-size", "16", "--adapter-dropout", "0", "--protocol", "select", "--seed", "0",
               "--accelerator", "cpu", "--quiet")
TIMING_KEYS = {"images_per_s", "wall_time_s"}  # the only outputs that may differ between equivalent runs


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launch
        env.pop(var, None)
    return env


def arcvit_command() -> list[str]:
    """The installed console script beside this Python, else ``python -m arcvit.cli``."""
    script = Path(sys.executable).with_name("arcvit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "arcvit.cli"]


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """Root folder of the mini-VTAB tasks ``MINI_TASKS`` (NOAH layout, real PNGs), test split of 100."""
    from arcvit.data.mini import build_mini_suite
    root = tmp_path_factory.mktemp("mini_vtab")
    build_mini_suite(root, MINI_TASKS, test_size=MINI_TEST_SIZE)
    return root


@pytest.fixture(scope="session")
def tiny_data(mini_data, tmp_path_factory) -> Path:
    """Root folder holding ``TINY_TASK``: the first lines of shapes_count's list files, images copied."""
    source = mini_data / "shapes_count"
    root = tmp_path_factory.mktemp("tiny_vtab")
    task = root / TINY_TASK
    lines = {}
    for split, size in TINY_SIZES.items():
        lines[split] = (source / f"{split}.txt").read_text().splitlines(keepends=True)[:size]
        for line in lines[split]:
            rel = line.rsplit(maxsplit=1)[0]
            (task / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, task / rel)
        (task / f"{split}.txt").write_text("".join(lines[split]))
    (task / "train800val200.txt").write_text("".join(lines["train800"] + lines["val200"]))
    shutil.copyfile(source / "classes.txt", task / "classes.txt")
    return root


@pytest.fixture(scope="session")
def arcvit_cli():
    """``arcvit_cli(*args, timeout=...)`` runs the ``arcvit`` command and returns the CompletedProcess.

    The command runs in its own process group, so that a timeout also ends the processes it started (the
    second DDP process that Fabric launches), not only the first.
    """
    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [*arcvit_command(), *map(str, args)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(), start_new_session=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                raise AssertionError(f"arcvit {' '.join(map(str, args))} ran over {timeout} s:\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return run


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TRAIN_FLAGS, "--data", str(data), "--out", str(out), *extra]


@pytest.fixture(scope="session")
def train_argv(tiny_data):
    """``train_argv(out, *extra)``: the arguments of a reference-configured ``arcvit train`` into ``out``."""
    return lambda out, *extra: train_args(tiny_data, Path(out), *extra)


@dataclass
class RunOutcome:
    """What a finished run folder holds, less the timing fields that legitimately differ between runs."""

    folder: Path
    results: dict[str, Any]
    metrics: list[dict[str, str]]
    adapter: dict[str, Any]  # name -> tensor

    @classmethod
    def read(cls, folder: Path) -> "RunOutcome":
        from safetensors.torch import load_file
        results = json.loads((folder / "results.json").read_text())
        with open(folder / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        return cls(folder, {k: v for k, v in results.items() if k not in TIMING_KEYS},
                   [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in metrics],
                   load_file(folder / "adapter" / "adapter.safetensors"))

    def max_adapter_diff(self, other: "RunOutcome") -> float:
        assert sorted(self.adapter) == sorted(other.adapter), "the runs saved different adapter tensors"
        return max((self.adapter[k].double() - other.adapter[k].double()).abs().max().item() for k in self.adapter)


@pytest.fixture(scope="session")
def read_run():
    return RunOutcome.read


@pytest.fixture(scope="session")
def _reference_process(tiny_data, tmp_path_factory):
    """The reference run's process, started in the background (output to files, its own process group)."""
    folder = tmp_path_factory.mktemp("reference")
    with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([*arcvit_command(), *train_args(tiny_data, folder / "run")], stdout=stdout,
                                stderr=stderr, env=subprocess_env(), start_new_session=True)
    yield proc, folder
    if proc.poll() is None:  # the session ended before anything waited for it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _start_reference_early(request):
    """If any selected test uses ``reference_run``, start it when the session starts, so that it trains on the
    second core while the tests before it run (they are single-threaded)."""
    if any("reference_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("_reference_process")


@pytest.fixture(scope="session")
def reference_run(_reference_process) -> RunOutcome:
    """An uninterrupted one-process run with ``TRAIN_FLAGS`` (kept as it finished: tests copy, never modify)."""
    proc, folder = _reference_process
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, (folder / "stderr.txt").read_text()[-3000:]
    return RunOutcome.read(folder / "run")


@pytest.fixture(scope="module")
def one_thread():
    """On models this small, starting and syncing threads costs more than the math, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
