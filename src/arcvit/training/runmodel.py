"""A finished run folder's trained model, rebuilt as the run built it, so that any mergeable method merges
from what ``arcvit train`` saved (``arcvit merge --run``) and runs as a merged model (``predict``, ``eval``,
``export``, ``serve`` with ``--run``).

The run's ``settings.json`` says how its backbone was made (name, checkpoint and its SHA-256, pretrained or
seeded random weights) and how the method was set up (method, rank, dropout, ARC's impl and options, seed); the
method's own ``MethodSpec.state`` reads its trained state back (``methods/runstate.py``: ``adapter/`` for the ARC
family, ``trainable.safetensors`` for every other method). The backbone is created under the run's seed exactly
as training created it, so a randomly initialised one is the same too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from lightning_fabric.utilities.seed import seed_everything

from arcvit.backends import create_backbone
from arcvit.core import headers
from arcvit.errors import ConfigError
from arcvit.fileio import sha256_file
from arcvit.methods import load_trained, merge_for_inference, method_spec, run_state_files
from arcvit.training.config import TrainConfig


def run_inputs(run: str | Path) -> list[Path]:
    """The files rebuilding ``run``'s model reads, its recorded backbone checkpoint too (none of them may be
    written over). An unreadable settings.json adds nothing here: reading the run refuses it."""
    run = Path(run)
    try:
        recorded = [Path(_read_json(run / "settings.json")["checkpoint"])]
    except (ConfigError, KeyError, TypeError):
        recorded = []
    state = [run / name for name in run_state_files()]
    inside = [p for folder in state if folder.is_dir() for p in folder.iterdir()]
    return [run / "settings.json", run / "results.json", *state, *inside, *recorded]


def method_options(cfg: TrainConfig) -> dict[str, Any]:
    """What a run hands ``prepare_model`` besides the method (training, and rebuilding a finished run, alike)."""
    return {"rank": cfg.rank, "dropout": cfg.adapter_dropout, "targets": cfg.targets, "impl": cfg.arc_impl,
            "arc_options": cfg.arc_options}


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


def load_run(run: str | Path, checkpoint: str | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """``run``'s trained model (in eval mode), its method, and what a merged file records of it (``backbone``,
    ``num_classes``, ``class_names``, ``task``). A method that does not merge is refused before anything loads."""
    run = Path(run)
    settings, cfg = read_run_settings(run)
    if not method_spec(cfg.method).mergeable:
        raise ConfigError(f"{run}: method {cfg.method} is not mergeable (its adapter stays in the model at "
                          "inference): --run takes a run of a mergeable method")
    weights = _backbone_weights(run, settings, checkpoint)
    seed_everything(cfg.seed, verbose=False)  # as training: a random backbone is the same random backbone
    model = create_backbone(settings["backbone"], num_classes=1, checkpoint=weights,
                            pretrained=bool(settings.get("pretrained", True)), drop_path_rate=cfg.drop_path)
    model.reset_classifier(int(settings["num_classes"]))
    model, names = load_trained(model, cfg.method, run, **method_options(cfg))
    results = _read_json(run / "results.json")
    info = {"backbone": settings["backbone"], "num_classes": int(settings["num_classes"]), "class_names": names,
            "task": results.get("task")}
    return model.eval(), cfg.method, info


def merged_run(run: str | Path, checkpoint: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``run``'s trained model merged into a plain one (in eval mode), and what a merged file records of it
    (``load_run``'s ``info`` with ``method``): what ``predict``, ``eval``, ``export`` and ``serve`` run."""
    model, method, info = load_run(run, checkpoint)
    return merge_for_inference(model, method).eval(), info | {"method": method}
