"""The torch modules that are traced into ONNX: one task (a merged model), or many tasks on one backbone.

``ManyTasks`` is the same math as ``arcvit.serving.MultiTask``: every adapter site applies each image's own
task's D, c and b (the core's ``routed`` with the ``task_ids`` input, two batched matmuls per site), and each
image's pooled features meet its own task's head. The heads are stacked and zero-padded to the largest class count;
the logits past a task's classes are set to -inf (a mask from the class counts, so that no weight of the file is
infinite: int8 quantisation scales a tensor by its range) and never win an argmax.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from arcvit.core.adapter_file import load_adapter, read_adapter_config
from arcvit.core.arc import classifier, routed
from arcvit.core.config import ARCConfig
from arcvit.errors import ModelError


class SingleTask(nn.Module):
    """A plain (merged) classifier whose input is named ``pixel_values``: ``logits`` (B, classes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


class ManyTasks(nn.Module):
    """Named adapters on one backbone and their heads: ``logits`` (B, C_max) for ``task_ids`` (B,) int64."""

    def __init__(self, backbone: nn.Module, adapters: list[str], heads: list[nn.Linear]) -> None:
        super().__init__()
        self.backbone, self.adapters = backbone, adapters
        width, most = heads[0].in_features, max(h.out_features for h in heads)
        weight, bias = torch.zeros(len(heads), most, width), torch.zeros(len(heads), most)
        for i, head in enumerate(heads):
            weight[i, :head.out_features] = head.weight.detach()
            if head.bias is not None:
                bias[i, :head.out_features] = head.bias.detach()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("counts", torch.tensor([h.out_features for h in heads]))
        self.register_buffer("columns", torch.arange(most))

    def forward(self, pixel_values: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        with routed(self.backbone, self.adapters, task_ids):
            features = self.backbone.forward_features(pixel_values)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        logits = torch.bmm(self.weight.index_select(0, task_ids), pooled.unsqueeze(-1)).squeeze(-1)
        logits = logits + self.bias.index_select(0, task_ids)
        past = self.columns >= self.counts.index_select(0, task_ids).unsqueeze(-1)
        return logits.masked_fill(past, float("-inf"))


def task_entry(name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What the file records of one task, from an adapter's config or a merged checkpoint's info: its classes
    (names as recorded, else "0", "1", ...), method and rank (None once merged), the task it was trained on."""
    classes = int(meta["num_classes"])
    extra = meta.get("extra") or {}
    names = extra.get("class_names") or meta.get("class_names") or [str(i) for i in range(classes)]
    config = meta.get("arc_config")
    method = None if config is None else ARCConfig.from_dict(config).label
    return {"name": name, "num_classes": classes, "class_names": [str(n) for n in names], "method": method,
            "rank": None if config is None else int(config["rank"]), "trained_on": extra.get("task") or meta.get("task"),
            "adapter_sha256": meta.get("weights_sha256")}


def many_tasks(backbone: nn.Module, folders: dict[str, Path]) -> tuple[ManyTasks, list[dict[str, Any]]]:
    """Every task folder's adapter placed on ``backbone`` under its own name, and its head taken from the file
    (the adapter file's own checks: format, checksum, backbone identity and fingerprint, shapes)."""
    if not folders:
        raise ModelError("no task to export: the --adapters folder holds no adapter folder")
    backbone.eval().requires_grad_(False)
    heads, entries = [], []
    for i, (name, folder) in enumerate(folders.items()):
        meta = read_adapter_config(folder)
        backbone.reset_classifier(meta["num_classes"])
        load_adapter(backbone, folder, name=f"task{i}")
        head = classifier(backbone)
        if not isinstance(head, nn.Linear):
            raise ModelError(f"{folder}: the model's head ({type(head).__name__}) is not one Linear")
        heads.append(head)
        entries.append(task_entry(name, meta))
    backbone.reset_classifier(0)
    backbone.eval().requires_grad_(False)
    graph = ManyTasks(backbone, [f"task{i}" for i in range(len(folders))], heads).eval()
    return graph, entries
