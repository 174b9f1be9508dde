"""SSF (Lian et al., NeurIPS 2022): scale and shift the features after every linear layer, norm and the patch
embedding: ``y = scale * layer(x) + shift`` per channel, both trained, the backbone frozen.

A per-channel affine map after a layer folds into that layer exactly: ``W' = diag(scale) W`` and
``b' = scale * b + shift``. A layer without a bias gets the scale only, so that the merged model keeps the
plain model's keys.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from arcvit.core.sites import find_blocks
from arcvit.methods.reparam import Reparam, attach, outside


class ScaleShift(Reparam):
    """``scale * out + shift`` over a layer's output channels (the last dim; dim 1 of a Conv2d's NCHW output).

    SSF's initialisation: scale ~ N(1, 0.02), shift ~ N(0, 0.02).
    """

    def __init__(self, channels: int, shift: bool, channels_first: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))
        self.shift = nn.Parameter(torch.empty(channels)) if shift else None
        self.view = (-1, 1, 1) if channels_first else (-1,)
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        if self.shift is not None:
            nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        out = out * self.scale.view(self.view)
        return out + self.shift.view(self.view) if self.shift is not None else out

    def fold(self, layer: nn.Module) -> None:
        weight = layer.weight
        weight.mul_(self.scale.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype))
        if self.shift is not None:
            layer.bias.mul_(self.scale.to(weight.dtype)).add_(self.shift.to(weight.dtype))


def _is_norm(module: nn.Module) -> bool:
    """A LayerNorm over the last dim with a weight to fold into (timm's channels-first LayerNorm2d is not)."""
    return (isinstance(module, nn.LayerNorm) and module.weight is not None
            and not type(module).__name__.lower().endswith("2d"))


def scale_shift_layers(model: nn.Module, head: str, linears: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """The layers SSF follows, outside the classifier: norms, Conv2d embeddings and (with ``linears``) Linears."""
    find_blocks(model)  # refuses a family arcvit does not know, with one line
    keep = outside(head)
    for name, module in model.named_modules():
        if keep(name) and (_is_norm(module) or isinstance(module, nn.Conv2d)
                           or (linears and isinstance(module, nn.Linear))):
            yield name, module


def scale_shift(module: nn.Module) -> ScaleShift:
    return ScaleShift(module.weight.shape[0], module.bias is not None, isinstance(module, nn.Conv2d))


def add_ssf(model: nn.Module, head: str) -> None:
    """Put SSF after every Linear, LayerNorm and Conv2d outside the classifier (the backbone is frozen by the
    caller)."""
    for _, module in list(scale_shift_layers(model, head)):
        attach(module, "ssf", scale_shift(module))
