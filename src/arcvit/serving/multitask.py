"""MultiTask: one frozen backbone shared by every task; a mixed-task batch runs in ONE backbone pass.

Each task is a named ARC adapter placed on the shared backbone (the core's named adapters) plus its own
classifier head, kept here: the backbone has no head (num_classes=0), its pooled features go to each image's
own task's head. Inside ``routed()`` every adapter site applies, to each image, its own task's adapter. A task
costs only its adapter's and head's bytes. Optionally one task (the one with most traffic) also gets a merged
copy of the backbone, so that its images run at exactly the plain model's cost.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
import torch.nn as nn

from arcvit.core.adapter_file import WEIGHTS_NAME, AdapterContents, load_adapter, read_adapter
from arcvit.core.arc import backbone_fingerprint, delete_adapter, merge, routed, set_active_adapter
from arcvit.errors import AdapterFileError
from arcvit.serving.base import TaskModel, check_finite
from arcvit.serving.tasks import TaskInfo, UnknownTask


def _head(directory: Path, tensors: dict[str, torch.Tensor], width: int) -> nn.Linear:
    """The saved classifier as a Linear on the backbone's pooled features."""
    weights = [t for t in tensors.values() if t.ndim == 2]
    biases = [t for t in tensors.values() if t.ndim == 1]
    if len(weights) != 1 or len(biases) > 1 or weights[0].shape[1] != width:
        raise AdapterFileError(f"{directory}: the saved head ({', '.join(tensors) or 'none'}) is not one Linear "
                               f"on {width} features")
    head = nn.Linear(width, weights[0].shape[0], bias=bool(biases))
    with torch.no_grad():
        head.weight.copy_(weights[0])
        if biases:
            head.bias.copy_(biases[0])
    return head.eval().requires_grad_(False)


class MultiTask(TaskModel):
    """Named tasks on one frozen timm backbone (created with ``num_classes=0``); ``predict`` mixes them freely."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self._fingerprint = backbone_fingerprint(backbone)  # frozen: computed once, not once per task
        self._adapters: dict[str, str] = {}  # task -> adapter name on the backbone (a fresh one per load)
        self._heads: dict[str, nn.Linear] = {}
        self._serial = itertools.count()
        self._merged: tuple[str, nn.Module] | None = None

    def _prepare(self, name: str, directory: Path) -> tuple[TaskInfo, tuple[Path, AdapterContents, nn.Linear]]:
        contents = read_adapter(directory)  # format, checksum and config checked
        check_finite(directory / WEIGHTS_NAME, contents.tensors | contents.head)
        saved = contents.meta["backbone"]["fingerprint"]
        if saved != self._fingerprint:
            raise AdapterFileError(f"{directory}: the backbone weights differ from those the adapter was trained "
                                   f"on (fingerprint {self._fingerprint[:12]} vs {saved[:12]})")
        head = _head(directory, contents.head, self.width)
        return TaskInfo.from_meta(name, directory, contents.meta, head.out_features), (directory, contents, head)

    def _install(self, name: str, state: tuple[Path, AdapterContents, nn.Linear]) -> None:
        directory, contents, head = state  # the contents checked by _prepare: the files are not read again
        # A fresh adapter name per load (task names may hold '.', adapter names may not): a reload places the
        # new adapter beside the old one, and the old one goes only once the new one is in.
        adapter = f"task{next(self._serial)}"
        load_adapter(self.backbone, directory, name=adapter, check_backbone=False, load_head=False,
                     contents=contents)
        self.backbone.eval().requires_grad_(False)
        if name in self._adapters:
            delete_adapter(self.backbone, self._adapters[name])
        self._adapters[name], self._heads[name] = adapter, head
        if self._merged is not None and self._merged[0] == name:
            self._merged = (name, self._merged_copy(name))

    def _uninstall(self, name: str) -> None:
        delete_adapter(self.backbone, self._adapters.pop(name))
        del self._heads[name]
        if self._merged is not None and self._merged[0] == name:
            self._merged = None

    def set_merged(self, name: str | None) -> None:
        """Run ``name``'s images through a merged copy of the backbone (one backbone's bytes more); None: off."""
        with self.lock:
            if name is not None and name not in self._tasks:
                raise UnknownTask(name)
            self._merged = None if name is None else (name, self._merged_copy(name))

    def _merged_copy(self, name: str) -> nn.Module:
        model = copy.deepcopy(self.backbone)
        set_active_adapter(model, self._adapters[name])
        return merge(model, inplace=True).eval().requires_grad_(False)

    def holdings(self) -> list[nn.Module]:
        """Every module whose tensors this model holds (for memory accounting)."""
        return [self.backbone, *self._heads.values(), *([self._merged[1]] if self._merged else [])]

    def _forward(self, images: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        merged = self._merged[0] if self._merged else None
        fast = [i for i, t in enumerate(tasks) if t == merged]
        shared = [i for i, t in enumerate(tasks) if t != merged]
        pooled = torch.empty(len(tasks), self.width, dtype=images.dtype, device=images.device)
        if fast:
            model = self._merged[1]
            pooled[fast] = model.forward_head(model.forward_features(images[fast]), pre_logits=True)
        if shared:
            part = images if not fast else images[shared]
            with routed(self.backbone, [self._adapters[tasks[i]] for i in shared]):
                features = self.backbone.forward_features(part)
            pooled[shared] = self.backbone.forward_head(features, pre_logits=True)
        return self._classify(pooled, tasks)

    def _classify(self, pooled: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        """Every image's logits from its own task's head, in one matmul: the heads of the batch's tasks side by
        side, each image keeping its task's columns (at most one head per image, so the waste stays small)."""
        names = list(dict.fromkeys(tasks))
        heads = [self._heads[name] for name in names]
        weight = torch.cat([h.weight for h in heads])
        bias = torch.cat([h.bias if h.bias is not None else h.weight.new_zeros(h.out_features) for h in heads])
        ends = list(itertools.accumulate(h.out_features for h in heads))
        columns = {name: (end - h.out_features, end) for name, h, end in zip(names, heads, ends)}
        logits = torch.addmm(bias, pooled, weight.t())
        whole = (0, ends[-1])
        return [row if columns[name] == whole else row[slice(*columns[name])] for row, name in zip(logits, tasks)]
