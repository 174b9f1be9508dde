"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors`` (PEFT-like), checked on load.

The file holds one named adapter's parameters and the classifier head. Adapter tensors are stored under
names that depend on the model's blocks, not on how arcvit wraps them: ``shared.<position>.<stage>`` for the
shared projections and ``site.<block index>.<position>.scale|bias`` per site, so one file loads onto any
adapter name. The JSON records arcvit's version, the ARC config, the backbone (library, name, class) and a
fingerprint of its frozen weights, so that loading onto another backbone, an altered one, or with another
rank fails with a message saying what differs, never a silent partial load. Version-1 files (arcvit 0.1,
tensors under module names) still load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from arcvit import __version__
from arcvit.core import headers
from arcvit.core.arc import (
    DEFAULT_NAME,
    SHARED_ATTR,
    active_adapter,
    adapter_names,
    apply_arc,
    arc_config,
    backbone_fingerprint,
    delete_adapter,
    head_parameter_names,
    set_active_adapter,
    shared_sets,
    site_wrappers,
)
from arcvit.core.config import ARCConfig
from arcvit.core.sites import find_blocks
from arcvit.core.specs import backend_for
from arcvit.errors import AdapterFileError, ArcvitError
from arcvit.fileio import atomic_path, sha256_file, write_json, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "arcvit-adapter"
FORMAT_VERSION = 2  # the paper's ARC: unchanged since arcvit 0.2
EXTENDED_VERSION = 3  # ARC+ (ARCConfig extensions on): an older arcvit refuses the file by its version
READABLE_VERSIONS = (1, 2, 3)
_V1_SITE = re.compile(r"^(?P<block>.+)\.(?P<host>attn|mlp)(?:\.(?:qkv|fc1))?\.adapter\.(?P<what>scale|bias)$")


@dataclass
class AdapterContents:
    """A validated adapter folder: its metadata, ARC config, adapter tensors (file names) and head tensors."""

    meta: dict
    config: ARCConfig
    tensors: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")


def backbone_identity(model: nn.Module) -> dict:
    """Library, name and class of a model, as its backend names it."""
    return backend_for(model).identity(model)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s parameters under their file names (``shared.*``, ``site.*``)."""
    out = {f"shared.{n}": p for n, p in shared_sets(model)[name].named_parameters()}
    for index, position, wrapper, _ in site_wrappers(model, name):
        for what, p in wrapper.get(name).named_parameters():
            out[f"site.{index}.{position}.{what}"] = p
    return out


def _head_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in sorted(head_parameter_names(model))}


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None, extra: dict | None = None) -> Path:
    """Write adapter ``name`` (the active one by default) and the head to ``directory``, atomically."""
    config = arc_config(model, name)
    name = name or active_adapter(model)
    directory = Path(directory)
    tensors = adapter_tensors(model, name) | _head_tensors(model)
    head = [p for n, p in _head_tensors(model).items() if n.endswith("weight")]
    # Both files are written to temporary paths and renamed into place only once both are complete: a failure
    # while writing either leaves an existing adapter intact (the weights are renamed just before the config
    # that carries their checksum).
    with atomic_path(directory / CONFIG_NAME) as config_tmp, atomic_path(directory / WEIGHTS_NAME) as weights_tmp:
        write_safetensors(weights_tmp, tensors, metadata={"format": FORMAT})
        write_json(config_tmp, {
            "format": FORMAT,
            "format_version": EXTENDED_VERSION if config.extended else FORMAT_VERSION,
            "arcvit_version": __version__,
            "arc_config": config.to_dict(),
            "backbone": {**backbone_identity(model), "fingerprint": backbone_fingerprint(model)},
            "num_classes": int(head[0].shape[0]) if head else None,
            "tensors": {key: list(t.shape) for key, t in tensors.items()},
            "weights_sha256": sha256_file(weights_tmp),
            **({"extra": extra} if extra else {}),
        })
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """Read and validate ``adapter_config.json`` (without touching the weights)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter folder")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{path}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = headers.read_json_file(path)
    except headers.HeaderError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not an arcvit adapter config (format field is not {FORMAT!r})")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise AdapterFileError(f"{path}: format_version {version!r} is not supported "
                               f"(this arcvit reads {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        _check_fields(meta)
        ARCConfig.from_dict(meta["arc_config"])
    except headers.HeaderError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    except (TypeError, ArcvitError) as e:
        raise AdapterFileError(f"{path}: bad arc_config ({e})") from None
    meta["backbone"].setdefault("library", "timm")  # version 1 was timm-only
    return meta


