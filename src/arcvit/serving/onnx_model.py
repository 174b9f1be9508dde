"""An ONNX file written by `arcvit export`, served behind the same API as MultiTask (``arcvit serve --onnx``).

Its tasks come from the file's metadata and are fixed: loading or unloading one answers 409. A mixed-task batch
is one ONNX Runtime call (a many-task file's ``task_ids`` input says each image's task).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from arcvit.errors import ConfigError, ModelError
from arcvit.export.session import OnnxModel
from arcvit.serving.base import TaskModel
from arcvit.serving.tasks import TaskInfo, check_task_name


class FixedTasks(ConfigError):
    """A request to load or unload a task of a model whose tasks are fixed."""

    status = 409


class OnnxTasks(TaskModel):
    """The tasks of one exported file; ``predict`` runs the file with ONNX Runtime."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.onnx = OnnxModel(path, threads)
        # The torch side holds no weights: a stand-in module carries the file's preprocessing as timm's
        # ``pretrained_cfg``, from which the base class builds the same eval transform as for a timm backbone.
        stand_in = nn.Identity()
        stand_in.pretrained_cfg = self.onnx.document["preprocessing"]
        super().__init__(stand_in)
        self.fixed = f"this server runs the ONNX file {self.onnx.path.name}: its tasks are fixed (export a new file)"
        self._index: dict[str, int] = {}
        backbone = str(self.onnx.document.get("backbone", {}).get("name", ""))
        for index, entry in enumerate(self.onnx.tasks):
            try:
                name = check_task_name(str(entry.get("name")))
            except ConfigError as e:
                raise ModelError(f"{self.onnx.path}: its metadata names a task that cannot be served ({e})") from None
            self._index[name] = index
            self._tasks[name] = TaskInfo(name, entry["num_classes"], tuple(entry["class_names"]),
                                         entry.get("method") or "merged", int(entry.get("rank") or 0), backbone,
                                         self.onnx.path)

    def add(self, name: str, adapter_dir: str | Path) -> TaskInfo:
        raise FixedTasks(self.fixed)

    def remove(self, name: str) -> None:
        raise FixedTasks(self.fixed)

    def holdings(self) -> list[nn.Module]:
        """No torch tensors: the weights live in the ONNX Runtime session."""
        return []

    def _forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        logits = self.onnx.logits(images, [self._index[t] for t in tasks])
        return [row[:self._tasks[t].num_classes] for row, t in zip(logits, tasks)]
