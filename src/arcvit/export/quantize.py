"""int8 beside the fp32 file (ONNX Runtime's dynamic quantisation: int8 weights, activations quantised on the
fly), never without its cost in accuracy: top-1 of both files on an evaluation split, and the change."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from arcvit.errors import ModelError
from arcvit.export.check import run
from arcvit.export.runtime import need

Batches = Callable[[], Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]]  # (inputs, labels), streamed


def int8_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


def quantize_file(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of ``source`` into ``target`` (weights int8, MatMul/Gemm quantised)."""
    (quantization,) = need("onnxruntime.quantization")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice is not the user's concern
    try:
        # MatMul and Gemm only: ONNX Runtime would also quantise Gather tables (a many-task graph's stacked
        # D, c, b and heads), costing accuracy for no speed
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.getLogger().setLevel(quiet)


def _correct(session, batches: Batches, where: Path) -> tuple[int, int]:
    right = total = 0
    for inputs, labels in batches():
        logits = run(session, inputs)
        # -inf is a many-task graph's padding past a task's classes; NaN, +inf or a row without one finite
        # logit is a broken model, whose argmax would read as a chance-level accuracy
        if bool((torch.isnan(logits) | torch.isposinf(logits)).any() or not torch.isfinite(logits).any(-1).all()):
            raise ModelError(f"{where}: not written: its logits are not finite (NaN/inf) on the evaluation split; "
                             "no accuracy is reported from them")
        right += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return right, total


def top1_change(fp32, int8, splits: dict[str, Batches], split: str, where: Path) -> dict[str, Any]:
    """Top-1 of both sessions on every task's evaluation split, per task and over all its images (``where``:
    the int8 file, named if its logits are NaN)."""
    per_task, sums = {}, [0, 0, 0]
    for task, batches in splits.items():
        (a, n), (b, _) = _correct(fp32, batches, where), _correct(int8, batches, where)
        per_task[task] = {"images": n, "top1_fp32": a / n, "top1_int8": b / n, "top1_change": (b - a) / n}
        sums = [sums[0] + a, sums[1] + b, sums[2] + n]
    a, b, n = sums
    return {"split": split, "images": n, "top1_fp32": a / n, "top1_int8": b / n, "top1_change": (b - a) / n,
            "tasks": per_task}
