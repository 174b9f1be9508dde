"""arcvit bench and report: the table's arithmetic, a report rebuilt from run folders alone, and benches that
resume without retraining anything finished."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path
from statistics import stdev

import pytest
import torch

from arcvit.bench import report
from arcvit.bench import runner as bench
from arcvit.bench.report import build_table, format_cell, render_table, run_dir
from arcvit.bench.runner import run_bench, suite_recipe
from arcvit.cli import main
from arcvit.data.mini import build_mini_suite
from arcvit.errors import ConfigError, DataError
from arcvit.training.recipes import train_config

TASKS = {"a": "natural", "b": "natural", "c": "structured"}
approx = partial(pytest.approx, abs=1e-4)  # the table rounds to 4 decimals
MINI_EPOCHS = suite_recipe(bench.CONFIG_DIR / "mini.toml", "mini").defaults["epochs"]
MINI = ["mnist5k", "animal_shapes"]  # a natural and a specialized task, both quick to build


pytestmark = pytest.mark.usefixtures("one_thread")


def record(task: str, method: str, seed: int, top1: float | None, status: str = "done") -> dict:
    return {"task": task, "method": method, "seed": seed, "status": status, "test_top1": top1,
            "trainable_params": 2000 if method == "x" else 500}


def test_table_means_over_tasks_groups_and_seeds():
    records = [record("a", "x", 0, .80), record("a", "x", 1, .82), record("b", "x", 0, .60), record("b", "x", 1, .64),
               record("c", "x", 0, .50), record("c", "x", 1, .50),
               record("a", "y", 0, .70), record("b", "y", 0, None, "failed"), record("c", "y", 0, .40),
               record("c", "z", 0, .30)]
    table = build_table(records, TASKS)
    x, y, z = table["rows"]
    assert table["groups"] == {"natural": ["a", "b"], "structured": ["c"]}
    assert x["tasks"]["a"]["mean"] == approx(81) and x["tasks"]["a"]["std"] == approx(stdev([80, 82]))
    assert x["groups"]["natural"]["mean"] == approx(71.5)  # (81 + 62) / 2
    assert x["groups"]["natural"]["std"] == approx(stdev([70, 73]))  # per-seed group means
    assert x["all_tasks"]["mean"] == approx((81 + 62 + 50) / 3)
    assert x["mean_of_group_means"]["mean"] == approx((71.5 + 50) / 2)
    assert x["all_tasks"]["complete"] and x["mean_of_group_means"]["complete"] and x["params_m"] == 0.002
    # y lacks task b (its run failed): natural is its mean over a alone, marked incomplete, and so is anything above
    assert y["groups"]["natural"] == {"mean": 70, "std": None, "seeds": 1, "complete": False, "failed": False}
    assert y["groups"]["structured"]["complete"] and y["all_tasks"]["mean"] == approx(55)
    assert not y["all_tasks"]["complete"] and not y["mean_of_group_means"]["complete"]
    assert [format_cell(y["tasks"][t]) for t in TASKS] == ["70.0", "failed", "40.0"]
    assert (format_cell(y["groups"]["natural"]), format_cell(x["tasks"]["a"])) == ("70.0*", "81.0 ± 1.4")
    assert format_cell(z["tasks"]["a"]) == "–" and z["groups"]["natural"]["mean"] is None
    assert z["mean_of_group_means"]["mean"] == approx(30) and not z["mean_of_group_means"]["complete"]
    header, _, first, *_ = render_table(table)
    assert header == ("| method | a | b | **natural** | c | **structured** | **mean (all tasks)** "
                      "| **mean of group means** | params (M) | merges |")
    assert first == ("| x | 81.0 ± 1.4 | 62.0 ± 2.8 | 71.5 ± 2.1 | 50.0 ± 0.0 | 50.0 ± 0.0 | 64.3 ± 1.4 | 60.8 ± 1.1 "
                     "| 0.002 | – |")  # x is no method arcvit knows


@pytest.mark.parametrize("method, merges", [("arc", "yes"), ("lora@2", "yes"), ("rlrr", "yes"), ("adaptformer", "no")])
def test_table_says_whether_a_method_merges(method, merges):
    table = build_table([{"task": "a", "method": method, "seed": 0, "status": "done", "test_top1": 0.5,
                          "trainable_params": 10}], {"a": "natural"})
    assert render_table(table)[2].endswith(f"| {merges} |")


def write_run(folder: Path, task: str, cfg, top1: float, backbone: str = "vit_pico_patch7_28") -> dict:
    """What train() leaves in a finished run folder, as far as the report reads it."""
    settings = {"backbone": backbone, "checkpoint": None, "pretrained": False,
                "data": {"splits": {"train": "train800val200", "test": "test"}}, "train": asdict(cfg),
                "data_fingerprints": {"train": f"{task:0<64}", "test": "f" * 64},
                "versions": {"arcvit": "0.1.0", "torch": torch.__version__}}
    results = {"task": task, "method": cfg.method, "seed": cfg.seed, "test_top1": top1, "trainable_params": 1234,
               "wall_time_s": 1.0, "protocol": cfg.protocol}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "results.json").write_text(json.dumps(results))
    return results


def test_report_command_rebuilds_from_run_folders(tmp_path, capsys):
    recipe = suite_recipe(bench.CONFIG_DIR / "mini.toml", "mini")
    for task, top1 in (("mnist5k", 0.9), ("animal_shapes", 0.6), ("shapes_count", 0.5)):
        for method in ("linear", "arc"):
            for seed in (0, 1):
                write_run(run_dir(tmp_path, task, method, seed), task, train_config(recipe, task, method, {"seed": seed}), top1)
    run_dir(tmp_path, "shapes_location", "arc", 0).mkdir(parents=True)
    (run_dir(tmp_path, "shapes_location", "arc", 0) / "error.txt").write_text("DataError: bad image\n")
    run_dir(tmp_path, "shapes_location", "linear", 0).mkdir(parents=True)  # stopped before finishing

    assert main(["report", str(tmp_path)]) == 0  # no bench.json: the suite is inferred from the task names
    assert set(capsys.readouterr().out.split()) == {str(tmp_path / f) for f in (
        "report.md", "results.csv", "results.json", "accuracy_vs_params.png")}
    report = (tmp_path / "report.md").read_text()
    assert "train on train800val200, top-1 on test after the last epoch; no selection on test" in report
    assert "| linear | 90.0 ± 0.0 | 90.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | –" in report
    assert "| failed | 50.0 ± 0.0* |" in report  # shapes_location failed for arc
    assert "shapes_location / arc / seed 0: DataError: bad image" in report
    assert "## Outstanding runs\n\n- shapes_location / linear / seed 0" in report
    assert "| method | rank | adapter_dropout |" in report and "| arc | 16 | 0.1 |" in report  # per-method settings
    assert "| linear | – | – |" in report
    assert "lr=0.01, weight_decay=0.0" in report and f"epochs={MINI_EPOCHS}" in report  # shared settings
    assert f"torch {torch.__version__}" in report and "| mnist5k | mnist5k00000 | ffffffffffff |" in report
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 14 and {r["status"] for r in rows} == {"done", "failed", "unfinished"}
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["suite"] == "mini" and summary["table"]["rows"][0]["method"] == "arc"


def fake_train(fail: set[str] = frozenset(), interrupt_after: int | None = None):
    """A stand-in for train(): writes a finished run at once, raising for the methods in ``fail``."""
    calls = []

    def fit(backbone, data, cfg, out_dir, **kwargs):
        calls.append((data.task, cfg.method, cfg.seed))
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt(f"after {interrupt_after} runs")
        if cfg.method in fail:
            raise DataError(f"{data.task}: broken image")
        return write_run(Path(out_dir), data.task, cfg, 0.5, backbone)
    fit.calls = calls
    return fit


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    """The two tasks, built once for the module (a bench given them rebuilds nothing)."""
    root = tmp_path_factory.mktemp("mini")
    build_mini_suite(root, MINI, test_size=20)
    return root


def test_failed_and_interrupted_runs_resume(tmp_path, monkeypatch, mini_data, capsys):
    out = tmp_path / "bench"
    kw = dict(data=mini_data, tasks=MINI, methods=["linear", "arc"], seeds=[0, 1], backbone="vit_pico_patch7_28",
              pretrained=False, mini_test_size=20)
    monkeypatch.setattr(bench, "train", fake_train(interrupt_after=3))
    with pytest.raises(KeyboardInterrupt, match="^after 3 runs$"):
        run_bench("mini", out, **kw)
    assert "- runs: 3 finished, 0 failed, 5 outstanding" in (out / "report.md").read_text()

    monkeypatch.setattr(bench, "train", fit := fake_train(fail={"arc"}))
    run_bench("mini", out, **kw)
    assert fit.calls == [("mnist5k", "arc", 1), ("animal_shapes", "linear", 0), ("animal_shapes", "linear", 1),
                         ("animal_shapes", "arc", 0), ("animal_shapes", "arc", 1)]
    assert (run_dir(out, "animal_shapes", "arc", 1) / "error.txt").read_text() == \
        "DataError: animal_shapes: broken image\n"
    assert "FAILED (DataError: animal_shapes: broken image)" in capsys.readouterr().out
    assert "- runs: 5 finished, 3 failed, 0 outstanding" in (out / "report.md").read_text()

    monkeypatch.setattr(bench, "train", fit := fake_train())
    run_bench("mini", out, **kw)  # failed runs are tried again, finished ones are not
    assert fit.calls == [("mnist5k", "arc", 1), ("animal_shapes", "arc", 0), ("animal_shapes", "arc", 1)]
    assert not list(out.glob("runs/*/*/*/error.txt"))
    with pytest.raises(ConfigError, match=f"was run with other settings.*epochs {MINI_EPOCHS} -> 2"):
        run_bench("mini", out, **kw, overrides={"epochs": 2})


def test_bench_trains_then_skips_then_resumes(tmp_path, mini_data, capsys):
    """A real tiny bench: nothing finished is trained again; a run that lost its results.json resumes from its
    checkpoint (no new epoch) rather than starting over."""
    shutil.copytree(mini_data, tmp_path / "data")  # where the bench builds the suite when given no --data
    kw = dict(tasks=MINI, methods=["linear", "arc"], backbone="vit_pico_patch7_28", overrides={"epochs": 1},
              progress=False, pretrained=False, max_steps_per_epoch=2, mini_test_size=20)
    assert run_bench("mini", tmp_path, **kw) == tmp_path
    results = sorted(tmp_path.glob("runs/*/*/seed0/results.json"))
    assert len(results) == 4 and (tmp_path / "data" / "mnist5k").is_dir()
    files = results + sorted(tmp_path.glob("runs/*/*/seed0/checkpoints/*"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    report = (tmp_path / "report.md").read_text()
    assert "| linear |" in report and "| arc |" in report and "- runs: 4 finished, 0 failed, 0 outstanding" in report
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 0
    capsys.readouterr()

    run_bench("mini", tmp_path, **kw)
    assert capsys.readouterr().out.count("skip (done)") == 4
    assert {f: f.stat().st_mtime_ns for f in files} == stamps

    victim = run_dir(tmp_path, "animal_shapes", "linear", 0) / "results.json"
    before = json.loads(victim.read_text())
    victim.unlink()
    run_bench("mini", tmp_path, **kw)
    assert capsys.readouterr().out.count("skip (done)") == 3
    assert json.loads(victim.read_text())["test_top1"] == before["test_top1"]
    assert {f: f.stat().st_mtime_ns for f in files if f != victim} == {f: t for f, t in stamps.items() if f != victim}


def test_bench_command_checks_its_arguments(tmp_path, capsys):
    assert main(["bench", "--suite", "vtab1k", "--out", str(tmp_path)]) == 1
    assert "suite vtab1k needs --data" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[methods.arc]\nlearning_rate = 0.1\n")
    assert main(["bench", "--suite", "mini", "--config", str(bad), "--out", str(tmp_path)]) == 1
    assert "[methods.arc]: unknown setting(s) learning_rate" in capsys.readouterr().err
    bad.write_text("[methods.linear]\nrank = 4\n")
    assert main(["bench", "--suite", "mini", "--config", str(bad), "--out", str(tmp_path)]) == 1
    assert "linear has no rank or adapter dropout to set" in capsys.readouterr().err
    bad.write_text("[tasks.cifar]\nlr = 0.1\n")
    assert main(["bench", "--suite", "mini", "--config", str(bad), "--out", str(tmp_path)]) == 1
    assert "unknown mini task 'cifar'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_report_counts_per_method_how_often_a_range_end_was_reached():
    def record(edges):
        return {"settings": {"lr": 0.1}, "at_edge": edges, "val_top1": 0.5, "trials": 12}
    tuned = {"a": {"ssf": record({"lr": "high"}), "arc": record({})},
             "b": {"ssf": record({"lr": "high", "drop_path": "low"}), "arc": record({})},
             "c": {"ssf": record({}), "arc": record({"rank": "low"})}}
    lines = report._tuned_settings({"tuning": {"tuned": tuned}})
    assert "| ssf | lr (high) 2 of 3, drop_path (low) 1 of 3 |" in lines
    assert "| arc | rank (low) 1 of 3 |" in lines
    tuned["c"]["arc"]["at_edge"] = tuned["b"]["arc"]["at_edge"] = tuned["a"]["arc"]["at_edge"] = {}
    assert "| arc | none |" in report._tuned_settings({"tuning": {"tuned": tuned}})
    for methods in tuned.values():  # studies from before edges were recorded: no counts to show
        for r in methods.values():
            r["at_edge"] = None
    assert not any("range's end" in line for line in report._tuned_settings({"tuning": {"tuned": tuned}}))
