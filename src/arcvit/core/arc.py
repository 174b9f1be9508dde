"""Apply named ARC adapters to a model, choose or route between them, and merge one back into plain weights."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from arcvit.core.config import ARCConfig
from arcvit.core.fused import lean_norm_supported
from arcvit.core.layers import (
    DEFAULT_NAME,
    ARCAdapter,
    ARCInput,
    ARCLinear,
    ARCNorm,
    ARCShared,
    ARCSite,
    ARCState,
    Route,
    slot,
    slot_name,
)
from arcvit.core.sites import Site, find_blocks, find_sites
from arcvit.core.specs import backend_for, block_spec_for
from arcvit.errors import ModelError

SHARED_ATTR = "arc"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def shared_sets(model: nn.Module) -> dict[str, ARCShared]:
    """Every named adapter's shared projections (``model.arc``, ``model.arc_<name>``), by name."""
    return {slot_name(SHARED_ATTR, attr): m for attr, m in model._modules.items() if isinstance(m, ARCShared)}


def _state(model: nn.Module) -> ARCState | None:
    sets = shared_sets(model)
    return next(iter(sets.values())).state if sets else None


def is_adapted(model: nn.Module) -> bool:
    return bool(shared_sets(model))


def adapter_names(model: nn.Module) -> list[str]:
    return list(shared_sets(model))


def _require(model: nn.Module, name: str | None = None) -> tuple[ARCState, str]:
    state = _state(model)
    if state is None:
        raise ModelError(f"{type(model).__name__} has no ARC adapters (call arcvit.apply_arc first)")
    name = state.active if name is None else name
    if name not in shared_sets(model):
        raise ModelError(f"{type(model).__name__} has no ARC adapter named {name!r} "
                         f"(it has: {', '.join(adapter_names(model))})")
    return state, name


def active_adapter(model: nn.Module) -> str:
    return _require(model)[1]


def set_active_adapter(model: nn.Module, name: str) -> None:
    state, name = _require(model, name)
    state.active = name


def arc_config(model: nn.Module, name: str | None = None) -> ARCConfig:
    """The config of adapter ``name`` (the active one by default)."""
    name = _require(model, name)[1]
    return shared_sets(model)[name].config


@contextlib.contextmanager
def routed(model: nn.Module, names: Sequence[str], ids: torch.Tensor | None = None) -> Iterator[None]:
    """Inside, item ``i`` of every batch gets adapter ``names[i]`` at every site (one pass for mixed tasks), or
    ``names[ids[i]]`` when ``ids`` (int64, one per item) is given: ``names`` then lists each adapter once.

    For inference: in training mode with adapter dropout on, a mixed batch is refused (dropout is per adapter).
    """
    state, sets, chosen = _require(model)[0], shared_sets(model), set(names)
    for name in chosen - sets.keys():
        _require(model, name)  # refuses it, naming it
    if model.training and len(chosen) > 1 and any(sets[n].config.dropout > 0 for n in chosen):
        raise ModelError("routed(): a mixed-task batch runs without adapter dropout; call model.eval() first")
    state.route = Route(list(names), next(model.parameters()).device) if ids is None else \
        Route.by_ids(list(names), ids)
    try:
        yield
    finally:
        state.route = None


def _check_mergeable(model: nn.Module, site: Site) -> None:
    """Refuse at apply time, not after training, a site whose bias b could not be folded exactly."""
    where = f"{site.block_name} ({site.position})"
    for reader in site.readers():
        for bias_slot in reader.slots:
            if bias_slot.owner is not None:
                continue
            if not bias_slot.is_key:
                raise ModelError(f"{where}: {type(reader.linear).__name__} rows {bias_slot.start}:{bias_slot.stop} "
                                 "have no bias to fold ARC's bias b into, so the adapter could not be merged; "
                                 "use ARCConfig(bias=False)")
            if not site.spec.key_bias_invariant(model, site.host):
                raise ModelError(f"{where}: this attention has no key bias and uses rotary embeddings or a key "
                                 "norm, so ARC's bias b could not be merged exactly; use ARCConfig(bias=False)")


