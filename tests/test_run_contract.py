"""One run contract for every method: a finished run of any mergeable method is used as it is by `predict --run`,
`eval --run`, `export --run` and `serve --run` (built from its settings.json, its trained state loaded by the
method's own ``MethodSpec.state``, merged), and answers as the unmerged trained model does.

Runs are tiny (the shipped pico ViT, 1 epoch of 2 steps on shapes_tiny) and train in-process, once per method,
on first use; the CLI is called in-process through ``cli.main`` except for `serve`, which runs as a process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASK
from PIL import Image

from arcvit.cli import main
from arcvit.data.transforms import build_transform
from arcvit.methods import SPECS, run_state_files
from arcvit.training.config import DataSpec, TrainConfig
from arcvit.training.loop import train
from arcvit.training.runmodel import load_run

SHIPPED = "vit_pico_patch7_28.fmnist_arcvit"
MERGEABLE = tuple(name for name, spec in SPECS.items() if spec.mergeable)
PEER = "ssf"  # the method that export and serve are checked with


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory, one_thread):
    """``runs(method)``: the folder of a finished run of ``method``, trained on first use."""
    root, done = tmp_path_factory.mktemp("contract_runs"), {}

    def run(method: str) -> Path:
        if method not in done:
            cfg = TrainConfig(method=method, epochs=1, warmup_epochs=0, batch_size=16, accelerator="cpu", lr=3e-2)
            train(SHIPPED, DataSpec(str(tiny_data), TINY_TASK), cfg, root / method, progress=False,
                  max_steps_per_epoch=2)
            done[method] = root / method
        return done[method]
    return run


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _test_images(data: Path, count: int) -> list[Path]:
    task = data / TINY_TASK
    lines = (task / "test.txt").read_text().splitlines()[:count]
    return [task / line.rsplit(maxsplit=1)[0] for line in lines]


def _unmerged_probs(run: Path, images: list[Path]) -> torch.Tensor:
    """What the trained model itself (adapters, hooks or PEFT wrappers in place, not merged) answers."""
    model, _, _ = load_run(run)
    transform = build_transform(model, recipe="timm", train=False)
    with torch.no_grad():
        return model(torch.stack([transform(Image.open(p).convert("RGB")) for p in images])).softmax(-1)


@pytest.mark.parametrize("method", MERGEABLE)
def test_predict_and_eval_take_a_run_of_every_mergeable_method(method, runs, tiny_data, capsys):
    run = runs(method)
    kept = [p.name for p in run.iterdir() if p.name in run_state_files()]
    assert kept == list(SPECS[method].state.files)  # one format per method: adapter/ (ARC family) or the tensors
    images = _test_images(tiny_data, 3)
    code, out, err = _cli(capsys, "predict", "--run", run, "--accelerator", "cpu", *images)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    expected = _unmerged_probs(run, images)
    classes = (tiny_data / TINY_TASK / "classes.txt").read_text().splitlines()
    for row, probs in zip(rows, expected, strict=True):
        assert row["label"] == int(probs.argmax()) and row["class"] == classes[row["label"]]
        assert row["prob"] == pytest.approx(probs.max().item(), abs=1e-4)
    code, out, err = _cli(capsys, "eval", "--run", run, "--data", tiny_data, "--task", TINY_TASK,
                          "--accelerator", "cpu")
    assert code == 0, err
    assert json.loads(out)["top1"] == json.loads((run / "results.json").read_text())["test_top1"]


def test_a_run_that_does_not_merge_or_a_flag_that_contradicts_it_is_one_line(runs, tiny_data, tmp_path, capsys):
    image = _test_images(tiny_data, 1)[0]
    for command in (["predict", "--run", runs("adaptformer"), image],
                    ["eval", "--run", runs("adaptformer"), "--data", tiny_data, "--task", TINY_TASK],
                    ["export", "--run", runs("adaptformer"), "--out", tmp_path / "a.onnx"]):
        code, _, err = _cli(capsys, *command)
        assert code == 1 and err.count("\n") == 1, err
        assert "method adaptformer is not mergeable" in err and "--run takes a run of a mergeable method" in err
    code, _, err = _cli(capsys, "predict", "--run", runs(PEER), "--merge", image)
    assert code == 1 and "--merge: a --run is always merged before it runs" in err
    code, _, err = _cli(capsys, "predict", "--run", runs(PEER), "--backbone", "vit_tiny_patch16_224", image)
    assert code == 1 and "was trained on vit_pico_patch7_28.fmnist_arcvit; drop --backbone" in err
    assert not (tmp_path / "a.onnx").exists()


def test_export_takes_a_peer_run_and_the_file_answers_as_the_run(runs, tiny_data, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run, out = runs(PEER), tmp_path / "ssf.onnx"
    code, stdout, err = _cli(capsys, "export", "--run", run, "--out", out, "--data", tiny_data, "--task", TINY_TASK)
    assert code == 0, err
    assert json.loads(stdout)["tasks"] == [TINY_TASK]
    code, _, err = _cli(capsys, "export", "--run", run, "--force", "--out", run / "trainable.safetensors")
    assert code == 1 and "is a file export reads" in err
    images = _test_images(tiny_data, 3)
    code, stdout, err = _cli(capsys, "predict", "--onnx", out, *images)
    assert code == 0, err
    for row, probs in zip(map(json.loads, stdout.splitlines()), _unmerged_probs(run, images), strict=True):
        assert row["label"] == int(probs.argmax()) and row["prob"] == pytest.approx(probs.max().item(), abs=1e-3)


def test_serve_takes_a_peer_run_as_its_one_fixed_task(runs, tiny_data, tmp_path):
    pytest.importorskip("fastapi")
    from serving_support import start_server
    run = runs(PEER)
    server = start_server(None, tmp_path / "serve.log", "--run", str(run))
    try:
        status, body = server.request("GET", "/v1/tasks")
        assert status == 200 and [(t["name"], t["method"], t["num_classes"]) for t in body["tasks"]] == \
            [(TINY_TASK, PEER, 6)]
        image = _test_images(tiny_data, 1)[0]
        status, body = server.predict(image.read_bytes(), task=TINY_TASK)
        assert status == 200, body
        probs = _unmerged_probs(run, [image])[0]
        top = body["results"][0]["top"][0]
        assert top["label"] == int(probs.argmax()) and top["prob"] == pytest.approx(probs.max().item(), abs=1e-4)
        status, body = server.request("DELETE", f"/v1/tasks/{TINY_TASK}")
        assert status == 409 and "its task is fixed" in body["error"]
    finally:
        server.stop()
