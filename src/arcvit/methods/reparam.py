"""What the structurally re-parameterisable methods (SSF, RepAdapter, FacT, RLRR) share: a trained module hung on
one of the model's own layers, and a merge that folds it into that layer's weights and takes it away again.

A ``Reparam`` is a child of the layer it changes (``blocks.0.attn.qkv.ssf``), run by a forward hook: an
``output`` reparam maps the layer's (input, output) to a new output, an ``input`` reparam maps the layer's first
input to a new one. The model's own modules keep their classes and state-dict keys, so every family arcvit knows
(its block specs, norms, heads) still reads them as before, and merging leaves exactly the plain model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn as nn

from arcvit.core.sites import find_blocks
from arcvit.errors import ModelError

INPUT_KWARGS = ("hidden_states", "x")  # where a layer called with keywords receives its input


class Reparam(nn.Module):
    """A trained change to one layer; ``fold`` writes it into the layer so that the layer alone computes it."""

    kind = "output"  # or "input"

    def fold(self, layer: nn.Module) -> None:
        raise NotImplementedError


def _output_hook(attr: str, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(layer, attr)(args[0], output, layer)


def _input_hook(attr: str, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    reparam = getattr(layer, attr)
    if args:
        return (reparam(args[0]), *args[1:]), kwargs
    key = next((k for k in INPUT_KWARGS if k in kwargs), None)
    if key is None:
        raise ModelError(f"{type(layer).__name__} was called without an input {attr} can find")
    return args, {**kwargs, key: reparam(kwargs[key])}


def attach(layer: nn.Module, attr: str, reparam: Reparam) -> None:
    """Hang ``reparam`` on ``layer`` as ``layer.<attr>``, on the layer's device and dtype, and run it on every call."""
    if hasattr(layer, attr):
        raise ModelError(f"{type(layer).__name__} already has an attribute {attr!r}; prepare a fresh backbone")
    like = next(layer.parameters(), None)
    if like is not None:
        reparam = reparam.to(device=like.device, dtype=like.dtype)
    layer.add_module(attr, reparam)
    if reparam.kind == "input":
        layer.register_forward_pre_hook(partial(_input_hook, attr), with_kwargs=True)
    else:
        layer.register_forward_hook(partial(_output_hook, attr))


def _ours(hook: object) -> bool:
    return isinstance(hook, partial) and hook.func in (_input_hook, _output_hook)


def reparams(model: nn.Module) -> Iterator[tuple[nn.Module, str, Reparam]]:
    """(layer, attribute, reparam) for every reparam in ``model``."""
    for layer in list(model.modules()):
        for attr, child in list(layer.named_children()):
            if isinstance(child, Reparam):
                yield layer, attr, child


def has_reparams(model: nn.Module) -> bool:
    return next(reparams(model), None) is not None


def merger(method: str, attr: str, shared: tuple[str, ...] = ()) -> Callable[[nn.Module], nn.Module]:
    """The merge of a method whose reparams hang at ``attr``: refuses a model that carries others, or none."""
    def merge(model: nn.Module) -> nn.Module:
        found = {a for _, a, _ in reparams(model)}
        if found != {attr} or not all(hasattr(model, name) for name in shared):
            raise ModelError(f"{method}: expected a model prepared with {method}, got {type(model).__name__}"
                             + (f" carrying {', '.join(sorted(found))}" if found else " without its modules"))
        return fold_all(model, shared)
    return merge


@torch.no_grad()
def fold_all(model: nn.Module, shared: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` with every reparam folded into its layer and removed, hooks and ``shared`` root
    attributes (tensors several reparams read) included: the plain model's class and keys."""
    target = copy.deepcopy(model)
    for layer, attr, reparam in list(reparams(target)):
        reparam.fold(layer)
        delattr(layer, attr)
        for hooks in (layer._forward_hooks, layer._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if _ours(hook) and hook.args == (attr,)]:
                del hooks[key]
    for name in shared:
        delattr(target, name)
    return target


def _reads_qkv_weight(module: nn.Module) -> bool:
    """timm's BEiT and EVA attention with separate q/v biases compute ``F.linear(x, qkv.weight, bias)`` instead
    of calling ``qkv``: a hook on that Linear, or a wrapper around it, would never run in training."""
    return (isinstance(getattr(module, "qkv", None), nn.Linear) and getattr(module, "q_bias", None) is not None
            and not getattr(module, "qkv_bias_separate", False))


def refuse_bypassed_qkv(model: nn.Module, method: str) -> None:
    """Refuse, before training, a model whose fused qkv Linear is never called as a module: the method would
    not act on it in training, but its merge would fold it in."""
    found = next((name for name, module in model.named_modules() if _reads_qkv_weight(module)), None)
    if found is not None:
        raise ModelError(f"{method}: {type(model).__name__}'s attention ({found}) reads its qkv weight directly "
                         "(separate q/v biases), so the method could not act on qkv; use a ViT, DeiT or Swin")


def block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Every Linear inside the model's transformer blocks (a family arcvit does not know is refused here)."""
    for block_name, block, _ in find_blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                yield f"{block_name}.{name}", module


def outside(head: str) -> Callable[[str], bool]:
    """Whether a module name lies outside the classifier ``head`` (its own adapters are never added there)."""
    return lambda name: name != head and not name.startswith(head + ".")
