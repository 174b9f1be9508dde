"""Parameter accounting: the paper's closed-form count, and a breakdown of a live model."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from arcvit.core.arc import adapter_parameter_names, head_parameter_names
from arcvit.core.sites import find_blocks, unwrapped
from arcvit.core.specs import block_spec_for


def arc_parameter_count(stage_dims: Sequence[int], stage_depths: Sequence[int], rank: int,
                        mode: str = "arc") -> int:
    """ARC's adapter parameters, head excluded: per stage ``P·d·r + P·L·(r + d)``, P = 2 (arc) or 1 (arc_att).

    ViT-B/16 (d=768, L=12), r=50: 96,432 for ARC and 48,216 for ARC_att.
    """
    positions = 2 if mode == "arc" else 1
    return sum(positions * (d * rank + depth * (rank + d)) for d, depth in zip(stage_dims, stage_depths))


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Total, trainable, adapter and head parameter counts of a model (shared tensors counted once).

    ``head``: the classifier's trainable parameters (all of them when none train), so that a wrapper that
    trains a copy of the head beside the frozen original (PEFT's ``modules_to_save``) counts it once.
    ``adapter``: ARC's parameters; for another method, what it trains besides the head (LoRA's matrices,
    BitFit's biases, ...). A wrapper with ``get_base_model()`` (PEFT's) is counted through the model it wraps,
    whose library arcvit knows.
    """
    model = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = dict(model.named_parameters())
    head_names = head_parameter_names(model)
    trained_head = [n for n in head_names if params[n].requires_grad] or list(head_names)
    adapter = adapter_parameter_names(model) or [n for n, p in params.items()
                                                 if p.requires_grad and n not in head_names]
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "adapter": sum(params[n].numel() for n in adapter),
        "head": sum(params[n].numel() for n in trained_head),
    }


def _tokens_and_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(tokens per image, width, depth, heads) of a ViT-family model, from its patch embedding and blocks."""
    blocks = find_blocks(model)
    last = blocks[-1][1]
    embed = getattr(model, "patch_embed", None)
    tokens = getattr(embed, "num_patches", 196) + getattr(model, "num_prefix_tokens", 0)
    place = block_spec_for(last).places["att"]
    dim = getattr(last, place.norm).normalized_shape[0]
    return tokens, dim, len(blocks), getattr(unwrapped(getattr(last, place.host)), "num_heads", 1)


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
