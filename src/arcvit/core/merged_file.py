"""Merged checkpoints: the plain backbone state dict an adapter folds into, as ``.safetensors``, with arcvit's
description of it (``info``) and its checksums in the file's own header, checked on every read.

A merged file is a single file that is copied around on its own (unlike an adapter folder, it has no
separate config to hold a checksum), so the checksums live in the safetensors metadata: ``tensors_sha256``
over the tensors, and ``sha256`` over the whole metadata (``info`` and ``tensors_sha256``), so that an edited
header (permuted class names, another class count or backbone) is caught as surely as an edited tensor.
A checksum finds corruption and careless edits, not a forger who recomputes it: files from untrusted
sources stay untrusted. Files without ``sha256`` (edited, or written by an older arcvit) are refused unless
the reader allows unverified files (``--allow-unverified``); their header is then still validated.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from arcvit.core import headers
from arcvit.core.arc import head_parameter_names
from arcvit.errors import ConfigError, ModelError
from arcvit.fileio import tensors_sha256, write_safetensors

META_KEY = "arcvit_merged"
TENSORS_SHA_KEY = "tensors_sha256"
SHA_KEY = "sha256"
INFO_FIELDS = ("backbone", "num_classes", "class_names", "task", "source_adapter")
UNVERIFIED_HINT = "pass --allow-unverified to use it anyway"


def header_sha256(metadata: dict[str, str]) -> str:
    """sha256 of every metadata entry but the checksum itself, in a canonical order."""
    body = {k: v for k, v in metadata.items() if k != SHA_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                None)


def write_merged(path: str | Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write ``state`` with ``info`` (JSON) and its checksums; refuses non-finite weights and an invalid
    ``info`` (nothing written)."""
    check_info(path, info)
    name = nonfinite_tensor(state)
    if name is not None:
        raise ModelError(f"{path}: not written: merged weight {name} holds non-finite values (NaN/inf); "
                         "the adapter or the backbone checkpoint is broken")
    metadata = {META_KEY: json.dumps(info), TENSORS_SHA_KEY: tensors_sha256(state, state.__getitem__)}
    write_safetensors(path, state, metadata={**metadata, SHA_KEY: header_sha256(metadata)})


def read_merged_info(path: str | Path, allow_unverified: bool = False) -> dict[str, Any]:
    """The ``info`` a merged checkpoint was written with, after checking its header and tensors against its
    checksums and every field of ``info``. ``allow_unverified``: accept a file without a header checksum."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise ConfigError(f"{path}: not a merged arcvit checkpoint (write one with `arcvit merge`)")
            _verify(path, meta, allow_unverified)
            if TENSORS_SHA_KEY in meta and tensors_sha256(f.keys(), f.get_tensor) != meta[TENSORS_SHA_KEY]:
                raise ModelError(f"{path}: checksum mismatch: its tensors differ from the SHA-256 recorded when "
                                 "it was written (corrupt or edited file)")
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        info = headers.parse_json(meta[META_KEY], META_KEY)
    except headers.HeaderError as e:
        raise ModelError(f"{path}: {e}") from None
    check_info(path, info)
    return info


def _verify(path: str | Path, meta: dict[str, str], allow_unverified: bool) -> None:
    """The header checksum: present and matching, or absent and allowed."""
    if SHA_KEY not in meta:
        if not allow_unverified:
            raise ModelError(f"{path}: refused: no checksum over its header, so its class names and settings "
                             "cannot be verified (edited, or written by an older arcvit): run `arcvit merge` "
                             f"again, or {UNVERIFIED_HINT}")
        return
    if meta[SHA_KEY] != header_sha256(meta):
        raise ModelError(f"{path}: checksum mismatch: its header (backbone, classes, names) differs from the "
                         "SHA-256 recorded when it was written (edited file)")


def check_info(path: str | Path, info: Any) -> None:
    """Every field of a merged file's ``info``: types, bounds, and class names that fit the class count."""
    try:
        headers.mapping(info, META_KEY)
        headers.only_fields(info, INFO_FIELDS, META_KEY)
        headers.text(info.get("backbone"), "backbone", headers.MAX_PATH_TEXT)
        num_classes = headers.count(info.get("num_classes"), "num_classes")
        headers.class_names(info.get("class_names"), "class_names", num_classes)
        headers.optional_text(info.get("task"), "task")
        headers.optional_text(info.get("source_adapter"), "source_adapter", headers.MAX_PATH_TEXT)
    except headers.HeaderError as e:
        raise ModelError(f"{path}: {e}") from None


def check_head_loaded(model: torch.nn.Module, path: str | Path) -> None:
    """The merged file's own head is what ``model`` holds: each head tensor is in the file with the model's
    shape (a loader may drop a checkpoint head of another shape as "another task's", which for a merged
    file would mean a random head: every prediction wrong)."""
    own = dict(model.state_dict())
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name in sorted(head_parameter_names(model)):
            shape = tuple(f.get_slice(name).get_shape()) if name in names else None
            if shape != tuple(own[name].shape):
                raise ModelError(f"{path}: its head tensor {name} has shape {shape}, but its header's num_classes "
                                 f"gives {tuple(own[name].shape)}: the header does not describe these tensors")
