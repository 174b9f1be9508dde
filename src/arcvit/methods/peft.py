"""LoRA, DoRA and VeRA through HF PEFT. PEFT is imported here only, on first use, so that commands that never
train a PEFT method (``arcvit --help``, ``arcvit report``) do not load it."""
from __future__ import annotations

import copy

import torch.nn as nn

from arcvit.errors import ConfigError, ModelError
from arcvit.extras import require


def is_peft_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def wrap_peft(model: nn.Module, method: str, rank: int, dropout: float, targets: tuple[str, ...],
              head: str) -> nn.Module:
    """PEFT freezes the backbone and trains a copy of the head (``modules_to_save``), which its merge swaps in."""
    peft = require("peft", "peft", method)
    shared = {"r": rank, "target_modules": list(targets), "modules_to_save": [head]}
    config = peft.LoraConfig(lora_alpha=rank, lora_dropout=dropout, use_dora=method == "dora", **shared) \
        if method in ("lora", "dora") else peft.VeraConfig(vera_dropout=dropout, **shared)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # PEFT's complaint about target_modules: none found, or not a Linear
        raise ConfigError(f"{method} targets {list(targets)}: {e}") from e


def peft_method(model: nn.Module) -> str:
    """lora, dora or vera: DoRA is PEFT's LoRA with ``use_dora``."""
    kind = model.peft_type.value.lower()
    return "dora" if kind == "lora" and model.peft_config[model.active_adapter].use_dora else kind


def merge_peft(model: nn.Module, method: str) -> nn.Module:
    """The plain model PEFT's own merge gives, from a copy (``model`` stays usable)."""
    if not (is_peft_model(model) and peft_method(model) == method):
        raise ModelError(f"{method}: expected the PEFT model prepare_model returned, got {type(model).__name__}")
    return copy.deepcopy(model).merge_and_unload()
