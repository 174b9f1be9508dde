"""RepAdapter (Luo et al., 2023): a linear adapter before every attention and MLP, re-parameterised into the
Linears that read it.

At a site (the input x of a block's attention or MLP) ``x + scale * up(dropout(down(x)))``, with ``down`` a
d -> r Linear and ``up`` a group-wise r -> d Linear (``groups`` blocks on its diagonal), both with biases and no
non-linearity between them. It is linear in x, so each reader ``W x + b`` of the site folds it exactly:
``W' = W (I + scale * up down)``, ``b' = b + scale * W (up b_down + b_up)``. It sits on the input of the module
that reads the site (the attention or MLP), after any padding a family adds there, so the fold is exact for
Swin's padded windows too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arcvit.core.sites import find_blocks
from arcvit.core.specs import block_spec_for
from arcvit.errors import ConfigError, ModelError
from arcvit.methods.reparam import Reparam, attach

GROUPS = 2     # the paper's group count for ``up``
SCALE = 1.0    # the RepAdapter module's default scale (the paper's per-task configs range 0.1 to 10)


class RepAdapter(Reparam):
    """``x + scale * up(dropout(down(x)))``: ``down`` xavier-uniform, every bias and ``up`` zero (the paper's)."""

    kind = "input"

    def __init__(self, dim: int, rank: int, dropout: float, position: str, readers, groups: int = GROUPS,
                 scale: float = SCALE) -> None:
        super().__init__()
        if rank > dim:
            raise ConfigError(f"rank {rank} exceeds the model's width {dim}: RepAdapter's bottleneck may be no "
                              "wider than the input it adapts")
        if rank % groups or dim % groups:
            raise ConfigError(f"repadapter: rank ({rank}) and width ({dim}) must be multiples of its {groups} groups")
        object.__setattr__(self, "_readers", readers)  # the block spec's readers(host, position)
        self.position, self.groups, self.scale = position, groups, scale
        self.down = nn.Linear(dim, rank)
        self.up_weight = nn.Parameter(torch.zeros(dim, rank // groups))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def up_matrix(self) -> torch.Tensor:
        """The group-wise ``up`` as a dense d x r matrix (zero off its diagonal blocks)."""
        dim, width = self.up_weight.shape
        return torch.block_diag(*self.up_weight.view(self.groups, dim // self.groups, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * F.linear(self.dropout(self.down(x)), self.up_matrix(), self.up_bias)

    def fold(self, host: nn.Module) -> None:
        up = self.up_matrix()
        mix = self.scale * up @ self.down.weight                        # d x d: x -> x + mix x + offset
        offset = self.scale * (up @ self.down.bias + self.up_bias)
        for reader in self._readers(host, self.position):
            weight = reader.linear.weight
            shift = weight @ offset.to(weight.dtype)
            for slot in reader.slots:
                if slot.owner is not None:
                    slot.bias_view().add_(shift[slot.start:slot.stop])
            weight.add_(weight @ mix.to(weight.dtype))


def _check_foldable(model: nn.Module, block_name: str, block: nn.Module, position: str) -> None:
    """Refuse before training a site whose readers have no bias to take the adapter's offset."""
    spec = block_spec_for(block)
    host = getattr(block, spec.places[position].host)
    for reader in spec.readers(host, position):
        for s in reader.slots:
            if s.owner is None and not (s.is_key and spec.key_bias_invariant(model, host)):
                raise ModelError(f"repadapter: {block_name} ({position}): rows {s.start}:{s.stop} of its "
                                 f"{type(reader.linear).__name__} have no bias to fold the adapter's offset into")


def add_repadapter(model: nn.Module, rank: int, dropout: float) -> None:
    """A RepAdapter at every attention and MLP input (the backbone is frozen by the caller)."""
    blocks = find_blocks(model)
    for name, block, _ in blocks:
        for position in ("att", "mlp"):
            _check_foldable(model, name, block, position)
    for _, block, _ in blocks:
        spec = block_spec_for(block)
        for position in ("att", "mlp"):
            host = getattr(block, spec.places[position].host)
            dim = spec.readers(host, position)[0].linear.in_features
            attach(host, "repadapter", RepAdapter(dim, rank, dropout, position, spec.readers))
