"""The ARC modules: shared down-projections, per-site rescale/bias, and the two ways to insert them.

An adapter site is the normalised token input of a block's attention or MLP. At a site,
``h = x + dropout(x @ (D * c)) @ D^T + b`` with D (d x r) shared by every block of a stage and position,
c (r) and b (d) per site. The up-projection is D^T, so it costs no parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ARCShared(nn.Module):
    """Shared down-projections, one per stage and position: ``att[stage]`` and ``mlp[stage]``, each d x r."""

    def __init__(self, stage_dims: list[int], rank: int, positions: tuple[str, ...]) -> None:
        super().__init__()
        self.att = nn.ParameterList([nn.Parameter(torch.empty(d, rank)) for d in stage_dims])
        self.mlp = nn.ParameterList(
            [nn.Parameter(torch.empty(d, rank)) for d in stage_dims] if "mlp" in positions else [])
        for p in self.parameters():
            nn.init.xavier_uniform_(p)

    def down(self, position: str, stage: int) -> nn.Parameter:
        return getattr(self, position)[stage]


class ARCAdapter(nn.Module):
    """Per-site rescale vector c and bias b; reads its D from the model's ``ARCShared``.

    The reference to ``ARCShared`` is kept outside the module tree so that D is registered (and saved,
    counted, synchronised) exactly once, under ``arc.``.
    """

    def __init__(self, shared: ARCShared, position: str, stage: int, dim: int, rank: int,
                 dropout: float, bias: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)
        self.position, self.stage = position, stage
        self.scale = nn.Parameter(torch.zeros(rank))
        if position == "mlp":  # the paper: xavier-uniform on a 1 x r matrix at the MLP, zeros at attention
            nn.init.xavier_uniform_(self.scale.view(1, rank))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.dropout = nn.Dropout(dropout)

    @property
    def down_proj(self) -> nn.Parameter:
        return self._shared.down(self.position, self.stage)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x @ (D * c)): the r-wide code of each token."""
        return self.dropout(x @ (self.down_proj * self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.project(x) @ self.down_proj.t()
        return h + self.bias if self.bias is not None else h

    @torch.no_grad()
    def fold(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a Linear ``W`` reading the adapted input: ``W (I + D diag(c) D^T)`` and ``W b``."""
        d = self.down_proj.to(weight.dtype)
        folded = weight + (weight @ d) * self.scale.to(weight.dtype) @ d.t()
        shift = weight @ self.bias.to(weight.dtype) if self.bias is not None else None
        return folded, shift

    def extra_repr(self) -> str:
        return f"position={self.position}, stage={self.stage}, rank={self.scale.numel()}"


class ARCLinear(nn.Module):
    """A frozen Linear preceded by an adapter, for sites where that Linear is the only reader of x."""

    def __init__(self, base: nn.Linear, adapter: ARCAdapter, lowrank: bool) -> None:
        super().__init__()
        self.base, self.adapter, self.lowrank = base, adapter, lowrank

    @property
    def weight(self) -> torch.Tensor:  # keeps code that inspects ``.weight`` (dtype, device) working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lowrank:
            return self.base(self.adapter(x))
        w, a = self.base.weight, self.adapter
        bias = self.base.bias
        if a.bias is not None:
            shift = w @ a.bias
            bias = shift if bias is None else bias + shift
        return F.linear(x, w, bias) + a.project(x) @ (w @ a.down_proj).t()


class ARCInput(nn.Module):
    """Any module (attention, MLP) whose first input is adapted first, for sites with several readers of x."""

    def __init__(self, inner: nn.Module, adapter: ARCAdapter) -> None:
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.inner(self.adapter(x), *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # blocks read attributes of their attention (e.g. ``attn.fused_attn``)
            return getattr(super().__getattr__("inner"), name)
