"""One plain model served as one fixed task (``arcvit serve --run``): a finished run of any mergeable method,
merged into the backbone, so its images run at exactly the plain model's cost. Its task is fixed: loading or
unloading one answers 409, as for an ONNX file."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from arcvit.serving.base import TaskModel
from arcvit.serving.onnx_model import FixedTasks
from arcvit.serving.tasks import TaskInfo


class PlainTask(TaskModel):
    """``model`` (a plain timm model with its head) as the one task ``info`` describes."""

    def __init__(self, model: nn.Module, info: TaskInfo) -> None:
        super().__init__(model)
        self.fixed = f"this server runs the run {info.directory}: its task is fixed (serve an adapter folder to " \
                     "load tasks)"
        self._tasks[info.name] = info

    def add(self, name: str, adapter_dir: str | Path) -> TaskInfo:
        raise FixedTasks(self.fixed)

    def remove(self, name: str) -> None:
        raise FixedTasks(self.fixed)

    def holdings(self) -> list[nn.Module]:
        """Every module whose tensors this model holds (for memory accounting)."""
        return [self.backbone]

    def _forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        return list(self.backbone(images))