_ARC_BOOLS = ("bias", "train_head", "zero_head")
MAX_RANK = 65_536  # a larger rank in a header is refused before any projection is allocated


def _check_fields(meta: dict) -> None:
    """Every field arcvit reads from an adapter config, by type and bounds (``extra`` is the writer's own
    record: only its ``task`` and ``class_names`` are read, so only they are checked)."""
    headers.optional_text(meta.get("arcvit_version"), "arcvit_version")
    arc = headers.mapping(meta.get("arc_config"), "arc_config")
    headers.count(arc.get("rank"), "arc_config.rank", high=MAX_RANK)
    for name in _ARC_BOOLS:
        if name in arc and type(arc[name]) is not bool:
            raise headers.HeaderError(f"field arc_config.{name}: expected true or false, got {arc[name]!r}")
    if "dropout" in arc and type(arc["dropout"]) not in (int, float):
        raise headers.HeaderError(f"field arc_config.dropout: expected a number, got {arc['dropout']!r}")
    backbone = headers.mapping(meta.get("backbone"), "backbone")
    for name in ("library", "name", "class", "fingerprint", "head"):
        optional = name == "head" or (name == "library" and meta["format_version"] == 1)
        if not optional or backbone.get(name) is not None:
            headers.text(backbone.get(name), f"backbone.{name}", headers.MAX_PATH_TEXT)
    num_classes = meta.get("num_classes")
    if num_classes is not None:
        headers.count(num_classes, "num_classes")
    headers.text(meta.get("weights_sha256"), "weights_sha256")
    headers.mapping(meta.get("tensors"), "tensors", optional=True)
    extra = headers.mapping(meta.get("extra"), "extra", optional=True) or {}
    headers.optional_text(extra.get("task"), "extra.task")
    headers.class_names(extra.get("class_names"), "extra.class_names", num_classes)


def read_adapter(directory: str | Path) -> AdapterContents:
    """A checked adapter folder: config, checksum, and every tensor read (head tensors kept apart)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: missing")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise AdapterFileError(f"{weights}: checksum does not match {CONFIG_NAME} (truncated or corrupt file)")
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from None
    is_adapter = (lambda k: k.startswith(("shared.", "site."))) if meta["format_version"] >= 2 \
        else (lambda k: k.startswith(f"{SHARED_ATTR}.") or ".adapter." in k)
    config = ARCConfig.from_dict(meta["arc_config"])
    _check_rank(weights, tensors, config.rank, meta["format_version"])
    return AdapterContents(meta, config, {k: v for k, v in tensors.items() if is_adapter(k)},
                           {k: v for k, v in tensors.items() if not is_adapter(k)})


def _check_rank(weights: Path, tensors: dict[str, torch.Tensor], rank: int, version: int) -> None:
    """The shared projections (d x r) have the config's rank: checked before any projection is allocated."""
    prefix = "shared." if version >= 2 else f"{SHARED_ATTR}."
    for key, tensor in tensors.items():
        if key.startswith(prefix) and (tensor.dim() != 2 or tensor.shape[1] != rank):
            raise AdapterFileError(f"{weights}: {key} has shape {tuple(tensor.shape)}, but {CONFIG_NAME} says "
                                   f"rank {rank} (another rank?)")