def _stage_widths(sites: list[Site], config: ARCConfig) -> dict[str, list[int]]:
    """Each position's input width per stage (0 for a stage it does not adapt): one shared D per stage and
    position needs one width there; a rank (or private rank) above a width is refused."""
    last = max(site.stage for site in sites)
    widths: dict[str, list[int]] = {}
    for position in config.positions:
        dims: dict[int, int] = {}
        for site in (s for s in sites if s.position == position):
            if dims.setdefault(site.stage, site.dim) != site.dim:
                raise ModelError(f"{site.block_name}: width {site.dim} differs from the rest of its stage "
                                 f"({dims[site.stage]}); one shared projection per stage needs one width")
        widths[position] = [dims.get(stage, 0) for stage in range(last + 1)]
    narrowest = min(site.dim for site in sites)
    for what, rank in (("rank", config.rank), ("private_rank", config.private_rank)):
        if rank > narrowest:
            raise ModelError(f"{what} {rank} exceeds the model's width {narrowest}: the projection (width x "
                             f"{what}) would have more columns than dimensions")
    return widths


def _norm_wrapper(site: Site, state: ARCState) -> ARCSite | None:
    """The wrapper around the site's norm (impl "fused"), or None where that norm or block does not allow it."""
    attr = site.spec.places[site.position].norm
    if attr is None:  # an added position (proj, fc2): no norm in front of it
        return None
    current = getattr(site.block, attr)
    if isinstance(current, ARCNorm):
        return current
    if not (lean_norm_supported(current) and site.spec.norm_feeds_site(site.block, site.position)):
        return None
    wrapper = ARCNorm(current, state, site.position)
    setattr(site.block, attr, wrapper)
    return wrapper


def _wrapper(site: Site, state: ARCState, impl: str) -> ARCSite:
    """The site's wrapper, created (around the model's own module) on the first adapter placed there.

    Impl "fused" wraps the site's norm where it is a plain LayerNorm feeding the readers token for token, and
    falls back to the wrappers of the other impls elsewhere (e.g. an RMSNorm, Swin attention that pads).
    """
    wrapper = _norm_wrapper(site, state) if impl == "fused" else None
    if wrapper is not None:
        return wrapper
    current = getattr(site.parent, site.attr)
    if isinstance(current, ARCSite):
        return current
    wrapper = ARCLinear(current, state, site.position) if site.single_linear \
        else ARCInput(current, state, site.position)
    setattr(site.parent, site.attr, wrapper)
    return wrapper


