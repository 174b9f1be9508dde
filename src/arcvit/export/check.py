"""Before a file is kept: ONNX Runtime on real inputs against the PyTorch model the graph came from.

Pass: on every batch (batch 1 and a larger one), max |Δlogit| <= ``TOLERANCE`` x max |logit| over the finite
logits, the same -inf entries (a many-task graph's padding), and the same argmax for every image.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

TOLERANCE = 1e-4


def run(session, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """ONNX Runtime's logits for ``inputs`` (named as the graph's inputs)."""
    return torch.from_numpy(session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0])


def compare(expected: torch.Tensor, actual: torch.Tensor) -> dict[str, Any]:
    """The figures of one batch: its size, max |Δlogit|, max |logit|, and whether it passes."""
    finite = torch.isfinite(expected)
    same_padding = bool(torch.equal(finite, torch.isfinite(actual)))
    diff = (expected[finite] - actual[finite]).abs().max().item() if same_padding else float("inf")
    scale = expected[finite].abs().max().item()
    argmax = bool(torch.equal(expected.argmax(-1), actual.argmax(-1)))
    return {"batch": int(expected.shape[0]), "max_abs_diff": diff, "max_abs_logit": scale,
            "argmax_equal": argmax, "passed": same_padding and argmax and diff <= TOLERANCE * scale}


@torch.no_grad()
def check(graph: nn.Module, session, batches: list[dict[str, torch.Tensor]], images: str) -> dict[str, Any]:
    """Every batch through both; ``images`` says where the images came from (stored with the figures)."""
    results = [compare(graph(**inputs).float(), run(session, inputs)) for inputs in batches]
    return {"tolerance": f"max|dlogit| <= {TOLERANCE:g} x max|logit|, identical argmax", "images": images,
            "batches": results, "passed": all(r["passed"] for r in results)}


def describe_failure(report: dict[str, Any]) -> str:
    bad = next(r for r in report["batches"] if not r["passed"])
    return (f"ONNX Runtime differs from PyTorch on a batch of {bad['batch']}: max |dlogit| {bad['max_abs_diff']:.3g} "
            f"(allowed {TOLERANCE:g} x {bad['max_abs_logit']:.3g}), argmax "
            f"{'equal' if bad['argmax_equal'] else 'differs'}")
