"""arcvit tune: the search space file and its checks, a real search on tiny data (outputs, best.toml read back by
train, the test split never opened), a killed search resumed, and bad inputs refused before anything is written."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BACKBONE, TINY_TASK, arcvit_command, subprocess_env

from arcvit.errors import ConfigError
from arcvit.training.search_space import SEARCH_SPACE_FILE, Range, load_search_space, read_space_file

# One epoch of 5 steps per trial: a trial takes seconds.
QUICK = ("--backbone", BACKBONE, "--random-init", "--task", TINY_TASK, "--epochs", "1", "--warmup-epochs", "0",
         "--batch-size", "32", "--accelerator", "cpu", "--quiet")


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_packaged_space_is_valid_for_every_method():
    defaults, methods = read_space_file(SEARCH_SPACE_FILE)
    assert defaults["lr"] == Range("lr", 1e-4, 1e-1, log=True)
    assert "epochs" not in defaults and all("epochs" not in m for m in methods.values())  # only if a user asks
    for method in ("arc", "arc_att", "lora", "vera", "adaptformer"):
        assert {"lr", "weight_decay", "rank", "adapter_dropout", "label_smoothing", "drop_path"} <= set(
            load_search_space(method).ranges)
    full = load_search_space("full")
    assert "rank" not in full.ranges and "adapter_dropout" not in full.ranges  # defaults' adapter entries skip it
    assert full.ranges["lr"].high < defaults["lr"].high and full.ranges["lr"].log


def test_override_file_replaces_entries_and_flags_fix_settings(tmp_path):
    path = space_file(tmp_path, "[defaults]\nepochs = {choices = [2, 4]}\nweight_decay = 0.0\n"
                                "[methods.arc]\nrank = {low = 2, high = 8}\n")
    space = load_search_space("arc", path)
    assert space.ranges["rank"] == Range("rank", 2, 8) and space.ranges["epochs"].choices == (2, 4)
    assert "weight_decay" not in space.ranges and space.fixed == {"weight_decay": 0.0}
    assert space.ranges["lr"].log  # untouched entries stay the packaged ones
    fixed = space.without(["epochs", "weight_decay"])
    assert "epochs" not in fixed.ranges and fixed.fixed == {}


@pytest.mark.parametrize("text, message", [
    ("[methods.nosuch]\nlr = {low = 1e-3, high = 1e-2}", r"unknown method\(s\) nosuch"),
    ("[defaults]\nmomentum = {low = 0.1, high = 0.9}", "unknown parameter 'momentum'"),
    ("[defaults]\nlr = {low = 1e-2, high = 1e-2}", "empty range"),
    ("[defaults]\nlr = {low = 1e-2, high = 1e-3}", "empty range"),
    ("[defaults]\nlr = {choices = []}", "non-empty list"),
    ("[defaults]\nlr = {low = 0.0, high = 1e-2, log = true}", "log-scale range must start above 0"),
    ("[defaults]\nlr = {low = 1e-3, hi = 1e-2}", "unknown key"),
    ("[methods.full]\nrank = {low = 1, high = 4}", "full has no rank"),
    ("[methods.arc]\nrank = {low = 1.5, high = 4}", "whole-number ends"),
    ("[defaults]\nlr = \"fast\"", "expected a range table or a number"),
    ("[search]\nlr = 1e-3", "unexpected 'search'"),
])
def test_bad_search_space_is_one_clear_line(tmp_path, text, message):
    path = space_file(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_search_space("arc", path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ---- real searches through the command line -------------------------------------------------------------------


def tune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", *QUICK, "--data", str(data), "--method", "arc", "--out", str(out), *map(str, extra)]


def read_trials(study: Path) -> list[dict[str, str]]:
    with open(study / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def no_test_images(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with every test image deleted (test.txt kept): a search that opened test would fail."""
    root = tmp_path_factory.mktemp("no_test") / "data"
    shutil.copytree(tiny_data, root)
    task = root / TINY_TASK
    for line in (task / "test.txt").read_text().splitlines():
        (task / line.rsplit(maxsplit=1)[0]).unlink()
    return root