def apply_arc(model: nn.Module, config: ARCConfig | None = None, name: str = DEFAULT_NAME) -> nn.Module:
    """Add ARC adapter ``name`` to a ViT-family or Swin model in place, make it active, and return the model.

    Everything else is frozen. Trainable afterwards: the new adapter's shared down-projections, its rescale
    vectors and biases, and (unless ``config.train_head`` is False) the classifier head, zeroed first when
    ``config.zero_head``. A model can hold several named adapters (one per task, say).
    """
    config = config or ARCConfig()
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ModelError(f"adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise ModelError(f"{type(model).__name__} already has an ARC adapter named {name!r}")
    sites = find_sites(model, config.positions, config.blocks)
    if config.bias:
        for site in sites:
            _check_mergeable(model, site)
    reference = next(model.parameters())
    state = _state(model) or ARCState()
    shared = ARCShared(_stage_widths(sites, config), config, state)

    for p in model.parameters():
        p.requires_grad_(False)
    model.add_module(slot(SHARED_ATTR, name), shared.to(device=reference.device, dtype=reference.dtype))
    state.active = name
    for site in sites:
        adapter = ARCAdapter(shared, site.position, site.stage, site.dim)
        _wrapper(site, state, config.impl).add_module(slot("adapter", name),
                                         adapter.to(device=reference.device, dtype=reference.dtype))
    _prepare_head(model, config)
    model.train(model.training)  # new modules follow the model's mode (dropout off in eval)
    return model


def _prepare_head(model: nn.Module, config: ARCConfig) -> None:
    head = classifier(model)
    if head is None:
        return
    if config.zero_head:
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    for p in head.parameters():
        p.requires_grad_(config.train_head)


def classifier(model: nn.Module) -> nn.Module | None:
    """The model's classifier head, as its library defines it (None when it has no trainable head)."""
    head = backend_for(model).classifier(model)
    return head if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else None


def head_parameter_names(model: nn.Module) -> set[str]:
    head = classifier(model)
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that will train (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameter_names(model: nn.Module, name: str | None = None) -> list[str]:
    """Names of ARC's own parameters (of adapter ``name``, or of every adapter): projections, scales, biases."""
    wanted = adapter_names(model) if name is None else [name]
    modules = [shared_sets(model)[n] for n in wanted]
    modules += [m.get(n) for m in model.modules() if isinstance(m, ARCSite) for n in wanted if m.get(n) is not None]
    ids = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def site_wrappers(model: nn.Module, name: str) -> Iterator[tuple[int, str, ARCSite, nn.Module]]:
    """(block index, position, wrapper, block) for every site where adapter ``name`` sits, in forward order."""
    for index, (_, block, _) in enumerate(find_blocks(model)):
        for module in block.modules():
            if isinstance(module, ARCSite) and module.get(name) is not None:
                yield index, module.position, module, block


@torch.no_grad()
def _fold(adapter: ARCAdapter, block: nn.Module, position: str) -> None:
    """Fold ``adapter`` into the readers of a block's (unwrapped) attention or MLP."""
    spec = block_spec_for(block)
    for reader in spec.readers(getattr(block, spec.places[position].host), position):
        folded, shift = adapter.fold(reader.linear.weight)
        if shift is not None:
            for slot in reader.slots:
                if slot.owner is not None:
                    slot.bias_view().add_(shift[slot.start:slot.stop])
        reader.linear.weight.copy_(folded)


def _unwrap_all(model: nn.Module) -> None:
    """Put every wrapped module back in its place and drop every adapter's shared projections."""
    for name, wrapper in [(n, m) for n, m in model.named_modules() if isinstance(m, ARCSite)]:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper.inner)
    for name in adapter_names(model):
        delattr(model, slot(SHARED_ATTR, name))


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold the active adapter into the Linear layers that read it and return a plain model.

    The result has the backbone's class, no arcvit module, and exactly the state-dict keys of the
    un-adapted model (other named adapters are dropped). With ``inplace=False`` (default) ``model`` is left
    untouched and usable; with ``inplace=True`` the fold happens in ``model`` itself, one layer at a time,
    so that a very large model is merged without a second copy in memory.
    """
    name = active_adapter(model)
    target = model if inplace else copy.deepcopy(model)
    placed = [(wrapper.get(name), block, position) for _, position, wrapper, block in site_wrappers(target, name)]
    _unwrap_all(target)
    for adapter, block, position in placed:
        _fold(adapter, block, position)
    for p in target.parameters():
        p.requires_grad_(True)
    return target


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Take adapter ``name`` out without folding it; the last one out leaves the plain model."""
    state, name = _require(model, name)
    if adapter_names(model) == [name]:
        _unwrap_all(model)
        return model
    for _, _, wrapper, _ in list(site_wrappers(model, name)):
        delattr(wrapper, slot("adapter", name))
    delattr(model, slot(SHARED_ATTR, name))
    if state.active == name:
        state.active = adapter_names(model)[0]
    return model


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen backbone's tensors under the library's own names: no adapter, no head, wrappers unwrapped."""
    skip = set(adapter_parameter_names(model)) | head_parameter_names(model)
    out = {}
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        out[key.replace(".inner.", ".")] = tensor
    return out


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen backbone's names, dtypes, shapes and bytes: identifies the exact weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(backbone_state_dict(model).items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
