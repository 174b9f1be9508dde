"""An exported file opened for inference with ONNX Runtime: its metadata read back and checked, its
preprocessing rebuilt, and logits for a batch (each image's task given by index for a many-task file)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from arcvit.data.transforms import build_transform
from arcvit.errors import ConfigError, ModelError, first_line
from arcvit.export import metadata
from arcvit.export.check import run
from arcvit.export.runtime import inference_session, need, onnxruntime


def _open(path: Path, threads: int):
    if not path.is_file():
        raise ConfigError(f"{path}: no such ONNX file")
    ort = onnxruntime()
    try:
        return inference_session(str(path), threads)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(e, 200)})") from None


class OnnxModel:
    """An arcvit ONNX file: ``tasks`` (its metadata's task entries), ``transform``, ``logits``."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        self.session = _open(self.path, threads)
        custom = self.session.get_modelmeta().custom_metadata_map
        self.document = metadata.parse(str(self.path), custom)
        metadata.verify(str(self.path), custom, need("onnx")[0].load(str(self.path)))
        metadata.check_graph(str(self.path), self.session, self.document)
        self.many = self.document["kind"] == "many-task"
        self.tasks: list[dict[str, Any]] = self.document["tasks"]
        self.transform: Callable = build_transform(self.document["preprocessing"], recipe="timm", train=False)

    def logits(self, images: torch.Tensor, task_ids: list[int] | None = None) -> torch.Tensor:
        """(B, C_max) logits; a many-task file's rows are -inf past their task's class count."""
        inputs = {"pixel_values": images.float().contiguous()}
        if self.many:
            ids = list(task_ids) if task_ids is not None else [0] * len(images)
            bad = [i for i in ids if not 0 <= i < len(self.tasks)]
            if bad:  # a negative index would wrap around to another task's adapter in the graph's Gather
                raise ConfigError(f"{self.path}: task index {bad[0]} is outside 0..{len(self.tasks) - 1} "
                                  f"(the file holds {len(self.tasks)} tasks)")
            inputs["task_ids"] = torch.tensor(ids, dtype=torch.int64)
        return run(self.session, inputs)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``arcvit`` metadata document of an exported file (checked as ``predict --onnx`` reads it)."""
    return OnnxModel(path, threads=1).document
