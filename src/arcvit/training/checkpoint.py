"""Training checkpoints that survive a crash: safetensors + a checksum sidecar, newest good one wins.

Each epoch writes ``epoch-NNNN.safetensors`` (tensors, with the JSON training state in its metadata) and
then ``epoch-NNNN.json`` holding its SHA-256; both atomically. On resume, a checkpoint whose checksum does
not match (truncated, corrupt) or whose sidecar is missing (killed between the two writes) is reported and
skipped for the previous one. The last ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from arcvit.fileio import sha256_file, write_json, write_safetensors


@dataclass
class Checkpoint:
    epoch: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were not used


def save_checkpoint(directory: str | Path, epoch: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 2) -> Path:
    directory = Path(directory)
    weights = directory / f"epoch-{epoch:04d}.safetensors"
    write_safetensors(weights, tensors, metadata={"state": json.dumps(state)})
    write_json(weights.with_suffix(".json"), {"epoch": epoch, "file": weights.name, "sha256": sha256_file(weights)})
    for old in sorted(directory.glob("epoch-*.safetensors"))[:-keep]:
        old.with_suffix(".json").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return weights


def load_latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None if there is none."""
    skipped = []
    for weights in sorted(Path(directory).glob("epoch-*.safetensors"), reverse=True):
        sidecar = weights.with_suffix(".json")
        try:
            expected = json.loads(sidecar.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(f"{weights.name}: no valid checksum file (interrupted while saving)")
            continue
        if sha256_file(weights) != expected:
            skipped.append(f"{weights.name}: checksum mismatch (truncated or corrupt)")
            continue
        try:
            with safe_open(weights, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                state = json.loads(f.metadata()["state"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            skipped.append(f"{weights.name}: unreadable ({e})")
            continue
        return Checkpoint(int(state["epoch"]), tensors, state, skipped)
    return Checkpoint(0, {}, {}, skipped) if skipped else None


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able settings."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           settings: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in settings["scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": settings["param_groups"]})
