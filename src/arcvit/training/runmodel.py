"""A finished run folder's trained model, rebuilt as the run built it, so that any mergeable method merges
from what ``arcvit train`` saved (``arcvit merge --run``).

The run's ``settings.json`` says how its backbone was made (name, checkpoint and its SHA-256, pretrained or
seeded random weights) and how the method was set up (method, rank, dropout, ARC's impl, seed); the trained
tensors are ``adapter/`` for the ARC family (arc, arc_att, arc_plus) and ``trainable.safetensors`` for every other method. The backbone is created
under the run's seed exactly as training created it, so a randomly initialised one is the same too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from lightning_fabric.utilities.seed import seed_everything
from safetensors import SafetensorError, safe_open

from arcvit.backends import create_backbone
from arcvit.core import headers
from arcvit.core.adapter_file import load_adapter, read_adapter_config
from arcvit.errors import ConfigError, ModelError
from arcvit.fileio import sha256_file, write_safetensors
from arcvit.methods import is_arc_method, method_spec, prepare_model, trainable_state_dict
from arcvit.training.config import TrainConfig

TRAINABLE_FILE = "trainable.safetensors"
ADAPTER_DIR = "adapter"
CLASS_NAMES_KEY = "class_names"  # trainable.safetensors metadata: the training split's class names (JSON)


def run_inputs(run: str | Path) -> list[Path]:
    """The files rebuilding ``run``'s model reads, its recorded backbone checkpoint too (none of them may be
    written over). An unreadable settings.json adds nothing here: reading the run refuses it."""
    run = Path(run)
    try:
        recorded = [Path(_read_json(run / "settings.json")["checkpoint"])]
    except (ConfigError, KeyError, TypeError):
        recorded = []
    return [run / "settings.json", run / "results.json", run / TRAINABLE_FILE, *(run / ADAPTER_DIR).glob("*"),
            *recorded]


def save_trainable(model: nn.Module, run: str | Path, class_names: list[str] | None) -> None:
    """The tensors the method trains, as ``trainable.safetensors`` in the run folder, with the class names (so a
    merged file names its classes as an ARC run's does)."""
    write_safetensors(Path(run) / TRAINABLE_FILE, trainable_state_dict(model),
                      metadata={CLASS_NAMES_KEY: json.dumps(class_names)})


def _read_json(path: Path) -> dict[str, Any]:
    """A run's small JSON file (bounded as every header arcvit reads), refused in one line if unreadable."""
    try:
        value = headers.read_json_file(path)
    except OSError as e:
        raise ConfigError(f"{path}: not readable ({e})") from None
    except headers.HeaderError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value


def read_run_settings(run: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """A finished run's settings.json and its training settings; a folder that is not one is refused."""
    run = Path(run)
    if not (run / "settings.json").is_file():
        raise ConfigError(f"{run}: not a run folder (no settings.json); --run names a folder `arcvit train` wrote")
    if not (run / "results.json").is_file():
        raise ConfigError(f"{run}: the run has not finished (no results.json); finish it with `arcvit train "
                          "--resume` first")
    settings = _read_json(run / "settings.json")
    try:
        cfg = TrainConfig(**settings["train"])
        int(settings["num_classes"]), str(settings["backbone"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{run / 'settings.json'}: not the settings of an arcvit run ({e})") from None
    return settings, cfg


def _backbone_weights(run: Path, settings: dict[str, Any], checkpoint: str | None) -> str | None:
    """The run's backbone checkpoint (or ``checkpoint`` in its place, if it moved), with the recorded SHA-256."""
    path = checkpoint or settings.get("checkpoint")
    if path is None:
        return None
    recorded = settings.get("checkpoint_sha256")
    if not Path(path).is_file():
        raise ConfigError(f"{path}: the run's backbone checkpoint is not there; pass --checkpoint with its new path")
    if recorded and sha256_file(path) != recorded:
        raise ConfigError(f"{path}: not the checkpoint {run} was trained from (its SHA-256 differs from "
                          "settings.json's checkpoint_sha256)")
    return str(path)


def _load_trainable(model: nn.Module, path: Path) -> list[str] | None:
    """Load the run's trained tensors into ``model`` (prepared as the run prepared it); return its class names.
    The file must hold exactly the tensors the method trains, each with the model's shape."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the run folder holds no trained weights")
    expected = trainable_state_dict(model)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = (f.metadata() or {}).get(CLASS_NAMES_KEY)
            found = set(f.keys())
            if found != set(expected):
                extra, missing = sorted(found - set(expected)), sorted(set(expected) - found)
                raise ModelError(f"{path}: holds other tensors than the run's method trains "
                                 f"(unexpected: {extra[:3]}, missing: {missing[:3]})")
            tensors = {k: f.get_tensor(k) for k in sorted(found)}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ModelError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)
    try:
        return json.loads(names) if names else None
    except json.JSONDecodeError:
        raise ModelError(f"{path}: its {CLASS_NAMES_KEY} metadata is not JSON") from None


def load_run(run: str | Path, checkpoint: str | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """``run``'s trained model (in eval mode), its method, and what a merged file records of it (``backbone``,
    ``num_classes``, ``class_names``, ``task``). A method that does not merge is refused before anything loads."""
    run = Path(run)
    settings, cfg = read_run_settings(run)
    if not method_spec(cfg.method).mergeable:
        raise ConfigError(f"{run}: method {cfg.method} is not mergeable (its adapter stays in the model at "
                          "inference): nothing to merge")
    weights = _backbone_weights(run, settings, checkpoint)
    seed_everything(cfg.seed, verbose=False)  # as training: a random backbone is the same random backbone
    model = create_backbone(settings["backbone"], num_classes=1, checkpoint=weights,
                            pretrained=bool(settings.get("pretrained", True)), drop_path_rate=cfg.drop_path)
    model.reset_classifier(int(settings["num_classes"]))
    if is_arc_method(cfg.method):
        load_adapter(model, run / ADAPTER_DIR)
        names = (read_adapter_config(run / ADAPTER_DIR).get("extra") or {}).get("class_names")
    else:
        model = prepare_model(model, cfg.method, rank=cfg.rank, dropout=cfg.adapter_dropout, targets=cfg.targets,
                              arc_options=cfg.arc_options)
        names = _load_trainable(model, run / TRAINABLE_FILE)
    results = _read_json(run / "results.json")
    info = {"backbone": settings["backbone"], "num_classes": int(settings["num_classes"]), "class_names": names,
            "task": results.get("task")}
    return model.eval(), cfg.method, info
