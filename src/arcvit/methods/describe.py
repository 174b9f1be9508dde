"""What a method costs on a backbone before anything is downloaded: parameter counts and memory estimates."""
from __future__ import annotations

import timm
import torch

from arcvit.backends import create_backbone
from arcvit.core.params import memory_estimate, parameter_breakdown
from arcvit.methods.registry import prepare_model


def describe_backbone(name: str, num_classes: int, method: str = "arc", rank: int | None = None,
                      batch_size: int = 32, precision: str = "32-true") -> dict:
    """Parameter counts and memory estimates for a method on a timm backbone, without loading weights."""
    with torch.device("meta"):
        model = create_backbone(name, num_classes, pretrained=False)
        total_before = sum(p.numel() for p in model.parameters())
        model = prepare_model(model, method, rank=rank)
    counts = parameter_breakdown(model)
    return {
        "backbone": name, "timm": timm.__version__, "method": method, "num_classes": num_classes,
        "backbone_params": total_before, **{f"{k}_params": v for k, v in counts.items()},
        "trainable_percent": round(100 * counts["trainable"] / total_before, 4),
        "memory_estimate": {
            f"batch {batch_size}, {precision}": memory_estimate(model, batch_size, precision),
            f"batch {batch_size}, {precision}, grad checkpointing": memory_estimate(
                model, batch_size, precision, grad_checkpointing=True)},
    }
