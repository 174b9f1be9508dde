"""Merged checkpoints: the plain backbone state dict an adapter folds into, as ``.safetensors``, with arcvit's
description of it and a SHA-256 of its tensors in the file's own header, checked on every read.

A merged file is a single file that is copied around on its own (unlike an adapter folder, it has no
separate config to hold a checksum), so the checksum lives in the safetensors metadata. Files written
before the checksum existed still load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from arcvit.errors import ConfigError, ModelError
from arcvit.fileio import tensors_sha256, write_safetensors

META_KEY = "arcvit_merged"
SHA_KEY = "tensors_sha256"


def write_merged(path: str | Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write ``state`` with ``info`` (JSON) and its checksum; refuses non-finite weights (nothing written)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: not written: merged weight {name} holds non-finite values (NaN/inf); "
                             "the adapter or the backbone checkpoint is broken")
    write_safetensors(path, state, metadata={META_KEY: json.dumps(info),
                                             SHA_KEY: tensors_sha256(state, state.__getitem__)})


def read_merged_info(path: str | Path) -> dict[str, Any]:
    """The ``info`` a merged checkpoint was written with, after checking its tensors against its checksum."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise ConfigError(f"{path}: not a merged arcvit checkpoint (write one with `arcvit merge`)")
            if SHA_KEY in meta and tensors_sha256(f.keys(), f.get_tensor) != meta[SHA_KEY]:
                raise ModelError(f"{path}: checksum mismatch: its tensors differ from the SHA-256 recorded when "
                                 "it was written (corrupt or edited file)")
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    return json.loads(meta[META_KEY])
