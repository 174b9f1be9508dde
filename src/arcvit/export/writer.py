"""Export, check, then write: a graph becomes a file only once ONNX Runtime has matched PyTorch on it.

A failed export or check raises and writes nothing; the file (and its int8 sibling) are written atomically.
The whole model is serialized in one protobuf, so a model must stay under its 2 GiB limit (ViT-L is 1.2 GB).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from arcvit.core.merged_file import nonfinite_tensor
from arcvit.errors import ConfigError, ModelError, first_line
from arcvit.export import metadata
from arcvit.export.check import check, describe_failure
from arcvit.export.quantize import Batches, int8_path, quantize_file, top1_change
from arcvit.export.runtime import EXPORT_MODULES, OPSETS, inference_session, need
from arcvit.fileio import atomic_path

MAX_BYTES = 2 * 2**30  # protobuf's limit for one serialized model


@dataclass
class Job:
    """A graph to export, its metadata document, and the batches its check runs (batch 1 and a larger one;
    the larger one is also the example the exporter traces, so that the batch size stays symbolic)."""

    graph: nn.Module
    document: dict[str, Any]
    batches: list[dict[str, torch.Tensor]]
    images: str  # where the check's images came from
    opset: int = OPSETS[0]


@dataclass
class Evaluation:
    """The evaluation split int8 is measured on: each task's batches of (inputs, labels)."""

    split: str
    tasks: dict[str, Batches]


def trace(graph: nn.Module, example: dict[str, torch.Tensor], opset: int = OPSETS[0]):
    """The graph as an onnx ModelProto of ONNX ``opset``, dynamic in the batch dimension of every input."""
    size = sum(t.numel() * t.element_size() for t in [*graph.parameters(), *graph.buffers()])
    if size >= MAX_BYTES:
        raise ModelError(f"{size / 2**30:.1f} GiB of weights: an ONNX file holds at most 2 GiB without external "
                         "data, which arcvit export does not write")
    batch = torch.export.Dim("batch")
    # The exporter reports its steps on stdout and warns about its own internals: neither is the user's concern.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph, tuple(example.values()), None, input_names=list(example),
                                        output_names=["logits"], dynamic_shapes={k: {0: batch} for k in example},
                                        dynamo=True, opset_version=opset, verbose=False)
        except Exception as e:  # the exporter fails in many ways; each is one line naming what it could not do
            detail = first_line(e, 300)
            raise ModelError(f"torch.onnx could not export this model ({type(e).__name__}: {detail})") from None
    return program.model_proto


def export_onnx(job: Job, out: Path, evaluation: Evaluation | None = None) -> dict[str, Any]:
    """Write ``job`` to ``out`` once it passes its check (and ``out``'s int8 sibling when ``evaluation`` is
    given); returns what was written, with the check's and the quantisation's figures."""
    onnx = need(*EXPORT_MODULES)[0]
    bad = nonfinite_tensor(job.graph.state_dict())
    if bad:  # as merge refuses them: every logit would be NaN, and the check would compare NaN with NaN
        raise ModelError(f"{out}: not written: tensor {bad} holds non-finite values (NaN or inf); the adapter "
                         "or head it came from is broken")
    proto = trace(job.graph, job.batches[-1], job.opset)
    metadata.stamp(proto, job.document)
    report = check(job.graph, inference_session(proto.SerializeToString()), job.batches, job.images)
    if not report["passed"]:
        raise ModelError(f"{out}: not written: {describe_failure(report)}")
    metadata.stamp(proto, {**job.document, "check": report})
    summary: dict[str, Any] = {"out": str(out), "check": report}
    try:
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
            if evaluation is not None:
                summary["int8"] = _quantized(onnx, tmp, out, job.document, evaluation)
        summary["bytes"] = out.stat().st_size
    except OSError as e:
        raise ConfigError(f"{out}: cannot write it ({e.strerror or e})") from None
    return summary


def _quantized(onnx, fp32: Path, out: Path, document: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
    """int8 from ``fp32`` (the file about to become ``out``), measured against it on the evaluation split,
    written beside ``out``."""
    target = int8_path(out)
    with atomic_path(target) as tmp:
        quantize_file(fp32, tmp)
        change = top1_change(inference_session(str(fp32)), inference_session(str(tmp)), evaluation.tasks,
                             evaluation.split, target)
        proto = onnx.load(str(tmp))
        metadata.stamp(proto, {**document, "quantization": {"type": "int8 dynamic (ONNX Runtime)",
                                                           "fp32_file": out.name, **change}})
        onnx.save(proto, str(tmp))
    return {"out": str(target), "bytes": target.stat().st_size, **change}
