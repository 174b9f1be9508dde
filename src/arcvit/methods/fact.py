"""FacT (Jie & Deng, AAAI 2023): the weight increments of every block, tensorised and factorised together.

Every Linear of the transformer blocks is a grid of d x d slices (qkv: 3 x 1, proj: 1 x 1, fc1: 4 x 1, fc2: 1 x 4:
12 slices per ViT block). Each slice's increment is ``scale * V core U`` with U (r x d) and V (d x r) shared by
every slice of the model; the r x r cores are

- ``fact_tt`` (tensor-train): one trained core per slice;
- ``fact_tk`` (Tucker): ``core = C x_3 p``, a shared r x r x r tensor C contracted with the slice's column p of a
  shared r x (slices) matrix P.

Dropout acts on the r-wide code between the core and V, as in the paper's code. The increments fold into the
weights exactly: ``W' = W + scale * V core U`` per slice. One d for the whole model: a family whose stages differ
in width (Swin) is refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcvit.core.sites import find_blocks, readers
from arcvit.errors import ConfigError, ModelError
from arcvit.methods.reparam import Reparam, attach, block_linears

SHARED_ATTR = "fact"


class FacTFactors(nn.Module):
    """U and V shared by every slice; for Tucker also the core tensor C and the slice matrix P.

    Initialised as the paper's code does: U as an nn.Linear (kaiming-uniform), V zeros (the model starts as the
    backbone), C and P xavier-uniform.
    """

    def __init__(self, dim: int, rank: int, slices: int, tucker: bool) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(rank, dim))
        self.v = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        self.core = nn.Parameter(torch.empty(rank, rank, rank)) if tucker else None
        self.p = nn.Parameter(torch.empty(rank, slices)) if tucker else None
        if tucker:
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.p)


class FacTDelta(Reparam):
    """One Linear's increment, a grid of ``rows x cols`` slices starting at slice ``first`` of the model."""

    def __init__(self, factors: FacTFactors, rows: int, cols: int, first: int, scale: float, dropout: float) -> None:
        super().__init__()
        object.__setattr__(self, "_factors", factors)  # registered once, at the model's root
        self.rows, self.cols, self.first, self.scale = rows, cols, first, scale
        self.dropout = nn.Dropout(dropout)
        rank = factors.u.shape[0]
        self.cores = None
        if factors.core is None:  # tensor-train: one core per slice, as an nn.Linear(r, r) is initialised
            self.cores = nn.Parameter(torch.empty(rows, cols, rank, rank))
            nn.init.uniform_(self.cores, -1 / math.sqrt(rank), 1 / math.sqrt(rank))

    def slice_cores(self) -> torch.Tensor:
        """The r x r core of every slice: (rows, cols, r, r)."""
        if self.cores is not None:
            return self.cores
        f = self._factors
        p = f.p[:, self.first:self.first + self.rows * self.cols]
        return torch.einsum("rsj,jk->krs", f.core, p).reshape(self.rows, self.cols, *f.core.shape[:2])

    def forward(self, x: torch.Tensor, out: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        f = self._factors
        code = F.linear(x.unflatten(-1, (self.cols, -1)), f.u)                # (..., cols, r)
        mixed = torch.einsum("...bs,abrs->...ar", code, self.slice_cores())   # (..., rows, r)
        return out + self.scale * F.linear(self.dropout(mixed), f.v).flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        f = self._factors
        grid = torch.einsum("dr,abrs,se->adbe", f.v, self.slice_cores(), f.u)
        return self.scale * grid.reshape(self.rows * f.v.shape[0], self.cols * f.u.shape[1])

    def fold(self, layer: nn.Linear) -> None:
        layer.weight.add_(self.delta_weight().to(layer.weight.dtype))


def _width(model: nn.Module, method: str) -> int:
    widths = sorted({readers(block, "att")[0].linear.in_features for _, block, _ in find_blocks(model)})
    if len(widths) > 1:
        raise ModelError(f"{method} factorises one d x d weight tensor, but {type(model).__name__}'s blocks have "
                         f"widths {', '.join(map(str, widths))}; use it on a single-width ViT")
    return widths[0]


def add_fact(model: nn.Module, method: str, rank: int, dropout: float, scale: float = 1.0) -> None:
    """FacT on every Linear of the blocks; U, V (and Tucker's C, P) at ``model.fact`` (the backbone is frozen by
    the caller)."""
    dim = _width(model, method)
    if rank > dim:
        raise ConfigError(f"rank {rank} exceeds the model's width {dim}: {method}'s factors U and V project the "
                          f"width to rank dimensions")
    linears = list(block_linears(model))
    for name, linear in linears:
        if linear.in_features % dim or linear.out_features % dim:
            raise ModelError(f"{method}: {name} is {linear.out_features} x {linear.in_features}, not a grid of "
                             f"{dim} x {dim} slices")
    grids = [(linear.out_features // dim, linear.in_features // dim) for _, linear in linears]
    like = linears[0][1].weight
    factors = FacTFactors(dim, rank, sum(a * b for a, b in grids), method == "fact_tk").to(like.device, like.dtype)
    model.add_module(SHARED_ATTR, factors)
    first = 0
    for (_, linear), (rows, cols) in zip(linears, grids):
        attach(linear, method, FacTDelta(factors, rows, cols, first, scale, dropout))
        first += rows * cols
