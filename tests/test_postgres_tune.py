"""One Optuna study in a real PostgreSQL server, tuned by two ``arcvit tune`` processes at once: every trial
number is used once, no trial is lost, and best.toml names the best completed trial. A database that cannot be
reached fails in seconds with one line."""
from __future__ import annotations

import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from conftest import BACKBONE, TINY_TASK, arcvit_command, subprocess_env
from postgres_support import postgres_server

from arcvit.cli import main

QUICK = ("--backbone", BACKBONE, "--random-init", "--task", TINY_TASK, "--epochs", "1", "--warmup-epochs", "0",
         "--batch-size", "32", "--accelerator", "cpu", "--quiet", "--method", "arc")
TRIALS = 6
STUDY = "shared.arc"


def _tune(data: Path, out: Path, storage: str, *extra: str) -> list[str]:
    return [*arcvit_command(), "tune", *QUICK, "--data", str(data), "--out", str(out), "--trials", str(TRIALS),
            "--storage", storage, "--study-name", STUDY, *extra]


@pytest.mark.slow
def test_two_processes_tune_one_study_in_postgresql(tiny_data, tmp_path):
    import optuna
    from optuna.trial import TrialState
    with postgres_server() as url:
        procs = {name: subprocess.Popen(_tune(tiny_data, tmp_path / name, url), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=subprocess_env())
                 for name in ("a", "b")}
        ended: list[str] = []
        deadline = time.monotonic() + 600
        while len(ended) < len(procs) and time.monotonic() < deadline:
            ended += [n for n, p in procs.items() if n not in ended and p.poll() is not None]
            time.sleep(0.1)
        outputs = {}
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            outputs[name] = proc.communicate()
        for name, proc in procs.items():
            assert proc.returncode == 0, f"tune {name}: {outputs[name][1][-3000:]}"
        study = optuna.load_study(study_name=STUDY, storage=url)
        trials = study.get_trials(deepcopy=False)

    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials)))  # unique, none skipped
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)  # none lost or left running
    assert len(trials) >= TRIALS
    folders = {name: sorted(int(p.name) for p in (tmp_path / name / "trials").iterdir()) for name in procs}
    assert sorted(folders["a"] + folders["b"]) == numbers and folders["a"] and folders["b"]  # each ran once

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    # the best.toml written last saw every trial (two processes may end within one poll, so not ``ended``'s order)
    last = max(procs, key=lambda name: (tmp_path / name / "best.toml").stat().st_mtime_ns)
    text = (tmp_path / last / "best.toml").read_text()
    assert re.search(rf"\(trial {best.number}, val top-1 {best.value:.4f}\)", text), text
    searched = tomllib.loads(text)["tasks"][TINY_TASK]["methods"]["arc"]
    assert {k: searched[k] for k in best.params} == pytest.approx(best.params)


def test_unreachable_database_fails_in_seconds_with_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    """"In seconds" is the connect time-out the storage is opened with (no wall clock: a busy machine is slow)."""
    import arcvit.training.tune as tune
    opened, options = [], tune.engine_options
    monkeypatch.setattr(tune, "engine_options", lambda url: opened.append(options(url)) or opened[-1])
    argv = _tune(tiny_data, tmp_path / "study", "postgresql://arcvit@127.0.0.1:1/postgres")[len(arcvit_command()):]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert opened and all(o == {"connect_args": {"connect_timeout": 10}} for o in opened), opened
    assert len(err.splitlines()) == 1 and err.startswith("arcvit tune: error: storage "), err
    assert "Connection refused" in err or "connection" in err.lower(), err
