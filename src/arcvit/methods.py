"""The fine-tuning methods ARC is benchmarked against, each selectable by name on the same timm backbone.

A fair comparison changes only what a method trains: every method starts from the same frozen backbone and
the same classifier head, zeroed and trainable (the ARC paper's protocol). LoRA and VeRA come from HF PEFT;
AdaptFormer, which no maintained library offers for timm, is the one adapter written here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, PeftType, VeraConfig, get_peft_model

from arcvit.arc import classifier, apply_arc, is_adapted
from arcvit.arc import merge as merge_arc
from arcvit.config import ARCConfig
from arcvit.errors import ConfigError, ModelError
from arcvit.sites import find_blocks, readers

DEFAULT_TARGETS = ("qkv", "fc1")


@dataclass(frozen=True)
class MethodSpec:
    """One method as help text and reports show it.

    mergeable: the trained model folds into the plain timm model, so inference costs nothing extra.
    default_rank / default_dropout: what ``prepare_model`` uses when given None; both None for methods
    that have neither (linear, full, bitfit). "Rank" is ARC's and LoRA's r, VeRA's r, AdaptFormer's bottleneck.
    """

    name: str
    mergeable: bool
    description: str
    default_rank: int | None = None
    default_dropout: float | None = None


SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("arc", True, "ARC: shared low-rank adapters on every attention and MLP input, + head",
               ARCConfig.rank, ARCConfig.dropout),
    MethodSpec("arc_att", True, "ARC on the attention inputs only, + head", ARCConfig.rank, ARCConfig.dropout),
    MethodSpec("linear", True, "linear probing: the head only"),
    MethodSpec("full", True, "full fine-tuning: every parameter"),
    MethodSpec("bitfit", True, "BitFit: every bias term, + head"),
    MethodSpec("lora", True, "LoRA (HF PEFT) on the target Linear layers, alpha = r, + head", 8, 0.0),
    MethodSpec("vera", True, "VeRA (HF PEFT): frozen shared random projections, trained scaling vectors, + head",
               256, 0.0),
    MethodSpec("adaptformer", False, "AdaptFormer: parallel ReLU bottleneck adapter on every MLP, + head", 8, 0.1),
)}
METHODS: tuple[str, ...] = tuple(SPECS)

_PEFT_TYPES = {"lora": PeftType.LORA, "vera": PeftType.VERA}


def method_spec(method: str) -> MethodSpec:
    if method not in SPECS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return SPECS[method]


class AdaptFormerMLP(nn.Module):
    """A block's MLP plus AdaptFormer's parallel bottleneck: ``mlp(x) + s * up(dropout(relu(down(x))))``.

    The ReLU between ``down`` and ``up`` is why AdaptFormer cannot be folded into the backbone: it costs two
    extra matmuls per token at inference. ``up`` starts at zero, so training starts from the backbone itself.
    x is the MLP's normalised input; the sum passes through the block's layer scale and drop path, if any.
    """

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, dropout: float, scale: float = 0.1) -> None:
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck)  # its default kaiming-uniform(a=sqrt 5) is AdaptFormer's "lora" init
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.up(self.dropout(torch.relu(self.down(x))))

    def extra_repr(self) -> str:
        return f"bottleneck={self.down.out_features}, scale={self.scale}"


def _add_adaptformer(model: nn.Module, bottleneck: int, dropout: float) -> None:
    for _, block, _ in find_blocks(model):
        reference = readers(block.mlp)[0].linear.weight
        adapter = AdaptFormerMLP(block.mlp, reference.shape[1], bottleneck, dropout)
        block.mlp = adapter.to(device=reference.device, dtype=reference.dtype).train(model.training)


def _has_adapters(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) or is_adapted(model) or \
        any(isinstance(m, AdaptFormerMLP) for m in model.modules())


def _head_name(model: nn.Module) -> str:
    head = classifier(model)
    if head is None:
        raise ModelError(f"{type(model).__name__} has no classifier head to train; create it with num_classes > 0")
    return next(name for name, module in model.named_modules() if module is head)


def _check_options(spec: MethodSpec, rank: int | None, dropout: float | None) -> None:
    if spec.default_rank is None:
        if rank is not None or dropout is not None:
            raise ConfigError(f"{spec.name} has no rank or dropout to set")
        return
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


def _wrap_peft(model: nn.Module, method: str, rank: int, dropout: float, targets: tuple[str, ...],
               head: str) -> PeftModel:
    """PEFT freezes the backbone and trains a copy of the head (``modules_to_save``), which its merge swaps in."""
    shared = {"r": rank, "target_modules": list(targets), "modules_to_save": [head]}
    config = LoraConfig(lora_alpha=rank, lora_dropout=dropout, **shared) if method == "lora" \
        else VeraConfig(vera_dropout=dropout, **shared)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT's complaint about target_modules: none found, or not a Linear
        raise ConfigError(f"{method} targets {list(targets)}: {e}") from e


def prepare_model(model: nn.Module, method: str, *, rank: int | None = None, dropout: float | None = None,
                  targets: tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """Set a timm model up to be fine-tuned with ``method`` and return the module to train.

    ``model`` is changed in place; for LoRA and VeRA the module returned is PEFT's wrapper around it. Every
    method zeroes the classifier head and trains it. ``rank`` and ``dropout`` default to the method's own
    (``SPECS[method]``); ``targets`` names the Linear layers LoRA and VeRA adapt (module-name suffixes).
    """
    spec = method_spec(method)
    _check_options(spec, rank, dropout)
    if _has_adapters(model):
        raise ModelError(f"{type(model).__name__} already carries adapters; prepare a fresh backbone")
    rank = spec.default_rank if rank is None else rank
    dropout = spec.default_dropout if dropout is None else dropout
    head_name = _head_name(model)
    if method in ("arc", "arc_att"):
        return apply_arc(model, ARCConfig(rank=rank, mode=method, dropout=dropout, zero_head=True))

    head = model.get_submodule(head_name)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    if method in _PEFT_TYPES:
        return _wrap_peft(model, method, rank, dropout, targets, head_name)
    for name, p in model.named_parameters():
        p.requires_grad_(method == "full" or (method == "bitfit" and name.rsplit(".", 1)[-1].endswith("bias")))
    if method == "adaptformer":
        _add_adaptformer(model, rank, dropout)
    for p in head.parameters():
        p.requires_grad_(True)
    return model


def merge_for_inference(model: nn.Module, method: str) -> nn.Module:
    """A plain timm model, with no extra module or cost, that computes what the trained ``model`` computes.

    ``model`` is what ``prepare_model(..., method)`` returned; it is left untouched and usable. The result has
    the backbone's class and state-dict keys, every parameter trainable, as a freshly created timm model.
    """
    spec = method_spec(method)
    if not spec.mergeable:
        raise ConfigError(f"{method} is not mergeable: its adapter stays in the model at inference")
    if method in _PEFT_TYPES:
        if not (isinstance(model, PeftModel) and model.peft_type == _PEFT_TYPES[method]):
            raise ModelError(f"{method}: expected the PEFT model prepare_model returned, got {type(model).__name__}")
        merged = copy.deepcopy(model).merge_and_unload()
    elif method in ("arc", "arc_att"):
        merged = merge_arc(model)
    elif _has_adapters(model):
        raise ModelError(f"{type(model).__name__} carries adapters that {method} does not add; "
                         "pass the method the model was prepared with")
    else:
        merged = copy.deepcopy(model)
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors the method trains, named as in ``model``.

    Loading them with ``load_state_dict(..., strict=False)`` into the same backbone prepared the same way
    restores the trained model (VeRA's frozen projections are regenerated by PEFT from its fixed seed).
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
