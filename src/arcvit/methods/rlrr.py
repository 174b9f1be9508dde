"""RLRR (Dong et al., CVPR 2024): residual low-rank rescaling of the frozen weights.

Every Linear of the transformer blocks computes with ``W + W * (s_out s_in^T)`` (a rank-one rescaling of W,
added to it) and ``b + shift``; the norms and the patch embedding get SSF's scale and shift. Both fold into the
layers exactly. timm's fused ``qkv`` is the paper's three query, key and value Linears side by side: one
``s_in`` per chunk, as the paper's model has.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcvit.methods.reparam import Reparam, attach, block_linears
from arcvit.methods.ssf import scale_shift, scale_shift_layers


class ResidualRescale(Reparam):
    """``W * (s_out s_in^T)`` added to a Linear's weight and ``shift`` to its bias; ``chunks`` row blocks of W
    (a fused qkv) have their own ``s_in``.

    The paper's initialisation: kaiming-uniform for both scale vectors (as a column and a row), so the model
    starts slightly rescaled, and zeros for the shift.
    """

    def __init__(self, out_features: int, in_features: int, chunks: int, bias: bool) -> None:
        super().__init__()
        self.chunks = chunks
        self.scale_out = nn.Parameter(torch.empty(out_features))
        self.scale_in = nn.Parameter(torch.empty(chunks, in_features))
        self.shift = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.scale_out.view(-1, 1))
        nn.init.kaiming_uniform_(self.scale_in)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rescale = self.scale_out.view(self.chunks, -1, 1) * self.scale_in.view(self.chunks, 1, -1)
        return weight * rescale.reshape(weight.shape).to(weight.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        out = out + F.linear(x, self.delta_weight(layer.weight))
        return out + self.shift if self.shift is not None else out

    def fold(self, layer: nn.Linear) -> None:
        layer.weight.add_(self.delta_weight(layer.weight))
        if self.shift is not None:
            layer.bias.add_(self.shift.to(layer.bias.dtype))


def add_rlrr(model: nn.Module, head: str) -> None:
    """Rescale every Linear of the blocks, scale and shift every norm and Conv2d embedding outside the classifier
    (the backbone is frozen by the caller)."""
    for name, linear in list(block_linears(model)):
        chunks = 3 if name.endswith(".qkv") and linear.out_features == 3 * linear.in_features else 1
        attach(linear, "rlrr", ResidualRescale(linear.out_features, linear.in_features, chunks,
                                               linear.bias is not None))
    for _, module in list(scale_shift_layers(model, head, linears=False)):
        attach(module, "rlrr", scale_shift(module))
