"""Apply ARC to a timm model, count what trains, and merge the adapters back into plain timm weights."""
from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn as nn

from arcvit.config import ARCConfig
from arcvit.errors import ModelError
from arcvit.layers import ARCAdapter, ARCInput, ARCLinear, ARCShared
from arcvit.sites import find_sites, key_bias_is_invariant, readers

SHARED_ATTR = "arc"


def is_adapted(model: nn.Module) -> bool:
    return isinstance(getattr(model, SHARED_ATTR, None), ARCShared)


def arc_config(model: nn.Module) -> ARCConfig:
    if not is_adapted(model):
        raise ModelError(f"{type(model).__name__} has no ARC adapters (call arcvit.apply_arc first)")
    return getattr(model, SHARED_ATTR).config


def _check_mergeable(model: nn.Module, host: nn.Module, where: str) -> None:
    """Refuse at apply time, not after training, a site whose bias b could not be folded exactly."""
    for reader in readers(host):
        for slot in reader.slots:
            if slot.owner is not None:
                continue
            if not slot.is_key:
                raise ModelError(f"{where}: {type(reader.linear).__name__} rows {slot.start}:{slot.stop} have no "
                                 "bias to fold ARC's bias b into, so the adapter could not be merged; "
                                 "use ARCConfig(bias=False)")
            if not key_bias_is_invariant(model, host):
                raise ModelError(f"{where}: this attention has no key bias and uses rotary embeddings or a key "
                                 "norm, so ARC's bias b could not be merged exactly; use ARCConfig(bias=False)")


def apply_arc(model: nn.Module, config: ARCConfig | None = None) -> nn.Module:
    """Add ARC adapters to a timm ViT-family or Swin model in place, freeze the backbone, and return it.

    Trainable afterwards: the shared down-projections, every rescale vector and bias, and (unless
    ``config.train_head`` is False) the classifier head, zeroed first when ``config.zero_head``.
    """
    config = config or ARCConfig()
    if is_adapted(model):
        raise ModelError(f"{type(model).__name__} already has ARC adapters")
    sites = find_sites(model, config.positions, config.blocks)
    if config.bias:
        for site in sites:
            _check_mergeable(model, getattr(site.parent, site.attr), f"{site.block_name} ({site.position})")

    reference = next(model.parameters())
    stage_dims: dict[int, int] = {}
    for site in sites:
        if stage_dims.setdefault(site.stage, site.dim) != site.dim:
            raise ModelError(f"{site.block_name}: width {site.dim} differs from the rest of its stage "
                             f"({stage_dims[site.stage]}); one shared projection per stage needs one width")
    if config.rank > min(stage_dims.values()):
        raise ModelError(f"rank {config.rank} exceeds the model's width {min(stage_dims.values())}: "
                         "the shared projection D (width x rank) would have more columns than dimensions")
    n_stages = max(stage_dims) + 1
    shared = ARCShared([stage_dims.get(s, 0) for s in range(n_stages)], config.rank, config.positions)
    shared.config = config
    shared.to(device=reference.device, dtype=reference.dtype)

    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, SHARED_ATTR, shared)
    for site in sites:
        adapter = ARCAdapter(shared, site.position, site.stage, site.dim, config.rank, config.dropout,
                             config.bias).to(device=reference.device, dtype=reference.dtype)
        adapter.train(model.training)
        host = getattr(site.parent, site.attr)
        wrapped = ARCLinear(host, adapter, config.impl == "lowrank") if site.single_linear \
            else ARCInput(host, adapter)
        setattr(site.parent, site.attr, wrapped)

    head = classifier(model)
    if head is not None:
        if config.zero_head:
            with torch.no_grad():
                for p in head.parameters():
                    p.zero_()
        for p in head.parameters():
            p.requires_grad_(config.train_head)
    return model


def classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
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


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of ARC's own parameters: the shared projections, every rescale vector and bias."""
    ids = {id(p) for m in model.modules() if isinstance(m, (ARCShared, ARCAdapter)) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@torch.no_grad()
def _fold(adapter: ARCAdapter, host: nn.Module) -> None:
    for reader in readers(host):
        weight = reader.linear.weight
        folded, shift = adapter.fold(weight)
        if shift is not None:
            for slot in reader.slots:
                if slot.owner is not None:
                    slot.bias_view().add_(shift[slot.start:slot.stop])
        weight.copy_(folded)


def _unwrap(model: nn.Module, fold: bool) -> None:
    """Put every wrapped module back in its place, folding its adapter into it first when ``fold``."""
    for name, wrapper in [(n, m) for n, m in model.named_modules() if isinstance(m, (ARCLinear, ARCInput))]:
        host = wrapper.base if isinstance(wrapper, ARCLinear) else wrapper.inner
        if fold:
            _fold(wrapper.adapter, host)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, host)
    delattr(model, SHARED_ATTR)


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every adapter into the Linear layers that read it and return a plain timm model.

    The result has the backbone's class, no arcvit module, and exactly the state-dict keys of the
    un-adapted model. With ``inplace=False`` (default) ``model`` is left untouched and usable; with
    ``inplace=True`` the fold happens in ``model`` itself, one layer at a time, so that a very large
    model is merged without a second copy in memory.
    """
    arc_config(model)  # raises if there is nothing to merge
    target = model if inplace else copy.deepcopy(model)
    _unwrap(target, fold=True)
    for p in target.parameters():
        p.requires_grad_(True)
    return target


def remove_arc(model: nn.Module) -> nn.Module:
    """Take the adapters out without folding them (the backbone's own weights are untouched by ARC)."""
    arc_config(model)
    _unwrap(model, fold=False)
    return model


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen backbone's tensors under timm's own names: no adapter, no head, wrappers unwrapped."""
    prefixes = {f"{n}.{'base' if isinstance(m, ARCLinear) else 'inner'}.": f"{n}."
                for n, m in model.named_modules() if isinstance(m, (ARCLinear, ARCInput))}
    skip = set(adapter_parameter_names(model)) | head_parameter_names(model)
    out = {}
    for key, tensor in model.state_dict().items():
        if key in skip or key.startswith(f"{SHARED_ATTR}.") or ".adapter." in key:
            continue
        for wrapped, plain in prefixes.items():
            if key.startswith(wrapped):
                key = plain + key[len(wrapped):]
                break
        out[key] = tensor
    return out


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen backbone's names, dtypes, shapes and bytes: identifies the exact weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(backbone_state_dict(model).items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
