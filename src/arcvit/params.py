"""Parameter accounting: the paper's closed-form count, and a breakdown of a live model."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from arcvit.arc import adapter_parameter_names, head_parameter_names


def arc_parameter_count(stage_dims: Sequence[int], stage_depths: Sequence[int], rank: int,
                        mode: str = "arc") -> int:
    """ARC's adapter parameters, head excluded: per stage ``P·d·r + P·L·(r + d)``, P = 2 (arc) or 1 (arc_att).

    ViT-B/16 (d=768, L=12), r=50: 96,432 for ARC and 48,216 for ARC_att.
    """
    positions = 2 if mode == "arc" else 1
    return sum(positions * (d * rank + depth * (rank + d)) for d, depth in zip(stage_dims, stage_depths))


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Total, trainable, adapter and head parameter counts of a model (shared tensors counted once)."""
    params = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "adapter": sum(params[n].numel() for n in adapter_parameter_names(model)),
        "head": sum(params[n].numel() for n in head_parameter_names(model)),
    }


def _tokens_and_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(tokens per image, width, depth, heads) of a ViT-family model, from its patch embedding and blocks."""
    from arcvit.sites import find_blocks
    blocks = find_blocks(model)
    last = blocks[-1][1]
    embed = getattr(model, "patch_embed", None)
    tokens = getattr(embed, "num_patches", 196) + getattr(model, "num_prefix_tokens", 0)
    dim = last.norm1.normalized_shape[0]
    heads = getattr(last.attn, "num_heads", 1)
    return tokens, dim, len(blocks), heads


def memory_estimate(model: nn.Module, batch_size: int, precision: str = "32-true",
                    grad_checkpointing: bool = False) -> dict[str, float]:
    """Rough training memory in GiB: weights, gradients + AdamW moments, and activations.

    Activations follow Korthikanti et al. (2022): about ``34·s·b·d`` bytes per block in 16-bit with fused
    attention (s tokens, b batch, d width), twice that in fp32; with gradient checkpointing only each block's
    input (``2·s·b·d`` bytes in 16-bit) plus one block's full activations are kept. Treat it as a plan, not a
    measurement: memory_estimate is checked against measured peaks in benchmarks/speed.py.
    """
    counts = parameter_breakdown(model)
    weight_bytes = 2 if precision == "bf16-true" else 4
    act_scale = 1 if "16" in precision else 2
    tokens, dim, depth, _ = _tokens_and_shape(model)
    per_block = 34 * tokens * batch_size * dim * act_scale
    if grad_checkpointing:
        activations = depth * 2 * tokens * batch_size * dim * act_scale + per_block
    else:
        activations = depth * per_block
    gib = 1024 ** 3
    return {"weights_gib": round(counts["total"] * weight_bytes / gib, 3),
            "grads_and_adamw_gib": round(counts["trainable"] * 12 / gib, 3),
            "activations_gib": round(activations / gib, 3),
            "total_gib": round((counts["total"] * weight_bytes + counts["trainable"] * 12 + activations) / gib, 3)}


def describe_backbone(name: str, num_classes: int, method: str = "arc", rank: int | None = None,
                      batch_size: int = 32, precision: str = "32-true") -> dict:
    """Parameter counts and memory estimates for a method on a timm backbone, without loading weights."""
    import timm
    import torch

    from arcvit.backbones import create_backbone
    from arcvit.methods import prepare_model
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
