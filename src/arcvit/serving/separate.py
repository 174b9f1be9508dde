"""One merged model per task, each image run through its own task's model: the naive way to serve many
tasks, kept as the baseline that MultiTask's shared backbone is measured against (benchmarks/serve.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

import arcvit
from arcvit.core.adapter_file import WEIGHTS_NAME, read_adapter
from arcvit.serving.base import TaskModel, check_finite, per_task
from arcvit.serving.tasks import TaskInfo


class SeparateModels(TaskModel):
    """Every task holds a full copy of the backbone with its adapter merged in (memory grows by a backbone)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self._models: dict[str, nn.Module] = {}

    def _prepare(self, name: str, directory: Path) -> tuple[TaskInfo, nn.Module]:
        contents = read_adapter(directory)
        check_finite(directory / WEIGHTS_NAME, contents.tensors | contents.head)
        meta = contents.meta
        model = copy.deepcopy(self.backbone)
        model.reset_classifier(meta["num_classes"])
        arcvit.load_adapter(model, directory, contents=contents)  # what was checked, not a second read
        return TaskInfo.from_meta(name, directory, meta, meta["num_classes"]), arcvit.merge(model).eval()

    def _install(self, name: str, state: nn.Module) -> None:
        self._models[name] = state

    def _uninstall(self, name: str) -> None:
        del self._models[name]

    def holdings(self) -> list[nn.Module]:
        """Every module whose tensors this model holds (for memory accounting)."""
        return [self.backbone, *self._models.values()]

    def _forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        return per_task(tasks, lambda name, index: self._models[name](images[index]))
