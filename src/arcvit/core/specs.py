"""What the core knows about model families: block specs and model backends, registered by each backend.

The core never imports a model library. A backend (``arcvit.backends.timm``, ``arcvit.backends.transformers``)
registers, when it is imported:

- one ``BlockSpec`` per family of pre-norm transformer blocks: where a block's attention and MLP read their
  normalised input, which Linear layers read it (with the bias slots a merge adds ``W b`` to), and whether a
  bias on the attention keys is softmax-invariant there;
- one ``ModelBackend``: how to find a model's classifier head and how to name the model in adapter files.

Optional backends are registered lazily by module prefix, so that a library is only imported once a model
of that library is actually handed to arcvit.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch.nn as nn

from arcvit.errors import ModelError

POSITIONS = ("att", "mlp")


@dataclass
class BiasSlot:
    """Rows ``start:stop`` of a reader's output and where their bias lives (``owner.name``, from row 0).

    ``owner`` is None where the model has no bias for those rows. That is exact only for attention keys:
    a constant added to every key shifts each query's logits by one constant, which softmax ignores.
    """

    start: int
    stop: int
    owner: nn.Module | None
    name: str | None = None
    is_key: bool = False

    def bias_view(self):
        """The bias rows for this slot (a view into the owner's parameter)."""
        bias = getattr(self.owner, self.name)
        return bias if bias.numel() == self.stop - self.start else bias[self.start:self.stop]


@dataclass
class Reader:
    """A Linear layer that reads a site's input, and the bias slots of its output."""

    linear: nn.Linear
    slots: list[BiasSlot]


def own_bias(linear: nn.Linear, is_key: bool = False) -> list[BiasSlot]:
    """The slot of a Linear that carries its own bias (or none: ``owner`` None)."""
    return [BiasSlot(0, linear.out_features, linear if linear.bias is not None else None, "bias", is_key)]


@dataclass(frozen=True)
class Place:
    """Where one position's input is read in a block: the norm that produces it (None for the added positions
    ``proj`` and ``fc2``, whose input comes from inside the attention or MLP) and the module that reads it."""

    norm: str | None
    host: str


# ARC+'s added positions (``ARCConfig.extra_positions``): the input of the attention's output projection and of
# the MLP's second Linear, each read by one Linear of the host; a family that defines them lists them here.
EXTRA_PLACES = {"proj": Place(None, "attn"), "fc2": Place(None, "mlp")}


@dataclass(frozen=True)
class BlockSpec:
    """One family of pre-norm transformer blocks, as the core needs to know it.

    readers(host, position): the Linear layers that read the host's input, with their bias slots.
    single_linear(host, position): the attribute of the host's only reader when that Linear is called as a
        module on exactly the site input (the adapter can then wrap it); None otherwise.
    key_bias_invariant(model, attention): whether a bias added to every key leaves attention unchanged.
    norm_feeds_site(block, position): whether the output of the position's norm reaches its readers token for
        token (nothing padded in between), so that the adapter can sit on the norm (``impl="fused"``).
    """

    name: str
    block_types: tuple[type, ...]
    readers: Callable[[nn.Module, str], list[Reader]]
    single_linear: Callable[[nn.Module, str], str | None]
    key_bias_invariant: Callable[[nn.Module, nn.Module], bool]
    places: dict[str, Place] = field(default_factory=lambda: {"att": Place("norm1", "attn"),
                                                               "mlp": Place("norm2", "mlp")})
    norm_feeds_site: Callable[[nn.Module, str], bool] = lambda block, position: True


class ModelBackend(Protocol):
    """How the core talks to one model library (timm, transformers) without importing it."""

    name: str

    def owns(self, model: nn.Module) -> bool: ...

    def classifier(self, model: nn.Module) -> nn.Module | None: ...

    def identity(self, model: nn.Module) -> dict: ...


_BLOCK_SPECS: list[BlockSpec] = []
_BACKENDS: list[ModelBackend] = []
_LAZY: dict[str, str] = {}  # class module prefix -> module that registers the backend when imported


def register_block_spec(spec: BlockSpec) -> BlockSpec:
    if any(s.name == spec.name for s in _BLOCK_SPECS):
        raise ValueError(f"block spec {spec.name!r} is registered already")
    _BLOCK_SPECS.append(spec)
    return spec


def registered_block_specs() -> tuple[BlockSpec, ...]:
    return tuple(_BLOCK_SPECS)


def register_backend(backend: ModelBackend) -> ModelBackend:
    _BACKENDS.append(backend)
    return backend


def register_lazy_backend(module_prefix: str, import_path: str) -> None:
    """Import ``import_path`` (which registers itself) the first time a model from ``module_prefix`` is seen."""
    _LAZY[module_prefix] = import_path


def _load_lazy_backends(model: nn.Module) -> None:
    modules = {type(m).__module__ for m in model.modules()}
    for prefix, path in list(_LAZY.items()):
        if any(name.startswith(prefix) for name in modules):
            del _LAZY[prefix]
            try:
                importlib.import_module(path)
            except ModuleNotFoundError as e:
                raise ModelError(f"{type(model).__name__} needs arcvit's {path.rsplit('.', 1)[-1]} backend, "
                                 f"which could not be imported ({e}); install arcvit[{path.rsplit('.', 1)[-1]}]") \
                    from None


def block_spec_for(module: nn.Module) -> BlockSpec | None:
    for spec in _BLOCK_SPECS:
        if isinstance(module, spec.block_types):
            return spec
    return None


def backend_for(model: nn.Module) -> ModelBackend:
    """The backend that owns ``model``; loads a lazily registered one first."""
    _load_lazy_backends(model)
    for backend in _BACKENDS:
        if backend.owns(model):
            return backend
    raise ModelError(f"{type(model).__name__} ({type(model).__module__}) comes from no model library arcvit "
                     f"supports ({', '.join(b.name for b in _BACKENDS)})")


def ensure_backends(model: nn.Module) -> None:
    """Make sure the specs of every library ``model`` is built from are registered."""
    _load_lazy_backends(model)
