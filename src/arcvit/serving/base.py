"""The task registry both servable models share: named tasks on one backbone, one preprocessing, one lock.

Subclasses say how a task is prepared from its adapter folder (outside the lock: reading and checking files),
installed and removed (inside it), and how a mixed batch is run. A refused task changes nothing.

A request pins the tasks it asked for: a task removed while pinned stops being listed and accepting new
requests at once, and leaves the backbone when its last pinned request is answered, so that a ``task=all``
request racing a DELETE answers for every task that was loaded when it started.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from arcvit.core.merged_file import nonfinite_tensor
from arcvit.data.transforms import build_transform
from arcvit.errors import AdapterFileError, ArcvitError
from arcvit.serving.tasks import TaskInfo, UnknownTask, check_task_name, task_folder, task_folders


class TaskModel:
    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone.eval().requires_grad_(False)
        self.transform = build_transform(backbone, recipe="timm", train=False)
        self._tasks: dict[str, TaskInfo] = {}
        self.lock = threading.RLock()  # held while a batch runs or the tasks change
        self._pins: Counter[str] = Counter()  # task -> requests in flight that asked for it
        self._leaving: dict[str, TaskInfo] = {}  # removed while pinned: still installed until unpinned

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        """A snapshot of the loaded tasks, by name."""
        with self.lock:
            return dict(self._tasks)

    def add(self, name: str, adapter_dir: str | Path) -> TaskInfo:
        """Load (or reload) task ``name`` from ``adapter_dir``; a bad folder raises and changes nothing."""
        check_task_name(name)
        info, state = self._prepare(name, Path(adapter_dir))
        with self.lock:
            self._install(name, state)  # replaces a loaded task of that name once the new one is in place
            self._leaving.pop(name, None)
            self._tasks[name] = info
        return info

    def remove(self, name: str) -> None:
        """Unload ``name`` now for new requests; its adapter goes once no request in flight holds it."""
        with self.lock:
            if name not in self._tasks:
                raise UnknownTask(name)
            info = self._tasks.pop(name)
            if self._pins[name] > 0:
                self._leaving[name] = info
            else:
                self._uninstall(name)

    def served(self, name: str) -> TaskInfo | None:
        """The task a batch item of ``name`` runs with: loaded, or removed while a request holds it."""
        with self.lock:
            return self._tasks.get(name) or self._leaving.get(name)

    @contextlib.contextmanager
    def pinned(self, names: Sequence[str]) -> Iterator[None]:
        """Keep ``names`` servable until the block ends, even if they are removed meanwhile."""
        with self.lock:
            self._pins.update(names)
        try:
            yield
        finally:
            with self.lock:
                self._pins.subtract(names)
                for name in names:
                    if self._pins[name] <= 0:
                        del self._pins[name]
                        if self._leaving.pop(name, None) is not None:
                            self._uninstall(name)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """One logits vector per image; ``tasks[i]`` names image i's task (class counts may differ)."""
        if len(tasks) != len(images):
            raise ValueError(f"{len(images)} images but {len(tasks)} task names")
        with self.lock:
            for name in tasks:
                if self.served(name) is None:
                    raise UnknownTask(name)
            return self._forward(images, list(tasks))

    def _prepare(self, name: str, directory: Path) -> tuple[TaskInfo, Any]:
        raise NotImplementedError

    def _install(self, name: str, state: Any) -> None:
        raise NotImplementedError

    def _uninstall(self, name: str) -> None:
        raise NotImplementedError

    def _forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError


def per_task(tasks: list[str], run: Callable[[str, list[int]], torch.Tensor]) -> list[torch.Tensor]:
    """One output per item: ``run(name, index)`` computes the rows of the items ``index`` of task ``name``."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(tasks)
    for name in dict.fromkeys(tasks):
        index = [i for i, t in enumerate(tasks) if t == name]
        for i, row in zip(index, run(name, index)):
            out[i] = row
    return out


def check_finite(weights: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a task whose adapter or head holds NaN or inf: every image of its batches would score NaN."""
    key = nonfinite_tensor(tensors)
    if key is not None:
        raise AdapterFileError(f"{weights}: tensor {key} holds non-finite values (NaN or inf)")


def load_tasks(model: TaskModel, root: Path) -> list[str]:
    """Add every task folder under ``root``; a folder that fails is reported and skipped. Returns the errors."""
    errors = []
    for name in task_folders(root):
        try:
            model.add(name, task_folder(root, name))
        except ArcvitError as e:
            errors.append(f"task {name!r} not loaded: {e}")
    return errors
