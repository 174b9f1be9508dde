"""Where ARC goes in a model: its pre-norm blocks, their adapter sites, and the Linears each site folds into.

A *site* is the normalised input of a block's attention or MLP. Its *readers* are the Linear layers that
consume that input; merging rewrites each reader as ``W' = W (I + D diag(c) D^T)`` and adds ``W b`` to the
reader's bias. What a family's blocks look like comes from the block specs its backend registered
(``arcvit.core.specs``); nothing here knows a model library.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from arcvit.core.specs import BlockSpec, Reader, block_spec_for, ensure_backends, registered_block_specs
from arcvit.errors import ModelError


@dataclass
class Site:
    block_index: int
    block_name: str
    block: nn.Module
    spec: BlockSpec
    stage: int
    position: str           # "att" or "mlp"
    parent: nn.Module       # the module whose attribute ``attr`` is wrapped
    attr: str
    dim: int
    single_linear: bool     # the wrapped module is the site's only reader (an nn.Linear)

    @property
    def host(self) -> nn.Module:
        """The attention or MLP module that reads the site's input (without arcvit's wrapper)."""
        return unwrapped(getattr(self.block, self.spec.places[self.position].host))

    def readers(self) -> list[Reader]:
        return self.spec.readers(self.host, self.position)


def readers(block: nn.Module, position: str) -> list[Reader]:
    """The Linear layers that read a block's attention or MLP input, with their bias slots."""
    spec = block_spec_for(block)
    return spec.readers(unwrapped(getattr(block, spec.places[position].host)), position)


def unwrapped(module: nn.Module) -> nn.Module:
    """The model's own module behind an arcvit site wrapper (every wrapper keeps it as ``inner``)."""
    return module.inner if _is_wrapper(module) else module


def _unsupported(model: nn.Module) -> ModelError:
    seen = sorted({type(m).__name__ for m in model.modules() if "block" in type(m).__name__.lower()
                   or "layer" in type(m).__name__.lower()})
    known = ", ".join(f"{s.name} ({', '.join(t.__name__ for t in s.block_types)})" for s in registered_block_specs())
    return ModelError(f"{type(model).__name__} is not supported by ARC: arcvit looks for pre-norm transformer "
                      f"blocks of a registered family [{known}]" + (f"; found only {', '.join(seen[:8])}" if seen else ""))


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """All pre-norm transformer blocks in forward order as (name, block, stage); a stage is one block list."""
    ensure_backends(model)
    blocks, stages = [], {}
    for name, module in model.named_modules():
        if block_spec_for(module) is not None:
            container = name.rpartition(".")[0]
            stages.setdefault(container, len(stages))
            blocks.append((name, module, stages[container]))
    if not blocks:
        raise _unsupported(model)
    return blocks


def _is_wrapper(module: nn.Module) -> bool:
    return getattr(type(module), "is_arc_site", False)


def _single_linear(spec: BlockSpec, host: nn.Module, position: str) -> str | None:
    """The host's single reader, also where an earlier adapter has wrapped it already."""
    wrapped = [n for n, m in host.named_children() if _is_wrapper(m) and m.position == position]
    return wrapped[0] if wrapped else spec.single_linear(host, position)


def _site(index: int, name: str, block: nn.Module, stage: int, position: str) -> Site:
    spec = block_spec_for(block)
    place = spec.places.get(position)
    host = unwrapped(getattr(block, place.host)) if place is not None else None
    if place is None or place.norm is None:  # an added position: always its one Linear, inside the host
        attr = _single_linear(spec, host, position) if host is not None else None
        if attr is None:
            raise ModelError(f"{name} ({type(block).__name__}): ARC+ position {position!r} is not defined for "
                             f"this block family ({spec.name}); leave it out of extra_positions")
        linear = unwrapped(getattr(host, attr))
        return Site(index, name, block, spec, stage, position, host, attr, linear.in_features, True)
    attr = None if _is_wrapper(getattr(block, place.host)) else _single_linear(spec, host, position)
    if attr is not None:
        linear = unwrapped(getattr(host, attr))
        return Site(index, name, block, spec, stage, position, host, attr, linear.in_features, True)
    dim = spec.readers(host, position)[0].linear.in_features
    return Site(index, name, block, spec, stage, position, block, place.host, dim, False)


def find_sites(model: nn.Module, positions: tuple[str, ...], block_indices: tuple[int, ...] | None) -> list[Site]:
    blocks = find_blocks(model)
    if block_indices is not None and block_indices[-1] >= len(blocks):
        raise ModelError(f"blocks={list(block_indices)} but {type(model).__name__} has {len(blocks)} blocks "
                         f"(indices 0..{len(blocks) - 1})")
    return [_site(index, name, block, stage, position)
            for index, (name, block, stage) in enumerate(blocks)
            if block_indices is None or index in block_indices
            for position in positions]
