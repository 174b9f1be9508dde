"""`arcvit merge --run`: a finished run of any mergeable method becomes a merged checkpoint that `eval --merged`
scores as the run scored itself, and that a plain timm model loads strictly; bad run folders get one line.

Runs are tiny (pico backbone, random init seeded by the run, 1 epoch of 2 steps) and train in-process once per
module; the CLI is called in-process through ``cli.main`` (the same code as the command, without a start-up
per call)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
from conftest import BACKBONE, TINY_TASK
from safetensors.torch import load_file

from arcvit.cli import main
from arcvit.training.config import DataSpec, TrainConfig
from arcvit.training.loop import train

METHODS = ("ssf", "repadapter", "fact_tt", "fact_tk", "rlrr", "dora", "lora", "arc", "arc_att", "vera", "bitfit",
           "linear", "full")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory, one_thread) -> dict[str, Path]:
    """One finished run folder per method (and adaptformer, which does not merge)."""
    root = tmp_path_factory.mktemp("merge_runs")
    folders = {}
    for method in (*METHODS, "adaptformer"):
        cfg = TrainConfig(method=method, epochs=1, warmup_epochs=0, batch_size=16, accelerator="cpu", lr=3e-2)
        train(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), cfg, root / method, pretrained=False, progress=False,
              max_steps_per_epoch=2)
        folders[method] = root / method
    return folders


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("method", METHODS)
def test_merged_run_scores_as_the_run(method, runs, tiny_data, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, stdout, err = _cli(capsys, "merge", "--run", runs[method], "--out", out)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["max_abs_logit_diff"] < 1e-4 and report["num_classes"] == 6
    assert report["class_names"] and len(report["class_names"]) == 6  # the run's own names, as ARC's adapter
    code, stdout, err = _cli(capsys, "eval", "--merged", out, "--data", tiny_data, "--task", TINY_TASK,
                             "--accelerator", "cpu")
    assert code == 0, err
    results = json.loads((runs[method] / "results.json").read_text())
    assert json.loads(stdout)["top1"] == results["test_top1"]
    plain = timm.create_model(BACKBONE, pretrained=False, num_classes=6)
    plain.load_state_dict(load_file(out), strict=True)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_runs_one_line_each(runs, tiny_data, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code, _, err = _cli(capsys, "merge", "--run", tiny_data, "--out", out)
    assert code == 1 and "not a run folder (no settings.json)" in _one_line(err)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["ssf"], unfinished)
    (unfinished / "results.json").unlink()
    code, _, err = _cli(capsys, "merge", "--run", unfinished, "--out", out)
    assert code == 1 and "the run has not finished (no results.json)" in _one_line(err)

    code, _, err = _cli(capsys, "merge", "--run", runs["adaptformer"], "--out", out)
    assert code == 1 and "method adaptformer is not mergeable" in _one_line(err)
    assert not out.exists()

    out.write_bytes(b"keep")
    code, _, err = _cli(capsys, "merge", "--run", runs["ssf"], "--out", out)
    assert code == 1 and "exists; pass --force" in _one_line(err)
    own = runs["ssf"] / "trainable.safetensors"
    before = own.read_bytes()
    code, _, err = _cli(capsys, "merge", "--run", runs["ssf"], "--force", "--out", own)
    assert code == 1 and "is a file merge reads (in --run" in _one_line(err)
    assert own.read_bytes() == before and out.read_bytes() == b"keep"

    code, _, err = _cli(capsys, "merge", "--run", runs["ssf"], "--backbone", "vit_tiny_patch16_224", "--out",
                        tmp_path / "n.safetensors")
    assert code == 1 and "drop --backbone" in _one_line(err)
    code, _, err = _cli(capsys, "merge", "--run", runs["ssf"], "--inplace", "--out", tmp_path / "n.safetensors")
    assert code == 1 and "--inplace: only with --adapter" in _one_line(err)
    pretrained = tmp_path / "pretrained"
    shutil.copytree(runs["ssf"], pretrained)
    settings = json.loads((pretrained / "settings.json").read_text())
    (pretrained / "settings.json").write_text(json.dumps(settings | {"pretrained": True}))
    code, _, err = _cli(capsys, "merge", "--run", pretrained, "--random-init", "--out", tmp_path / "n.safetensors")
    assert code == 1 and "was trained from pretrained weights; drop --random-init" in _one_line(err)
    with pytest.raises(SystemExit, match="^2$") as stop:
        main(["merge", "--run", str(runs["ssf"]), "--adapter", str(runs["arc"] / "adapter"), "--out", str(out)])
    assert stop.value.code == 2 and "not allowed with argument --run" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "n.safetensors").exists()


def test_run_from_a_checkpoint_finds_it_or_is_told_where(tiny_data, tmp_path, capsys, one_thread):
    """A run trained from a --checkpoint file merges from that file (its SHA-256 checked), or from --checkpoint
    if it moved; another file in its place is refused."""
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(1)
    weights = tmp_path / "pico.safetensors"
    save_file(timm.create_model(BACKBONE, pretrained=False, num_classes=10).state_dict(), weights)
    cfg = TrainConfig(method="rlrr", epochs=1, warmup_epochs=0, batch_size=16, accelerator="cpu")
    results = train(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), cfg, tmp_path / "run", checkpoint=weights,
                    pretrained=False, progress=False, max_steps_per_epoch=2)
    code, _, err = _cli(capsys, "merge", "--run", tmp_path / "run", "--force", "--out", weights)
    assert code == 1 and "is a file merge reads" in _one_line(err)  # the recorded checkpoint, not named here
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    code, _, err = _cli(capsys, "merge", "--run", tmp_path / "run", "--out", tmp_path / "a.safetensors")
    assert code == 1 and "the run's backbone checkpoint is not there; pass --checkpoint" in _one_line(err)
    code, _, err = _cli(capsys, "merge", "--run", tmp_path / "run", "--checkpoint", moved, "--out",
                        tmp_path / "a.safetensors")
    assert code == 0, err
    code, stdout, err = _cli(capsys, "eval", "--merged", tmp_path / "a.safetensors", "--data", tiny_data, "--task",
                             TINY_TASK, "--accelerator", "cpu")
    assert code == 0 and json.loads(stdout)["top1"] == results["test_top1"], err
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model(BACKBONE, pretrained=False, num_classes=10).state_dict(), other)
    code, _, err = _cli(capsys, "merge", "--run", tmp_path / "run", "--checkpoint", other, "--out",
                        tmp_path / "b.safetensors")
    assert code == 1 and "SHA-256 differs from settings.json's checkpoint_sha256" in _one_line(err)