def _v1_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version-1 module names (``arc.att.0``, ``blocks.3.attn.qkv.adapter.scale``) as version-2 file names."""
    index = {name: i for i, (name, _, _) in enumerate(find_blocks(model))}
    out = {}
    for key, tensor in tensors.items():
        site = _V1_SITE.match(key)
        if key.startswith(f"{SHARED_ATTR}."):
            out["shared." + key[len(SHARED_ATTR) + 1:]] = tensor
        elif site and site["block"] in index:
            position = "att" if site["host"] == "attn" else "mlp"
            out[f"site.{index[site['block']]}.{position}.{site['what']}"] = tensor
        else:
            out[key] = tensor  # reported as unexpected below
    return out


def _check_backbone(model: nn.Module, directory: Path, meta: dict, check_fingerprint: bool) -> None:
    saved, own = meta["backbone"], backbone_identity(model)
    if (saved["library"], saved["name"], saved["class"]) != (own["library"], own["name"], own["class"]):
        show = (lambda b: f"{b['library']} {b['name']}") if saved["library"] != own["library"] else \
            (lambda b: b["name"])
        raise AdapterFileError(f"{directory}: adapter was trained on {show(saved)} ({saved['class']}), "
                               f"not on {show(own)} ({own['class']})")
    # Checked before anything is applied, so that a refused load leaves ``model`` untouched (adapters and
    # head are left out of the fingerprint).
    if check_fingerprint:
        fingerprint = backbone_fingerprint(model)
        if fingerprint != saved["fingerprint"]:
            raise AdapterFileError(f"{directory}: the backbone weights differ from those the adapter was trained "
                                   f"on (fingerprint {fingerprint[:12]} vs {saved['fingerprint'][:12]})")


def _copy_into(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], weights: Path) -> None:
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterFileError(f"{weights}: tensors do not match the model "
                               f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for key, tensor in tensors.items():
        if tensor.shape != params[key].shape:
            raise AdapterFileError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                   f"{tuple(params[key].shape)} (another rank or number of classes?)")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT_NAME, check_backbone: bool = True,
                 load_head: bool = True, contents: AdapterContents | None = None) -> nn.Module:
    """Apply ARC to ``model`` as saved in ``directory``, as adapter ``name``, and load its weights (and head).

    ``model`` is a fresh backbone of the kind the adapter was trained on (it may hold other named adapters).
    ``contents``: what ``read_adapter(directory)`` returned earlier (and the caller checked further), used
    instead of reading the files again, which may have changed since.
    Every mismatch raises AdapterFileError naming what differs, and leaves ``model`` as it came.
    """
    directory = Path(directory)
    contents = contents if contents is not None else read_adapter(directory)
    _check_backbone(model, directory, contents.meta, check_backbone)
    weights = directory / WEIGHTS_NAME
    tensors = contents.tensors if contents.meta["format_version"] >= 2 else _v1_names(model, contents.tensors)
    if name in adapter_names(model):  # the same adapter already applied: load its tensors into it
        if arc_config(model, name) != contents.config:
            raise AdapterFileError(f"{directory}: model already has ARC with {arc_config(model, name)}, "
                                   f"the file has {contents.config}")
        _copy_into(adapter_tensors(model, name), tensors, weights)
        if load_head:
            _copy_into(_head_tensors(model), contents.head, weights)
        return model
    head = _head_tensors(model) if load_head else {}
    before = {n: p.detach().clone() for n, p in head.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    active = active_adapter(model) if adapter_names(model) else None
    apply_arc(model, contents.config, name)
    try:
        _copy_into(adapter_tensors(model, name), tensors, weights)
        if load_head:
            _copy_into(head, contents.head, weights)
    except AdapterFileError:  # a refused load leaves the model as it came
        delete_adapter(model, name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in before:
                    p.copy_(before[n])
                p.requires_grad_(flags[n])
        if active is not None:
            set_active_adapter(model, active)
        raise
    return model
