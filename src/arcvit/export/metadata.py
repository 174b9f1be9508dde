"""What an exported file says about itself, under one metadata key (``arcvit``, a JSON document), so that the
file is usable on its own: the preprocessing its inputs need, its tasks (class counts and names), the backbone,
the fingerprints of the weights it came from, the arcvit version, and the figures of the check it passed."""
from __future__ import annotations

import json
from typing import Any

import torch.nn as nn

from arcvit import __version__
from arcvit.data.transforms import data_config
from arcvit.errors import ModelError

KEY = "arcvit"
FORMAT = "arcvit-onnx"
FORMAT_VERSION = 1
KINDS = ("merged", "many-task")
PREPROCESSING = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """The eval transform's settings (timm's data config): enough to rebuild it without the model."""
    cfg = data_config(model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESSING}


def describe(kind: str, model: nn.Module, backbone: dict[str, Any], tasks: list[dict[str, Any]],
             source: dict[str, Any]) -> dict[str, Any]:
    """The metadata document of a new file (its ``check`` is added once the check has passed)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "arcvit_version": __version__, "kind": kind,
            "inputs": ["pixel_values"] + (["task_ids"] if kind == "many-task" else []), "outputs": ["logits"],
            "preprocessing": preprocessing(model), "backbone": backbone, "tasks": tasks, "source": source}


def stamp(proto, document: dict[str, Any]) -> None:
    """Put ``document`` into an onnx ModelProto's metadata (replacing an earlier one)."""
    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key == KEY:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = KEY, json.dumps(document)
    proto.producer_name = "arcvit"


def parse(where: str, custom: dict[str, str]) -> dict[str, Any]:
    """The document of an ONNX file's custom metadata, checked for what readers rely on."""
    if KEY not in custom:
        raise ModelError(f"{where}: not an ONNX file written by `arcvit export` (no {KEY!r} metadata)")
    try:
        document = json.loads(custom[KEY])
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: its {KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelError(f"{where}: its {KEY!r} metadata is not an {FORMAT} document")
    if document.get("format_version") != FORMAT_VERSION or document.get("kind") not in KINDS:
        raise ModelError(f"{where}: format_version {document.get('format_version')!r} / kind "
                         f"{document.get('kind')!r} is not one this arcvit reads ({FORMAT_VERSION}; {', '.join(KINDS)})")
    prep = document.get("preprocessing")
    if not isinstance(prep, dict) or not set(PREPROCESSING) - {"crop_mode"} <= set(prep):
        raise ModelError(f"{where}: its {KEY!r} metadata lacks the preprocessing ({', '.join(PREPROCESSING)})")
    tasks = document.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(
            isinstance(t, dict) and isinstance(t.get("num_classes"), int)
            and len(t.get("class_names") or []) == t["num_classes"] for t in tasks):
        raise ModelError(f"{where}: its {KEY!r} metadata lists no tasks, or a task whose class names do not fit "
                         "its class count")
    return document
