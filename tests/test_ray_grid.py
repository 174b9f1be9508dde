"""``arcvit bench --ray``: a grid run as Ray tasks on a real local cluster (2 CPUs) ends with the same run folders
and report as the same grid run one after another in this process, also when a worker is killed mid-run; bad
Ray inputs fail in seconds with one line."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import MINI_TASKS, MINI_TEST_SIZE, TIMING_KEYS

from arcvit.bench.executors import InProcess, Outcome, RunJob
from arcvit.bench.grid_progress import GridProgress
from arcvit.bench.runner import run_bench
from arcvit.cli import main

GRID = dict(tasks=list(MINI_TASKS), methods=["linear", "arc"], seeds=[0, 1], backbone="vit_pico_patch7_28",
            overrides={"epochs": 1}, progress=False, pretrained=False, max_steps_per_epoch=6,
            mini_test_size=MINI_TEST_SIZE)
RUNS = len(MINI_TASKS) * 2 * 2
WORKER_TITLE = b"ray::train_on_worker"  # Ray names a worker process after the task it is running


def _comparable(out: Path) -> dict[str, object]:
    """Everything a bench leaves that must not depend on how its runs were executed (timings left out)."""
    from safetensors.torch import load_file
    runs = {}
    for folder in sorted(out.glob("runs/*/*/seed*")):
        results = json.loads((folder / "results.json").read_text())
        weights = {f.relative_to(folder).as_posix(): {n: t.tolist() for n, t in load_file(f).items()}
                   for f in sorted(folder.rglob("*.safetensors")) if "checkpoints" not in f.parts}
        assert weights, f"{folder}: no trained weights"
        runs[folder.relative_to(out).as_posix()] = ({k: v for k, v in results.items() if k not in TIMING_KEYS},
                                                    _csv_rows(folder / "metrics.csv"), weights)
    report = [line for line in (out / "report.md").read_text().splitlines() if "wall" not in line.lower()]
    return {"runs": runs, "table": _csv_rows(out / "results.csv"), "report": report}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def sequential(mini_data, tmp_path_factory, one_thread) -> dict[str, object]:
    out = tmp_path_factory.mktemp("sequential")
    run_bench("mini", out, data=mini_data, **GRID)
    return _comparable(out)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local 2-CPU cluster; its workers' temporary folders (a killed worker leaves its own) in the test's."""
    import ray
    scratch = tmp_path_factory.mktemp("ray_workers")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TMPDIR": str(scratch)}})
    yield ray
    ray.shutdown()


def _ray_bench(out: Path, data: Path, **options) -> None:
    from arcvit.bench.ray_executor import RayExecutor
    run_bench("mini", out, data=data, **GRID, executor=RayExecutor(**options))


@pytest.mark.slow
def test_ray_grid_equals_sequential(ray_cluster, sequential, mini_data, tmp_path, capsys):
    _ray_bench(tmp_path, mini_data)
    printed = capsys.readouterr().out
    assert f"grid: {RUNS} done, 0 running, 0 failed, 0 queued" in printed
    assert "grid: 1 done, 1 running, 0 failed, 6 queued; about" in printed  # two runs at once on 2 CPUs
    assert _comparable(tmp_path) == sequential
    assert not list(tmp_path.glob("runs/*/*/*/checkpoints"))  # checkpoints stay with the workers
    _ray_bench(tmp_path, mini_data)  # the same command again: nothing left to run
    assert capsys.readouterr().out.count("skip (done)") == RUNS


def _worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(WORKER_TITLE):
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile
            continue
    return pids


@pytest.mark.slow
def test_killed_worker_is_retried_and_the_grid_ends_the_same(ray_cluster, sequential, mini_data, tmp_path):
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            pids = _worker_pids()
            if pids:
                time.sleep(0.1)  # let it train a little
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                except ProcessLookupError:
                    continue
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    try:
        _ray_bench(tmp_path, mini_data, max_retries=2)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was seen running a run"
    assert _comparable(tmp_path) == sequential


def test_grid_progress_counts_and_estimates():
    clock = iter([0.0, 10.0, 20.0]).__next__
    lines: list[str] = []
    grid = GridProgress(done=1, queued=3, echo=lines.append, clock=clock)
    grid.started()
    grid.started()
    grid.finished(failed=False)  # t = 10 s: one run ended, two left (one running, one queued)
    grid.finished(failed=True)   # t = 20 s: two ended in 20 s, one left
    assert lines == ["grid: 2 done, 1 running, 0 failed, 1 queued; about 20s left (estimate)",
                     "grid: 2 done, 0 running, 1 failed, 1 queued; about 10s left (estimate)"]


def test_in_process_executor_reports_a_user_error_by_name(tmp_path):
    from arcvit.errors import DataError

    def fit(data, cfg, folder):
        raise DataError(f"{folder.name}: broken image")
    ended: list[tuple[str, Outcome]] = []
    job = RunJob("[1/1] t / m / seed 0", None, None, tmp_path / "seed0")
    InProcess().run([job], fit, lambda j: None, lambda j, o: ended.append((j.label, o)))
    assert ended == [("[1/1] t / m / seed 0", Outcome(error="DataError: seed0: broken image"))]


