"""Runs and reports that must not answer wrongly (issue 23, classes 6 and 7).

- Logits that are not finite at evaluation end every evaluation path with exit 1 and no accuracy: the loop's
  validation and test evaluation (as a loss that is not finite does), ``eval``, ``predict``, ``merge``'s probe,
  a bench's run and the demo's merge check. Poisoned weights are finite but overflow (a head weight of 3e38),
  which no load-time check of the weights can catch; NaN weights are refused too, wherever they are found.
- ``--devices`` above what the machine has is refused up front, before any folder or data is made.
- ``arcvit report`` never replaces results with fewer finished runs than it had: on copies of the committed
  docs/bench/ and docs/bench/tuned/ (no run folders) it rebuilds them from results.json, which stays
  byte-identical, with the same CSV rows and table.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import MINI_TEST_SIZE, TINY_TASK
from test_bench import write_run

from arcvit.bench.report import render_table
from arcvit.cli import main

DOCS_BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"
REBUILT = ("results.csv", "report.md", "accuracy_vs_params.png")  # results.json is what they are rebuilt from
OVERFLOW = 3e38  # finite, but a head row of it sums to inf (and inf - inf to NaN)

pytestmark = pytest.mark.usefixtures("one_thread")


def call(argv: list, capsys) -> tuple[int, str, list[str]]:
    """``arcvit ARGV`` in this process: exit code, stdout, stderr lines (appended to $ARCVIT_BAD_INPUTS_LOG when
    set: docs/bad-inputs.md's rows are written from it)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    if os.environ.get("ARCVIT_BAD_INPUTS_LOG"):
        with open(os.environ["ARCVIT_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"argv": [str(a) for a in argv], "code": code, "stderr": err}) + "\n")
    return code, out, err.strip().splitlines()


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def poisoned_adapter(folder: Path, value: float) -> Path:
    """An ARC adapter for the shipped backbone and TINY_TASK's 6 classes whose head weights are all ``value``."""
    from arcvit.backends import create_backbone
    from arcvit.backends.timm.zoo import DEFAULT_BACKBONE
    from arcvit.core.adapter_file import save_adapter
    from arcvit.methods import prepare_model
    model = prepare_model(create_backbone(DEFAULT_BACKBONE, num_classes=6), "arc")
    with torch.no_grad():
        model.get_classifier().weight.fill_(value)
    return save_adapter(model, folder, extra={"task": TINY_TASK})


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    return poisoned_adapter(tmp_path_factory.mktemp("overflow") / "adapter", OVERFLOW)


# --- class 6: evaluation of non-finite logits ------------------------------------------------------------------

@pytest.mark.parametrize("value", [OVERFLOW, float("nan")], ids=["overflow", "nan"])
def test_eval_predict_and_merge_report_nothing_from_non_finite_logits(value, tmp_path, tiny_data, capsys):
    adapter = poisoned_adapter(tmp_path / "adapter", value)
    image = sorted((tiny_data / TINY_TASK / "images" / "test").glob("*.png"))[0]
    merged = tmp_path / "merged.safetensors"
    for argv in (["eval", "--adapter", adapter, "--data", tiny_data, "--task", TINY_TASK, "--accelerator", "cpu"],
                 ["eval", "--adapter", adapter, "--merge", "--data", tiny_data, "--task", TINY_TASK],
                 ["predict", "--adapter", adapter, "--accelerator", "cpu", image],
                 ["merge", "--adapter", adapter, "--out", merged]):
        code, out, err = call(argv, capsys)
        assert (code, out) == (1, ""), (argv, out)  # no accuracy, label or NaN diff on stdout
        assert len(err) == 1 and err[0].startswith(f"arcvit {argv[0]}: error: ") and "finite" in err[0], err
        if value == OVERFLOW:  # finite weights: the logits are what is found wrong
            assert "logits are not finite (NaN/inf)" in err[0], err
    assert not merged.exists()


def test_eval_of_a_healthy_adapter_still_reports_its_accuracy(tmp_path, tiny_data, capsys):
    code, out, err = call(["eval", "--adapter", poisoned_adapter(tmp_path / "a", 0.01), "--data", tiny_data,
                           "--task", TINY_TASK, "--accelerator", "cpu"], capsys)
    assert code == 0 and json.loads(out)["images"] == 60, err


@pytest.fixture
def nan_at_evaluation():
    """From now on the backbone's logits are NaN whenever it runs in eval mode (training steps stay finite):
    weights that train with a finite loss but no longer evaluate."""
    from timm.models.vision_transformer import VisionTransformer

    def hook(module, inputs, output):
        if isinstance(module, VisionTransformer) and not module.training:
            return output * float("nan")
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield
    handle.remove()


@pytest.mark.parametrize("protocol, split", [("select", "val"), ("final", "test")])
def test_a_run_whose_evaluation_logits_are_not_finite_exits_1_without_results(protocol, split, tmp_path, train_argv,
                                                                             nan_at_evaluation, capsys):
    from arcvit.training.checkpoint import load_latest_checkpoint
    out = tmp_path / "run"
    code, stdout, err = call(train_argv(out, "--epochs", "1", "--warmup-epochs", "0", "--protocol", protocol),
                             capsys)
    assert (code, stdout) == (1, "")
    assert len(err) == 1 and err[0].startswith(f"arcvit train: error: {out}: training diverged at "), err
    assert f"the {split} evaluation failed" in err[0] and "logits are not finite" in err[0], err
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    ckpt = load_latest_checkpoint(out / "checkpoints")  # the epoch is saved only once its evaluation held
    assert (ckpt.epoch if ckpt else 0) == (0 if split == "val" else 1)


def test_a_bench_run_whose_evaluation_logits_are_not_finite_fails(tmp_path, mini_data, nan_at_evaluation, capsys,
                                                                  monkeypatch):
    from arcvit.bench.runner import run_bench
    from arcvit.cli import bench as bench_cli
    # the session's mini suite as it was built (a bench rebuilds a task of another test size), 2 steps an epoch
    monkeypatch.setattr(bench_cli, "run_bench", partial(run_bench, mini_test_size=MINI_TEST_SIZE,
                                                        max_steps_per_epoch=2))
    out = tmp_path / "bench"
    code, stdout, err = call(["bench", "--suite", "mini", "--data", mini_data, "--tasks", "shapes_count",
                              "--methods", "linear", "--epochs", "1", "--accelerator", "cpu", "--quiet",
                              "--out", out], capsys)
    assert code == 1 and err[-1] == f"arcvit bench: error: 1 run(s) failed: see {out / 'report.md'}", err
    run = out / "runs" / "shapes_count" / "linear" / "seed0"
    assert not (run / "results.json").exists()
    assert (run / "error.txt").read_text().startswith("TrainingDiverged: ")
    assert "logits are not finite" in (run / "error.txt").read_text()
    assert "- runs: 0 finished, 1 failed" in (out / "report.md").read_text()


def test_the_demo_merge_check_refuses_non_finite_logits(tmp_path, overflowing, tiny_data):
    from arcvit.bench.demo import check_merge
    from arcvit.errors import NonFiniteOutput
    shutil.copytree(overflowing, tmp_path / "arc" / "adapter")
    with pytest.raises(NonFiniteOutput, match="adapter on VTAB-1k shapes_tiny/test .*logits are not finite"):
        check_merge(tmp_path / "arc", tiny_data, TINY_TASK)


# --- class 6: --devices ----------------------------------------------------------------------------------------

def _too_many() -> int:
    from arcvit.training.devices import available_devices
    return available_devices("cpu")[0] + 1


def test_train_and_bench_refuse_more_devices_than_the_machine_has(tmp_path, tiny_data, capsys):
    many = _too_many()
    for argv in (["train", "--data", tiny_data, "--task", TINY_TASK, "--out", tmp_path / "run"],
                 ["bench", "--suite", "mini", "--tasks", "shapes_count", "--methods", "linear", "--out",
                  tmp_path / "bench"]):
        code, out, err = call([*argv, "--devices", many, "--accelerator", "cpu"], capsys)
        assert (code, out) == (1, "")
        assert err == [f"arcvit {argv[0]}: error: --devices {many}: this machine has {many - 1} CPU(s) for "
                       f"--accelerator cpu; use --devices {many - 1} or fewer (devices counts per machine; "
                       "--num-nodes the machines)"], err
    assert list(tmp_path.iterdir()) == []  # refused before any run folder, data or plan


def test_tune_refuses_devices_above_one(tmp_path, tiny_data, capsys):
    code, _, err = call(["tune", "--data", tiny_data, "--task", TINY_TASK, "--trials", "1", "--out", tmp_path / "s",
                         "--devices", _too_many()], capsys)
    assert code == 1 and len(err) == 1 and "tune trains each trial in one process" in err[0], err


def test_cuda_devices_are_counted(monkeypatch):
    from arcvit.errors import ConfigError
    from arcvit.training.devices import require_devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    require_devices("cuda", 2)
    for name in ("cuda", "gpu", "auto"):
        with pytest.raises(ConfigError, match=f"--devices 3: this machine has 2 CUDA GPU\\(s\\) for --accelerator {name}"):
            require_devices(name, 3)


# --- class 7: reports ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["tuned", "untuned"])
def test_report_on_a_published_results_folder_rebuilds_it_from_results_json(folder, tmp_path, capsys):
    source = DOCS_BENCH / "tuned" if folder == "tuned" else DOCS_BENCH
    copy = tmp_path / folder
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("tuned") if folder == "untuned" else None)
    before = digests(copy)
    finished = sum(r["status"] == "done" for r in json.loads((source / "results.json").read_text())["runs"])
    code, out, err = call(["report", copy], capsys)
    assert code == 0 and len(err) == 1, err
    assert err[0] == (f"arcvit report: warning: {copy}: no run folders under {copy / 'runs'}; report.md, "
                      f"results.csv and the plot were rebuilt from results.json ({finished} finished runs), which is "
                      "kept as it is")
    assert (copy / "results.json").read_bytes() == (source / "results.json").read_bytes()  # read, never written
    committed, rebuilt = (list(csv.DictReader((root / "results.csv").open())) for root in (source, copy))
    assert [{k: row[k] for k in committed[0]} for row in rebuilt] == committed  # (a column added since: empty)
    report = (copy / "report.md").read_text()  # rendered by today's code from the committed table, not emptied
    assert "\n".join(render_table(json.loads((source / "results.json").read_text())["table"])) in report
    assert f"- runs: {finished} finished, 0 failed, 0 outstanding" in report
    assert (copy / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {k: v for k, v in digests(copy).items() if k not in REBUILT} == \
        {k: v for k, v in before.items() if k not in REBUILT}

    code, _, err = call(["report", copy, "--suite", "vtab1k"], capsys)
    assert code == 1 and err == [f"arcvit report: error: --suite vtab1k: {copy / 'results.json'} holds a 'mini' "
                                 "report and its run folders are gone, so it cannot be rebuilt as another suite"]
    code, _, _ = call(["report", copy, "--force"], capsys)  # asked for: the folders alone, which hold nothing
    assert code == 0 and "- runs: 0 finished" in (copy / "report.md").read_text()


def test_bench_into_a_folder_whose_runs_are_gone_is_refused(tmp_path, capsys):
    copy = tmp_path / "tuned"
    shutil.copytree(DOCS_BENCH / "tuned", copy)
    before = digests(copy)
    code, _, err = call(["bench", "--suite", "mini", "--tasks", "mnist5k", "--methods", "linear", "--out", copy],
                        capsys)
    assert code == 1 and len(err) == 1, err
    finished = sum(r["status"] == "done" for r in json.loads((copy / "results.json").read_text())["runs"])
    assert err[0].startswith(f"arcvit bench: error: {copy}: results.json records {finished} finished run(s) whose "
                             "run folders are gone (animal_contours / arc / seed 0, animal_contours / arc / seed 1, "
                             f"animal_contours / arc / seed 2 and {finished - 3} more); ")
    assert err[0].endswith(f"a bench here would replace them: restore those folders, use another --out, or run "
                           f"`arcvit report {copy} --force` first to drop them")
    assert digests(copy) == before and not (copy / "data").exists()


def _runs(out: Path, tasks=("mnist5k", "animal_shapes"), methods=("linear", "arc")) -> None:
    from arcvit.bench import runner
    from arcvit.bench.report import run_dir
    from arcvit.training.recipes import train_config
    recipe = runner.suite_recipe(runner.CONFIG_DIR / "mini.toml", "mini")
    for task in tasks:
        for method in methods:
            write_run(run_dir(out, task, method, 0), task, train_config(recipe, task, method, {"seed": 0}), 0.5)


def test_report_refuses_to_drop_finished_runs_unless_forced(tmp_path, capsys):
    _runs(tmp_path)
    assert call(["report", tmp_path], capsys)[0] == 0
    assert "- runs: 4 finished" in (tmp_path / "report.md").read_text()
    shutil.rmtree(tmp_path / "runs" / "mnist5k" / "arc")
    (tmp_path / "runs" / "animal_shapes" / "linear" / "seed0" / "results.json").unlink()
    before = digests(tmp_path)
    code, out, err = call(["report", tmp_path], capsys)
    assert (code, out) == (1, "") and err == [
        f"arcvit report: error: {tmp_path}: results.json records 2 finished run(s) that the run folders no longer "
        "hold (animal_shapes / linear / seed 0, mnist5k / arc / seed 0); rebuilding would drop them: restore those "
        "folders, or pass --force to rebuild from the folders alone"]
    assert digests(tmp_path) == before
    assert call(["report", tmp_path, "--force"], capsys)[0] == 0
    assert "- runs: 2 finished, 0 failed, 1 outstanding" in (tmp_path / "report.md").read_text()
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 3
    _runs(tmp_path, tasks=("shapes_count",))  # more finished runs than before: no question
    assert call(["report", tmp_path], capsys)[0] == 0
    assert "- runs: 4 finished" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("content", ["[1, 2]", '{"runs": [{"task": "mnist5k"}]}', "{not json"],
                         ids=["a_list", "runs_without_fields", "not_json"])
def test_a_results_json_that_no_report_wrote_is_refused(content, tmp_path, capsys):
    _runs(tmp_path, tasks=("mnist5k",), methods=("linear",))
    (tmp_path / "results.json").write_text(content)
    before = digests(tmp_path)
    code, _, err = call(["report", tmp_path], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"arcvit report: error: {tmp_path / 'results.json'}: ")
    assert digests(tmp_path) == before
    assert call(["report", tmp_path, "--force"], capsys)[0] == 0


def test_a_results_json_without_its_table_is_refused_when_its_runs_are_gone(tmp_path, capsys):
    summary = json.loads((DOCS_BENCH / "tuned" / "results.json").read_text())
    del summary["table"]["rows"][0]["all_tasks"]
    (tmp_path / "results.json").write_text(json.dumps(summary))
    code, _, err = call(["report", tmp_path], capsys)
    assert code == 1 and err == [f"arcvit report: error: {tmp_path / 'results.json'}: cannot be rebuilt, its run "
                                 "folders are gone and it is not a complete report (KeyError: 'all_tasks')"], err
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