@pytest.fixture(scope="module")
def search(arcvit_cli, no_test_images, tmp_path_factory) -> Path:
    """A two-trial search on data whose test split is unreadable."""
    study = tmp_path_factory.mktemp("search") / "study"
    proc = arcvit_cli(*tune_args(no_test_images, study, "--trials", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return study


def test_search_writes_study_trials_best_and_plots(search):
    for name in ("study.db", "trials.csv", "best.toml", "optimization_history.png"):
        assert (search / name).is_file(), name
    rows = read_trials(search)
    assert [r["number"] for r in rows] == ["0", "1"]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"} and rows[0]["state"] == "COMPLETE"
    assert len({r["lr"] for r in rows}) == 2  # each trial its own settings
    for r in rows:
        assert Path(r["run_dir"]) == search / "trials" / f"{int(r['number']):04d}"
        settings = json.loads((Path(r["run_dir"]) / "settings.json").read_text())
        splits = settings["data"]["splits"]
        assert settings["train"]["protocol"] == "select" and (splits["train"], splits["val"]) == ("train800", "val200")
        assert set(settings["data_fingerprints"]) == {"train", "val"}  # test never read (its images are gone)


def test_best_toml_reproduces_the_best_trial_in_train(search, arcvit_cli, no_test_images, tiny_data, tmp_path):
    rows = [r for r in read_trials(search) if r["state"] == "COMPLETE"]
    best = max(rows, key=lambda r: float(r["val_top1"]))  # ties: the first, as optuna's best_trial
    best_settings = json.loads((Path(best["run_dir"]) / "settings.json").read_text())["train"]
    proc = arcvit_cli("train", *QUICK, "--data", tiny_data, "--method", "arc", "--config", search / "best.toml",
                      "--protocol", "select", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())["train"]
    assert settings == best_settings
    assert settings["lr"] == pytest.approx(float(best["lr"]), rel=1e-12) and settings["rank"] == int(best["rank"])


def test_final_retrains_best_on_train_plus_val_and_tests_once(arcvit_cli, tiny_data, tmp_path):
    study = tmp_path / "study"
    proc = arcvit_cli(*tune_args(tiny_data, study, "--trials", "1", "--final"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((study / "final.json").read_text())
    results = json.loads((study / "final" / "results.json").read_text())
    assert final["protocol"] == results["protocol"] == "final" and final["test_top1"] == results["test_top1"]
    assert final["best_trial"] == 0 and results["train_images"] == 200  # train800val200
    summary = json.loads(proc.stdout)
    assert summary["final"]["test_top1"] == results["test_top1"]
    before = (study / "final" / "results.json").stat().st_mtime_ns
    again = arcvit_cli(*tune_args(tiny_data, study, "--trials", "1", "--final", "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (study / "final" / "results.json").stat().st_mtime_ns == before  # test evaluated once


def test_killed_search_resumes_without_repeating_finished_trials(tiny_data, arcvit_cli, tmp_path):
    study = tmp_path / "study"
    args = tune_args(tiny_data, study, "--trials", "2", "--epochs", "2")
    with subprocess.Popen([*arcvit_command(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=subprocess_env(), start_new_session=True) as proc:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (study / "trials.csv").exists() and any(r["state"] == "COMPLETE" for r in read_trials(study)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = [r for r in read_trials(study) if r["state"] == "COMPLETE"]
    stamps = {r["number"]: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for r in first}

    resumed = arcvit_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_trials(study)
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2
    for r in first:  # the same trials, neither retrained nor re-numbered
        assert next(x for x in rows if x["number"] == r["number"]) == r
        assert (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns == stamps[r["number"]]
    failed = [r for r in rows if r["state"] == "FAIL" and r["run_dir"]]  # the trial the kill interrupted in
    for r in failed:                                                      # training is retried in its folder
        assert any(x["lr"] == r["lr"] and x["run_dir"] == r["run_dir"] for x in finished), rows


@pytest.mark.parametrize("extra, message", [
    (("--method", "nosuch"), "invalid choice: 'nosuch'"),
    (("--trials", "0"), "argument --trials: expected a whole number from 1 to 100000"),
    (("--storage", "nosuchdb://somewhere/x"), "storage 'nosuchdb://somewhere/x' cannot be opened"),
    (("--storage", "sqlite:////nonexistent-dir/sub/x.db"), "cannot be opened"),
    (("--protocol", "final"), "protocol: set by tune"),
    (("--resume",), "study.db: no study to resume"),
    (("--devices", "2"), "tune trains each trial in one process"),
])
def test_bad_inputs_one_line_nothing_written(extra, message, tiny_data, tmp_path, capsys):
    from arcvit.cli import main
    out = tmp_path / "study"
    argv = tune_args(tiny_data, out, "--trials", "2", *extra)
    with pytest.raises(SystemExit, match="^2$") if message.startswith(("invalid choice", "argument")) \
            else contextlib.nullcontext():
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("[defaults]\nfoo = {low = 1, high = 2}", "unknown parameter 'foo'"),
    ("[defaults]\nlr = {low = 1e-2, high = 1e-3}", "empty range"),
    ("[methods.nosuch]\nlr = 1e-3", "unknown method(s) nosuch"),
])
def test_bad_space_file_on_the_command_line(text, message, tiny_data, tmp_path, capsys):
    from arcvit.cli import main
    out = tmp_path / "study"
    assert main(tune_args(tiny_data, out, "--trials", "2", "--config", space_file(tmp_path, text))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("arcvit tune: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ---- arcvit bench --tune and matched-parameter variants -------------------------------------------------------


def test_bench_tune_gives_every_method_the_same_budget(tmp_path, capsys):
    """A tiny suite: each (task, method) tuned with 2 trials, then the final runs use the tuned settings; a
    variant arc@4 keeps its rank fixed; a second bench retrains and re-tunes nothing."""
    from arcvit.bench.runner import run_bench
    from arcvit.data.mini import build_mini_suite
    build_mini_suite(tmp_path / "data", ["mnist5k"], test_size=20)
    kw = dict(tasks=["mnist5k"], methods=["linear", "arc@4"], backbone=BACKBONE, overrides={"epochs": 1},
              progress=False, pretrained=False, max_steps_per_epoch=2, mini_test_size=20, tune=2)
    run_bench("mini", tmp_path, **kw)
    plan = json.loads((tmp_path / "bench.json").read_text())
    tuned = plan["tuning"]["tuned"]["mnist5k"]
    assert plan["tuning"]["trials"] == 2 and set(tuned) == {"linear", "arc@4"}
    assert "rank" not in tuned["arc@4"]["settings"] and "rank" not in tuned["linear"]["settings"]
    for name, record in tuned.items():
        assert len(read_trials(tmp_path / "tune" / "mnist5k" / name)) == 2
        train = json.loads((tmp_path / "runs" / "mnist5k" / name / "seed0" / "settings.json").read_text())["train"]
        assert train["protocol"] == "final" and train["epochs"] == 1
        assert {k: train[k] for k in record["settings"]} == record["settings"]
    arc = json.loads((tmp_path / "runs" / "mnist5k" / "arc@4" / "seed0" / "settings.json").read_text())["train"]
    assert (arc["method"], arc["rank"]) == ("arc", 4)
    report = (tmp_path / "report.md").read_text()
    assert "- tuning: the same budget for every (task, method): 2 trials" in report
    assert "## Tuned settings" in report and "| mnist5k | arc@4 |" in report and "| arc@4 |" in report
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 0
    stamps = {f: f.stat().st_mtime_ns for f in tmp_path.glob("*/mnist5k/**/results.json")}  # runs/, tune/
    capsys.readouterr()

    run_bench("mini", tmp_path, **kw)
    assert capsys.readouterr().out.count("skip (done)") == 2
    assert len(stamps) == 6 and {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert all(len(read_trials(tmp_path / "tune" / "mnist5k" / n)) == 2 for n in tuned)


@pytest.mark.parametrize("methods, message", [
    (["linear@4"], "'linear@4': linear has no rank to fix"),
    (["arc@x"], "'arc@x': the rank after @: expected a whole number from 1 to 65536 (ASCII digits), got 'x'"),
    (["arc@0"], "the rank after @: expected a whole number from 1 to 65536"),
    (["arc@٣"], "'arc@٣': the rank after @: expected a whole number"),  # str.isdigit() would take it
    (["arc@²"], "'arc@²': the rank after @: expected a whole number"),  # and int() would fail on this one
    (["nosuch@4"], "unknown method 'nosuch'"),
])
def test_bench_method_variants_are_checked(methods, message, tmp_path, capsys):
    from arcvit.cli import main
    assert main(["bench", "--suite", "mini", "--methods", *methods, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "b").exists()


def test_bench_tune_zero_is_refused(tmp_path, capsys):
    from arcvit.cli import main
    with pytest.raises(SystemExit, match="^2$") as e:  # argparse's one line, exit 2 (tests/test_cli_numbers.py)
        main(["bench", "--suite", "mini", "--tune", "0", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    assert "argument --tune: expected a whole number from 1 to 100000" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---- the one recipe loader, as train reads it -----------------------------------------------------------------


def test_train_config_layers_most_specific_last_flags_above_all(tmp_path):
    from arcvit.bench.runner import CONFIG_DIR
    from arcvit.cli import build_parser
    from arcvit.cli.train import train_config
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[defaults]\nlr = 0.1\nweight_decay = 0.1\nepochs = 7\nwarmup_epochs = 1\n"
                      "[methods.full]\nlr = 0.01\nweight_decay = 0.01\n"
                      "[tasks.shapes_tiny]\nlr = 0.2\nlabel_smoothing = 0.1\n"
                      "[tasks.shapes_tiny.methods.full]\nweight_decay = 0.001\n")

    def cfg(task, method, *flags, config=recipe):
        return train_config(build_parser().parse_args(["train", "--data", "x", "--out", "y", "--config", str(config),
                                                        "--task", task, "--method", method, *flags]))
    full = cfg("shapes_tiny", "full")
    assert (full.lr, full.weight_decay, full.label_smoothing, full.epochs) == (0.01, 0.001, 0.1, 7)
    arc = cfg("shapes_tiny", "arc")
    assert (arc.lr, arc.weight_decay, arc.label_smoothing) == (0.2, 0.1, 0.1)  # a method layer beats a task layer
    assert (cfg("other", "full").lr, cfg("other", "full").weight_decay) == (0.01, 0.01)
    flagged = cfg("shapes_tiny", "full", "--lr", "0.5", "--weight-decay", "0")
    assert (flagged.lr, flagged.weight_decay) == (0.5, 0.0)
    assert cfg("mnist5k", "full", config=CONFIG_DIR / "mini.toml").lr == 5e-4  # not ARC's 1e-2


def test_poor_trials_are_pruned_and_count_towards_the_budget(tiny_data, tmp_path, monkeypatch):
    """The pruner reads each epoch's validation top-1 through train's on_epoch_end hook (train faked here); a
    diverged trial counts as pruned."""
    from arcvit.errors import TrainingDiverged
    from arcvit.training import tune as tuning
    from arcvit.training.config import DataSpec
    calls = []

    def fake_train(backbone, data, cfg, out, *, on_epoch_end, evaluate_test, **kw):
        assert not evaluate_test and cfg.protocol == "select"
        score = 0.1 if len(calls) >= tuning.PRUNER_STARTUP_TRIALS else 0.5
        calls.append([])
        if len(calls) == 6:
            raise TrainingDiverged(f"{out}: training diverged at epoch 1")
        for epoch in range(1, cfg.epochs + 1):
            calls[-1].append(epoch)
            on_epoch_end(epoch, {"epoch": epoch, "val_top1": score})
        return {"val_top1": score, "selected_epoch": cfg.epochs, "trainable_params": 1}
    monkeypatch.setattr(tuning, "train", fake_train)
    job = tuning.make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), "linear", 6, tmp_path / "study",
                          fixed={"epochs": 3, "warmup_epochs": 0})
    summary = tuning.tune(job, progress=False)
    assert calls == [[1, 2, 3]] * 3 + [[1]] * 2 + [[]]  # two stopped after their first epoch, one diverged
    rows = read_trials(tmp_path / "study")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 + ["PRUNED"] * 3 and summary["finished"] == 6
    assert "training diverged" in rows[5]["note"]  # a poor setting: the search goes on
    assert (tmp_path / "study" / "param_importances.png").is_file()
    import matplotlib
    assert matplotlib.rcParams["axes.facecolor"] == "white"  # optuna's plot style did not leak into arcvit's
    assert "rank" not in job.space.ranges and summary["best_val_top1"] == 0.5
