"""Which Linear layers LoRA, DoRA and VeRA adapt, found through the backend's block specs as ARC finds its sites.

A target is a position of a block (``att``: the Linears that read the attention's input, ``mlp``: those that read
the MLP's input, and ``proj``/``fc2`` where the block family defines them) or, otherwise, the name of a Linear in
the blocks (a module-name suffix, as PEFT matches it). The default, ``att`` and ``mlp``, is ``qkv`` and ``fc1`` on
a timm ViT and ``q_proj``, ``k_proj``, ``v_proj`` and ``fc1`` on a transformers ViT: the same layers. Targets that
take some but not all of the Linears reading one input are refused: the comparison would be against a partial
method without anyone noticing.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from arcvit.core.sites import find_blocks, readers
from arcvit.core.specs import block_spec_for
from arcvit.errors import ConfigError

DEFAULT_TARGETS = ("att", "mlp")
WHOLE_INPUTS = {"att": "attention", "mlp": "MLP"}  # positions whose readers are adapted together or not


def parse_targets(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"att,mlp"`` or ``["att", "mlp"]`` as a tuple of names; refuses an empty list or name."""
    names = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ConfigError(f"targets must be a comma-separated list of positions (att, mlp, proj, fc2) or Linear "
                          f"names, got {value!r}")
    return tuple(dict.fromkeys(n.strip() for n in names))


def _position_linears(block: nn.Module, position: str) -> list[nn.Linear]:
    return [r.linear for r in readers(block, position)]


def _named_linears(block: nn.Module, target: str) -> list[nn.Linear]:
    return [m for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and (name == target or name.endswith("." + target))]


def _block_targets(block: nn.Module, targets: tuple[str, ...]) -> dict[str, list[nn.Linear]]:
    """Each target's Linears in one block: a position's readers where the family defines it, else by name."""
    places = block_spec_for(block).places
    return {t: _position_linears(block, t) if t in places else _named_linears(block, t) for t in targets}


def _refuse_partial(method: str, block_name: str, block: nn.Module, chosen: set[int]) -> None:
    names = {id(m): name for name, m in block.named_modules()}
    for position, what in WHOLE_INPUTS.items():
        linears = _position_linears(block, position)
        taken = [names[id(m)] for m in linears if id(m) in chosen]
        if taken and len(taken) < len(linears):
            left = [names[id(m)] for m in linears if id(m) not in chosen]
            raise ConfigError(f"{method} targets would adapt {', '.join(taken)} but not {', '.join(left)}, which "
                              f"read the same {what} input (in {block_name}); target them all, or '{position}'")


def resolve_targets(model: nn.Module, method: str, targets: tuple[str, ...]) -> list[str]:
    """The full module names of the Linears ``targets`` select in ``model``'s transformer blocks, in model order.

    A target that selects nothing in any block, or that selects only some of the Linears reading one attention or
    MLP input, is refused in one line.
    """
    chosen, found = set(), dict.fromkeys(targets, False)
    for block_name, block, _ in find_blocks(model):
        in_block = _block_targets(block, targets)
        for target, linears in in_block.items():
            found[target] |= bool(linears)
        picked = {id(m) for linears in in_block.values() for m in linears}
        _refuse_partial(method, block_name, block, picked)
        chosen |= picked
    missing = [t for t, hit in found.items() if not hit]
    if missing:
        raise ConfigError(f"{method} targets {', '.join(missing)}: no such position or Linear in "
                          f"{type(model).__name__}'s transformer blocks; use att, mlp or a Linear's name there")
    return [name for name, m in model.named_modules() if id(m) in chosen]
