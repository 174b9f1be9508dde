"""Training checkpoints that survive a crash: safetensors + a checksum sidecar, newest good one wins.

Each epoch writes ``epoch-NNNN.safetensors`` (tensors, with the JSON training state in its metadata) and
then ``epoch-NNNN.json`` holding its SHA-256; both atomically. On resume, a checkpoint whose checksum does
not match (truncated, corrupt) or whose sidecar is missing (killed between the two writes) is reported and
skipped for the previous one. The last ``keep`` checkpoints are kept.

Fabric writes and reads them: ``fabric.save(path, state)`` turns the model, optimizer and stateful objects of
``state`` into plain state dicts (gathering them first under a sharded strategy) and hands them to
:class:`SafeCheckpointIO`, which stores them in this format. The state's keys are ``model`` (the trainable
tensors, stored as ``param/<name>``), ``optimizer`` (tensors as ``optimizer/<param>/<slot>``), ``scheduler``
and ``loop`` (its tensors under their own names, the rest in the JSON state): the layout run folders have
always had, so that older ones still resume. FSDP bypasses CheckpointIO plugins and pickles a full state dict;
:func:`fabric_save` / :func:`fabric_load` convert that file to and from this format, so there is only one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import SafetensorError, safe_open

from arcvit.fileio import sha256_file, write_json, write_safetensors

MODEL, OPTIMIZER, SCHEDULER, LOOP = "model", "optimizer", "scheduler", "loop"
_PARAM, _OPT = "param/", "optimizer/"


@dataclass
class Checkpoint:
    epoch: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were not used
    path: Path | None = None


class _Unusable(Exception):
    """Why one checkpoint file cannot be used."""


def _read_verified(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON state of one checkpoint, only if its checksum matches (never unpickles anything)."""
    try:
        expected = json.loads(weights.with_suffix(".json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise _Unusable("no valid checksum file (interrupted while saving)") from None
    if sha256_file(weights) != expected:
        raise _Unusable("checksum mismatch (truncated or corrupt)")
    try:
        with safe_open(weights, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise _Unusable(f"unreadable ({e})") from None


def load_latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None if there is none."""
    skipped = []
    for weights in sorted(Path(directory).glob("epoch-*.safetensors"), reverse=True):
        try:
            tensors, state = _read_verified(weights)
        except _Unusable as e:
            skipped.append(f"{weights.name}: {e}")
            continue
        return Checkpoint(int(state["epoch"]), tensors, state, skipped, weights)
    return Checkpoint(0, {}, {}, skipped) if skipped else None


def encode(checkpoint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fabric's checkpoint dict -> (tensors, JSON state) in the on-disk layout."""
    opt_tensors, opt_settings = _optimizer_to_tensors(checkpoint[OPTIMIZER])
    loop = checkpoint[LOOP]
    tensors = {_PARAM + n: t for n, t in checkpoint[MODEL].items()} | opt_tensors
    tensors |= {k: v for k, v in loop.items() if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in loop.items() if not isinstance(v, torch.Tensor)}
    return tensors, state | {OPTIMIZER: opt_settings, SCHEDULER: checkpoint[SCHEDULER]}


def decode(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode`."""
    loop = {k: v for k, v in state.items() if k not in (OPTIMIZER, SCHEDULER)}
    loop |= {k: v for k, v in tensors.items() if not k.startswith((_PARAM, _OPT))}
    return {MODEL: {k[len(_PARAM):]: v for k, v in tensors.items() if k.startswith(_PARAM)},
            OPTIMIZER: _optimizer_from_tensors(tensors, state[OPTIMIZER]),
            SCHEDULER: state[SCHEDULER], LOOP: loop}


class SafeCheckpointIO(CheckpointIO):
    """Fabric's CheckpointIO plugin for this format: atomic, checksummed, the last ``keep`` files kept."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        weights = Path(path)
        tensors, state = encode(checkpoint)
        write_safetensors(weights, tensors, metadata={"state": json.dumps(state)})
        write_json(weights.with_suffix(".json"),
                   {"epoch": state["epoch"], "file": weights.name, "sha256": sha256_file(weights)})
        for old in sorted(weights.parent.glob("epoch-*.safetensors"))[:-self.keep]:
            self.remove_checkpoint(old)

    def load_checkpoint(self, path: str | Path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return decode(*_read_verified(Path(path)))
        except _Unusable as e:
            raise OSError(f"{path}: {e}") from None

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).with_suffix(".json").unlink(missing_ok=True)
        Path(path).unlink(missing_ok=True)


def _uses_checkpoint_io(fabric) -> bool:
    from lightning_fabric.strategies import FSDPStrategy
    return not isinstance(fabric.strategy, FSDPStrategy)


def fabric_save(fabric, path: Path, state: dict[str, Any], keep: Callable[[str, Any], bool]) -> None:
    """``fabric.save`` of ``state`` (the model filtered by ``keep``) into this format, on every strategy."""
    if _uses_checkpoint_io(fabric):
        fabric.save(path, state, filter={MODEL: keep})
        return
    gathered = path.with_name(f".{path.name}.full.tmp")
    fabric.save(gathered, state, filter={MODEL: keep})
    if fabric.is_global_zero:
        SafeCheckpointIO().save_checkpoint(torch.load(gathered, weights_only=True), path)
        gathered.unlink()
    fabric.barrier()


def fabric_load(fabric, path: Path, state: dict[str, Any]) -> None:
    """``fabric.load`` of a checkpoint in this format into the objects of ``state`` (the model in part)."""
    if _uses_checkpoint_io(fabric):
        fabric.load(path, state, strict=False)
        return
    full = path.with_name(f".{path.name}.full.tmp")
    if fabric.is_global_zero:
        torch.save(SafeCheckpointIO().load_checkpoint(path), full)
    fabric.barrier()
    fabric.load(full, state, strict=False)
    if fabric.is_global_zero:
        full.unlink()


def _optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able settings."""
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPT}{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}

    def slot(index: str) -> dict[str, Any]:  # integer ids, or parameter names (FSDP's full optimizer state)
        return state.setdefault(int(index) if index.isdigit() else index, {})
    for name, value in tensors.items():
        if name.startswith(_OPT):
            index, key = name[len(_OPT):].split("/", 1)
            slot(index)[key] = value
    for name, value in settings["scalars"].items():
        index, key = name.split("/", 1)
        slot(index)[key] = value
    return {"state": state, "param_groups": settings["param_groups"]}
