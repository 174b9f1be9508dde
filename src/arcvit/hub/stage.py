"""What a push uploads: the kind of the local source, its files (safetensors, JSON, or the ONNX graph) under their
repo names, and the facts its card states, each read and checked as its own loader reads it before anything is
sent."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcvit.core import headers
from arcvit.core.adapter_file import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from arcvit.core.merged_file import read_merged_info
from arcvit.errors import ConfigError
from arcvit.hub.card import tensor_count
from arcvit.hub.manifest import MERGED_FILE, ONNX_FILE

RUN_FILES = ("settings.json", "results.json")
TRAINABLE_FILE = "trainable.safetensors"  # a non-ARC run's trained tensors (the run folder's own name)


@dataclass(frozen=True)
class Staged:
    """A push's kind, its files by repo path, and the facts its card states."""

    kind: str
    files: dict[str, Path]
    facts: dict[str, Any]


def _json(path: Path) -> dict[str, Any]:
    """A run's small JSON file, bounded and checked as every header arcvit reads."""
    try:
        return headers.mapping(headers.read_json_file(path), path.name)
    except (headers.HeaderError, OSError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _adapter_facts(folder: Path) -> dict[str, Any]:
    """What an adapter folder records of itself (checksum checked): backbone, ARC settings, task, classes."""
    meta = read_adapter(folder).meta
    extra = meta.get("extra") or {}
    arc = meta["arc_config"]
    return {"backbone": meta["backbone"]["name"], "method": "arc_att" if arc.get("mode") == "arc_att" else "arc",
            "settings": arc, "task": extra.get("task"), "num_classes": meta.get("num_classes"),
            "class_names": extra.get("class_names"), "test_top1": extra.get("test_top1"),
            "trainable_params": tensor_count(meta.get("tensors") or {})}


def _run_facts(run: Path) -> dict[str, Any]:
    """A finished run's results.json and settings.json, as the card states them."""
    results, settings = _json(run / "results.json"), _json(run / "settings.json")
    keys = ("backbone", "method", "task", "data_source", "data_digest", "test_top1", "protocol", "seed",
            "trainable_params")
    return {k: results.get(k) for k in keys} | {"settings": settings.get("train"),
                                                 "num_classes": settings.get("num_classes")}


def _finished_run(folder: Path) -> bool:
    return all((folder / name).is_file() for name in RUN_FILES)


def stage_adapter(folder: Path) -> Staged:
    """An adapter folder; when it lies in a finished run, that run's settings and results travel with it."""
    files = {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: folder / WEIGHTS_NAME}
    facts = _adapter_facts(folder)
    if _finished_run(folder.parent):
        files |= {name: folder.parent / name for name in RUN_FILES}
        facts = facts | {k: v for k, v in _run_facts(folder.parent).items() if v is not None}
    return Staged("adapter", files, facts)


def stage_run(run: Path) -> Staged:
    """A finished run of a mergeable method: settings, results and its trained weights (never its checkpoints)."""
    if not _finished_run(run):
        raise ConfigError(f"{run}: not a finished run (it needs {' and '.join(RUN_FILES)}); finish it with "
                          "`arcvit train --resume`")
    facts = _run_facts(run)
    if _json(run / "results.json").get("mergeable") is False:
        raise ConfigError(f"{run}: method {facts['method']} is not mergeable; push its adapter folder instead")
    files = {name: run / name for name in RUN_FILES}
    if (run / "adapter" / CONFIG_NAME).is_file():
        files |= {f"adapter/{name}": run / "adapter" / name for name in (CONFIG_NAME, WEIGHTS_NAME)}
        facts["class_names"] = _adapter_facts(run / "adapter")["class_names"]
    elif (run / TRAINABLE_FILE).is_file():
        files[TRAINABLE_FILE] = run / TRAINABLE_FILE
    else:
        raise ConfigError(f"{run}: holds no trained weights (adapter/ or {TRAINABLE_FILE})")
    return Staged("run", files, facts)


def stage_merged(path: Path) -> Staged:
    """A merged file, its header and tensors checked against their checksums."""
    info = read_merged_info(path)
    facts = {"backbone": info["backbone"], "method": "merged", "task": info.get("task"),
             "num_classes": info["num_classes"], "class_names": info.get("class_names")}
    return Staged("merged", {MERGED_FILE: path}, facts)


def stage_onnx(path: Path) -> Staged:
    """An exported ONNX file, opened and its metadata checked as `predict --onnx` reads it."""
    from arcvit.export.session import read_metadata
    document = read_metadata(path)
    tasks = document["tasks"]
    single = tasks[0] if len(tasks) == 1 else {}
    facts = {"backbone": document["backbone"].get("name"), "method": f"onnx ({document['kind']})",
             "task": single.get("name") or ", ".join(str(t.get("name")) for t in tasks),
             "num_classes": single.get("num_classes"), "class_names": single.get("class_names")}
    return Staged("onnx", {ONNX_FILE: path}, facts)


def stage(source: Path) -> Staged:
    """The push of ``source``, by what it is: an adapter folder, a run folder, a merged file or an ONNX file."""
    if source.is_dir() and (source / CONFIG_NAME).is_file():
        staged = stage_adapter(source)
    elif source.is_dir() and (source / "settings.json").is_file():
        staged = stage_run(source)
    elif source.is_file() and source.suffix == ".safetensors":
        staged = stage_merged(source)
    elif source.is_file() and source.suffix == ".onnx":
        staged = stage_onnx(source)
    else:
        raise ConfigError(f"{source}: not an adapter folder, a run folder, a merged .safetensors file or an .onnx "
                          "file" if source.exists() else f"{source}: no such file or folder")
    return Staged(staged.kind, staged.files, {"kind": staged.kind} | staged.facts)
