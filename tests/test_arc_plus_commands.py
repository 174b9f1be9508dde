"""ARC+ through the real commands: trained by `arcvit train`, merged by `arcvit merge --run`, exported merged and
beside plain ARC in one many-task ONNX graph, and routed by the server's MultiTask in a mixed batch.

Every comparison is made here against the adapted PyTorch model the files came from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_TASK
from safetensors.torch import load_file
from serving_support import BACKBONE

import arcvit
from arcvit.cli import main
from arcvit.core.adapter_file import read_adapter_config
from arcvit.core.config import ARCConfig
from arcvit.methods import prepare_model
from arcvit.methods.registry import ARC_PLUS

TASKS = {"plus": (6, "arc_plus", 5), "plain": (4, "arc", 4)}


def _pico(num_classes: int) -> torch.nn.Module:
    return timm.create_model(BACKBONE, pretrained=True, num_classes=num_classes).eval()


def _adapted(classes: int, method: str, rank: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = prepare_model(_pico(classes), method, rank=rank, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (classes, method, rank)) in enumerate(TASKS.items()):
        model = _adapted(classes, method, rank, seed)
        arcvit.save_adapter(model, root / name, extra={"class_names": [f"{name}-{i}" for i in range(classes)]})
    return root


def _loaded(adapters: Path, name: str) -> torch.nn.Module:
    return arcvit.load_adapter(_pico(TASKS[name][0]), adapters / name).eval()


def test_the_arc_plus_file_names_its_extensions(adapters):
    meta = read_adapter_config(adapters / "plus")
    config = ARCConfig.from_dict(meta["arc_config"])
    assert meta["format_version"] == 3 and config.extended and config.label == "ARC+"
    assert tuple(config.extra_positions) == tuple(ARC_PLUS["extra_positions"]) and config.channel_scale


def test_many_task_export_routes_arc_plus_beside_arc_like_the_server(adapters, tmp_path):
    pytest.importorskip("onnxruntime")
    from arcvit.export.session import OnnxModel
    from arcvit.serving import MultiTask
    out = tmp_path / "many.onnx"
    assert main(["export", "--adapters", str(adapters), "--backbone", BACKBONE, "--out", str(out)]) == 0
    onnx = OnnxModel(out)
    names = [t["name"] for t in onnx.tasks]
    multi = MultiTask(_pico(0))
    for name in names:
        multi.add(name, adapters / name)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    ids = [0, 1, 1, 0, 1]
    rows = multi.predict(images, [names[i] for i in ids])
    logits = onnx.logits(images, ids)
    for image, row, out_row, i in zip(images, rows, logits, ids):
        classes = TASKS[names[i]][0]
        with torch.no_grad():
            own = _loaded(adapters, names[i])(image[None])[0]
        torch.testing.assert_close(row, own, rtol=1e-4, atol=1e-4)  # the server's mixed batch: each its own model
        torch.testing.assert_close(out_row[:classes], own, rtol=1e-3, atol=1e-3)  # the graph, ONNX Runtime
        assert torch.isinf(out_row[classes:]).all()


def test_merge_of_an_arc_plus_run_is_the_plain_backbone_with_the_same_outputs(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert main(["train", "--backbone", BACKBONE, "--data", str(tiny_data), "--task", TINY_TASK, "--method",
                 "arc_plus", "--rank", "4", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32",
                 "--out", str(run)]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--run", str(run), "--out", str(merged)]) == 0
    classes = json.loads((run / "settings.json").read_text())["num_classes"]
    assert ARCConfig.from_dict(read_adapter_config(run / "adapter")["arc_config"]).label == "ARC+"
    adapted = arcvit.load_adapter(_pico(classes), run / "adapter").eval()
    plain = _pico(classes)
    weights = load_file(merged)
    assert set(weights) == set(plain.state_dict())
    plain.load_state_dict(weights)
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain(images), adapted(images), rtol=1e-5, atol=1e-5)
