"""What an exported file says about itself, under one metadata key (``arcvit``, a JSON document), so that the
file is usable on its own: the preprocessing its inputs need, its tasks (class counts and names), the backbone,
the fingerprints of the weights it came from, the arcvit version, and the figures of the check it passed.

A second key, ``arcvit_sha256``, holds a SHA-256 over that document and the graph (its inputs, outputs, nodes
and weights), as the merged file's header checksum does: permuted class names, an edited class count, or the
document copied onto another graph are refused on load. Every field a reader uses is checked too (sizes
bounded, std non-zero, a known interpolation and crop mode), and the graph against the document
(`check_graph`). A checksum finds edits, not a forger who recomputes it."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch.nn as nn

from arcvit.core.headers import HeaderError, class_names, count, mapping, text
from arcvit.data.transforms import data_config
from arcvit.errors import ModelError
from arcvit.version import __version__

KEY = "arcvit"
FORMAT = "arcvit-onnx"
FORMAT_VERSION = 1
KINDS = ("merged", "many-task")
PREPROCESSING = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
CHECKSUM_KEY = "arcvit_sha256"
MAX_SIDE = 4096  # pixels a side of the input may have: larger is a tampered size, not a ViT
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")


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


def graph_sha256(proto) -> str:
    """SHA-256 of an onnx ModelProto's graph: input and output names, every node, every weight."""
    graph, h = proto.graph, hashlib.sha256()
    for value in (*graph.input, *graph.output):
        h.update(f"io\0{value.name}\0".encode())
    for node in graph.node:
        h.update(f"node\0{node.op_type}\0{','.join(node.input)}\0{','.join(node.output)}\0".encode())
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(f"init\0{init.name}\0{init.data_type}\0{tuple(init.dims)}\0".encode())
        h.update(init.raw_data or init.SerializeToString())
    return h.hexdigest()


def checksum(document_text: str, graph: str) -> str:
    """One SHA-256 over the metadata text and the graph's digest: neither can be edited or swapped alone."""
    return hashlib.sha256(f"{document_text}\0{graph}".encode()).hexdigest()


def stamp(proto, document: dict[str, Any]) -> None:
    """Put ``document`` and its checksum into an onnx ModelProto's metadata (replacing earlier ones)."""
    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key in (KEY, CHECKSUM_KEY):
            del proto.metadata_props[i]
    body = json.dumps(document)
    for key, value in ((KEY, body), (CHECKSUM_KEY, checksum(body, graph_sha256(proto)))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "arcvit"


def verify(where: str, custom: dict[str, str], proto) -> None:
    """ModelError unless the file's checksum matches its metadata document and its graph ``proto``."""
    if CHECKSUM_KEY not in custom:
        raise ModelError(f"{where}: its {KEY!r} metadata carries no checksum ({CHECKSUM_KEY}): edited, or written "
                         "by an older arcvit; export it again")
    if custom[CHECKSUM_KEY] != checksum(custom[KEY], graph_sha256(proto)):
        raise ModelError(f"{where}: checksum mismatch: its {KEY!r} metadata or its graph differ from what "
                         "`arcvit export` wrote (edited metadata, or metadata copied onto another graph)")


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
    if document.get("inputs") not in (["pixel_values"], ["pixel_values", "task_ids"]):
        raise ModelError(f"{where}: its {KEY!r} metadata: field inputs: expected [\"pixel_values\"] or "
                         f"[\"pixel_values\", \"task_ids\"], got {json.dumps(document.get('inputs'))[:60]}")
    try:
        check_preprocessing(mapping(document.get("preprocessing"), "preprocessing"))
        check_tasks(document.get("tasks"))
    except HeaderError as e:
        raise ModelError(f"{where}: its {KEY!r} metadata: {e}") from None
    return document


def _reals(value: Any, field: str, n: int) -> list[float]:
    if not (isinstance(value, list) and len(value) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise HeaderError(f"field {field}: expected {n} finite numbers, got {json.dumps(value)[:60]}")
    return value


def check_preprocessing(prep: dict[str, Any]) -> None:
    """Every preprocessing field the eval transform reads, within bounds (a tampered input size must not make
    a request allocate gigabytes; a zero std divides by zero)."""
    size = prep.get("input_size")
    if not (isinstance(size, list) and len(size) == 3):
        raise HeaderError(f"field preprocessing.input_size: expected [3, height, width], got {json.dumps(size)[:60]}")
    count(size[0], "preprocessing.input_size[0]", 3, 3)
    for i in (1, 2):
        count(size[i], f"preprocessing.input_size[{i}]", 1, MAX_SIDE)
    _reals(prep.get("mean"), "preprocessing.mean", 3)
    if any(v <= 0 for v in _reals(prep.get("std"), "preprocessing.std", 3)):
        raise HeaderError(f"field preprocessing.std: every value must be above 0, got {prep['std']}")
    if prep.get("interpolation") not in INTERPOLATIONS:
        raise HeaderError(f"field preprocessing.interpolation: {str(prep.get('interpolation'))[:40]!r} is not one "
                          f"of {', '.join(INTERPOLATIONS)}")
    if prep.get("crop_mode", "center") not in CROP_MODES:
        raise HeaderError(f"field preprocessing.crop_mode: {str(prep.get('crop_mode'))[:40]!r} is not one of "
                          f"{', '.join(CROP_MODES)}")
    pct = _reals([prep.get("crop_pct")], "preprocessing.crop_pct", 1)[0]
    if not 0 < pct <= 1:
        raise HeaderError(f"field preprocessing.crop_pct: {pct} is outside (0, 1]")


def check_tasks(tasks: Any) -> None:
    """At least one task, each with a name, a class count and exactly that many class names."""
    if not isinstance(tasks, list) or not tasks:
        raise HeaderError("field tasks: expected a non-empty list of tasks")
    for i, task in enumerate(tasks):
        mapping(task, f"tasks[{i}]")
        text(task.get("name"), f"tasks[{i}].name")
        n = count(task.get("num_classes"), f"tasks[{i}].num_classes")
        if class_names(task.get("class_names"), f"tasks[{i}].class_names", n) is None:
            raise HeaderError(f"field tasks[{i}].class_names: missing")


def check_graph(where: str, session: Any, document: dict[str, Any]) -> None:
    """The graph's inputs and outputs as its metadata describes them: names, dtypes, image shape and the number
    of logits (the widest task's class count)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = session.get_outputs()
    _, height, width = document["preprocessing"]["input_size"]
    classes = max(t["num_classes"] for t in document["tasks"])
    expected = {"pixel_values": ("tensor(float)", [3, height, width]), "task_ids": ("tensor(int64)", [])}
    found = {name: (i.type, list(i.shape[1:])) for name, i in inputs.items()}
    wanted = {name: expected.get(name) for name in document["inputs"]}
    out = [(o.name, o.type, list(o.shape[1:])) for o in outputs]
    if found != wanted or out != [("logits", "tensor(float)", [classes])]:
        raise ModelError(f"{where}: its graph does not match its metadata (inputs {found}, outputs {out}; the "
                         f"metadata says inputs {wanted}, outputs logits of {classes} classes)")