def test_unreachable_ray_address_fails_in_seconds_with_one_line(tmp_path, capsys, monkeypatch):
    """"In seconds" is the connect time-out the address is tried with (no wall clock: a busy machine is slow)."""
    import socket

    from arcvit.bench import ray_executor
    tried, connect = [], socket.create_connection

    def spy(address, timeout=None, **kwargs):
        tried.append((address, timeout))
        return connect(address, timeout, **kwargs)
    monkeypatch.setattr(socket, "create_connection", spy)
    assert main(["bench", "--suite", "mini", "--out", str(tmp_path / "b"), "--ray", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert tried == [(("127.0.0.1", 1), ray_executor.CONNECT_TIMEOUT_S)] and ray_executor.CONNECT_TIMEOUT_S <= 10
    assert err.strip().splitlines() == ["arcvit bench: error: --ray '127.0.0.1:1': no Ray cluster reachable there "
                                        "(Connection refused)"]
    assert main(["bench", "--suite", "mini", "--out", str(tmp_path / "b"), "--ray", "nowhere"]) == 1
    assert "give 'auto', HOST:PORT or ray://HOST:PORT" in capsys.readouterr().err
    for flags, message in ((["--cpus-per-run", "0"], "--cpus-per-run: expected a number 0 < x <= 1024"),
                           (["--gpus-per-run", "-1"], "--gpus-per-run: expected a number from 0 to 1024"),
                           (["--max-retries", "-1"], "--max-retries: expected a whole number from 0 to 100")):
        with pytest.raises(SystemExit, match="^2$") as e:  # argparse's one line (tests/test_cli_numbers.py: every flag)
            main(["bench", "--suite", "mini", "--out", str(tmp_path / "b"), "--ray", *flags])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"arcvit bench: error: argument {message}") and "\n" not in err
    assert not (tmp_path / "b").exists()  # nothing built or written


@pytest.mark.parametrize("options, message", [
    (dict(cpus_per_run=0), "--cpus-per-run must be a number > 0, got 0"),
    (dict(gpus_per_run=-1), "--gpus-per-run must be a number >= 0, got -1"),
    (dict(max_retries=-1), "--max-retries must be a whole number >= 0, got -1"),
    (dict(cpus_per_run=float("nan")), "--cpus-per-run must be a number > 0, got nan"),
])
def test_ray_executor_checks_its_resources(options, message):
    """The library checks what the command line's bounds also check, for callers of the Python API."""
    from arcvit.bench.ray_executor import RayExecutor
    from arcvit.errors import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        RayExecutor(**options)


def test_ray_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where ray is not installed
    assert main(["bench", "--suite", "mini", "--out", str(tmp_path / "b"), "--ray"]) == 1
    assert capsys.readouterr().err == "arcvit bench: error: --ray needs the 'ray' extra: pip install 'arcvit[ray]'\n"


@pytest.mark.slow
def test_tune_on_ray_workers_share_one_study(ray_cluster, tiny_data, tmp_path, capsys):
    """Two tune workers (Ray tasks, one per CPU) ask one study for trials: every trial number once, each
    worker ran some, and the driver writes best.toml for the study's best trial."""
    import optuna
    from conftest import BACKBONE, TINY_TASK
    from optuna.trial import TrialState
    study_dir = tmp_path / "study"
    argv = ["tune", "--backbone", BACKBONE, "--random-init", "--task", TINY_TASK, "--data", str(tiny_data),
            "--method", "arc", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32",
            "--accelerator", "cpu", "--quiet", "--trials", "4", "--out", str(study_dir), "--ray"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{study_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials))) and len(trials) >= 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    workers = {Path(t.user_attrs["run_dir"]).parent.parent for t in trials}
    assert len(workers) == 2  # each worker trained in a folder of its own
    assert f"(trial {study.best_trial.number}, " in (study_dir / "best.toml").read_text()
    assert summary["best_trial"] == study.best_trial.number


@pytest.mark.slow
def test_ctrl_c_keeps_finished_runs_and_the_same_command_resumes(mini_data, tmp_path):
    """`arcvit bench --ray` (its own local cluster) interrupted once two runs are done: exit 130, those runs
    kept; the same command then runs only the others."""
    import shutil
    import subprocess

    from conftest import arcvit_command, subprocess_env
    shutil.copytree(mini_data, tmp_path / "data")
    command = [*arcvit_command(), "bench", "--suite", "mini", "--data", str(tmp_path / "data"), "--out",
               str(tmp_path / "b"), "--tasks", *MINI_TASKS, "--methods", "linear", "arc", "--seeds", "0", "1",
               "--epochs", "1", "--accelerator", "cpu", "--quiet", "--ray"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=subprocess_env()) as proc:
        for line in proc.stdout:
            if line.startswith("grid: 2 done"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; run the same command again to resume" in err
    kept = len(list((tmp_path / "b").glob("runs/*/*/*/results.json")))
    assert 2 <= kept < RUNS
    again = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip (done)") == kept
    assert len(list((tmp_path / "b").glob("runs/*/*/*/results.json"))) == RUNS
