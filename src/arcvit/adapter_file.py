"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors`` (PEFT-like), checked on load.

The file holds ARC's parameters and the classifier head. The JSON records arcvit's version, the ARC config,
the backbone's timm name and a fingerprint of its frozen weights, so that loading onto another backbone, an
altered one, or with another rank fails with a message saying what differs, never a silent partial load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from arcvit import __version__
from arcvit.arc import (adapter_parameter_names, apply_arc, arc_config, backbone_fingerprint,
                        head_parameter_names, is_adapted, remove_arc)
from arcvit.config import ARCConfig
from arcvit.errors import AdapterFileError, ArcvitError
from arcvit.fileio import atomic_path, sha256_file, write_json, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "arcvit-adapter"
FORMAT_VERSION = 1


def backbone_name(model: nn.Module) -> str:
    """The timm name a model was created under (its class name when built by hand)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _saved_names(model: nn.Module) -> list[str]:
    return adapter_parameter_names(model) + sorted(head_parameter_names(model))


def save_adapter(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write the adapter (ARC parameters and head) of an adapted model to ``directory``, atomically."""
    config = arc_config(model)
    directory = Path(directory)
    params = dict(model.named_parameters())
    tensors = {name: params[name] for name in _saved_names(model)}
    head = [params[n] for n in head_parameter_names(model) if n.endswith("weight")]
    # Both files are written to temporary paths first and only renamed into place once both are complete:
    # a failure while writing either one leaves an existing adapter in ``directory`` intact (inner context
    # exits first, so the weights are renamed just before the config that carries their checksum).
    with atomic_path(directory / CONFIG_NAME) as config_tmp, atomic_path(directory / WEIGHTS_NAME) as weights_tmp:
        write_safetensors(weights_tmp, tensors, metadata={"format": FORMAT})
        write_json(config_tmp, {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arcvit_version": __version__,
            "arc_config": config.to_dict(),
            "backbone": {"name": backbone_name(model), "class": type(model).__name__,
                         "fingerprint": backbone_fingerprint(model)},
            "num_classes": int(head[0].shape[0]) if head else None,
            "tensors": {name: list(t.shape) for name, t in tensors.items()},
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
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not an arcvit adapter config (format field is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                               f"(this arcvit reads {FORMAT_VERSION})")
    try:
        ARCConfig.from_dict(meta["arc_config"])
    except (KeyError, TypeError, ArcvitError) as e:
        raise AdapterFileError(f"{path}: bad arc_config ({e})") from None
    return meta


def load_adapter(model: nn.Module, directory: str | Path, check_backbone: bool = True) -> nn.Module:
    """Apply ARC to ``model`` as saved in ``directory`` and load the adapter and head weights into it.

    ``model`` is a fresh backbone of the kind the adapter was trained on (or one already adapted with the
    same config). Every mismatch raises AdapterFileError naming what differs.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    config = ARCConfig.from_dict(meta["arc_config"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: missing")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise AdapterFileError(f"{weights}: checksum does not match {CONFIG_NAME} (truncated or corrupt file)")

    saved = meta["backbone"]
    name = backbone_name(model)
    if name != saved["name"] or type(model).__name__ != saved["class"]:
        raise AdapterFileError(f"{directory}: adapter was trained on {saved['name']} ({saved['class']}), "
                               f"not on {name} ({type(model).__name__})")
    if is_adapted(model) and arc_config(model) != config:
        raise AdapterFileError(f"{directory}: model already has ARC with {arc_config(model)}, "
                               f"the file has {config}")
    # Check the backbone before apply_arc, so that a refused load leaves ``model`` untouched (the fingerprint
    # of a plain model and of the same model adapted are equal: adapters and head are left out of it).
    if check_backbone:
        fingerprint = backbone_fingerprint(model)
        if fingerprint != saved["fingerprint"]:
            raise AdapterFileError(f"{directory}: the backbone weights differ from those the adapter was trained "
                                   f"on (fingerprint {fingerprint[:12]} vs {saved['fingerprint'][:12]})")
    if is_adapted(model):
        _load_tensors(model, weights)
        return model
    head = head_parameter_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in head}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_arc(model, config)
    try:
        _load_tensors(model, weights)
    except AdapterFileError:  # a refused load leaves the model as it came
        remove_arc(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in before:
                    p.copy_(before[n])
                p.requires_grad_(flags[n])
        raise
    return model


def _load_tensors(model: nn.Module, weights: Path) -> None:
    params = dict(model.named_parameters())
    expected = _saved_names(model)
    try:
        with safe_open(weights, framework="pt") as f:
            found = set(f.keys())
            missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
            if missing or unexpected:
                raise AdapterFileError(f"{weights}: tensors do not match the model "
                                       f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
            tensors = {k: f.get_tensor(k) for k in expected}
    except SafetensorError as e:
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():
        if tensor.shape != params[key].shape:
            raise AdapterFileError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                   f"{tuple(params[key].shape)} (another rank or number of classes?)")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
