"""Tasks served from the Hugging Face Hub: ``serve --adapters NAME=hf-hub:ORG/NAME[@REVISION]`` and
``PUT /v1/tasks/{name}`` with ``{"source": "hf-hub:..."}``. The repo is pulled (resolved to a commit, downloaded,
checked against its arcvit.json) and its adapter checked against this server's backbone before it is added."""
from __future__ import annotations

import json
from typing import Any

from arcvit.core.adapter_file import backbone_identity, read_adapter_config
from arcvit.errors import AdapterFileError, ConfigError
from arcvit.serving.tasks import TaskInfo

MAX_BODY = 1000  # bytes of a PUT body naming a Hub reference


def _require_backbone(model, folder) -> None:
    """The adapter was trained on the backbone this server runs (library, name, class), named both ways if not."""
    saved = read_adapter_config(folder)["backbone"]
    own = backbone_identity(model.backbone)
    if (saved["library"], saved["name"], saved["class"]) != (own["library"], own["name"], own["class"]):
        raise AdapterFileError(f"{folder}: the adapter was trained on {saved['library']} {saved['name']} "
                               f"({saved['class']}); this server's backbone is {own['library']} {own['name']} "
                               f"({own['class']})")


def add_from_hub(model, name: str, reference: str) -> tuple[TaskInfo, str]:
    """Add task ``name`` from a Hub repo; (its info, the pinned reference it was loaded from)."""
    from arcvit.hub.pull import named_errors, pull
    if getattr(model, "fixed", None):  # an ONNX file's tasks: refused before anything is downloaded
        model.add(name, reference)
    pulled = pull(reference, "adapter")
    with named_errors([pulled]):
        _require_backbone(model, pulled.path)
        return model.add(name, pulled.path), str(pulled.ref)


def hub_reference(body: bytes) -> str | None:
    """The Hub reference a PUT body names (``{"source": "hf-hub:ORG/NAME[@REVISION]"}``), or None for an empty
    body (the task's folder under --adapters)."""
    if not body.strip():
        return None
    try:
        value: Any = json.loads(body) if len(body) <= MAX_BODY else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    source = value.get("source") if isinstance(value, dict) and set(value) == {"source"} else None
    if not isinstance(source, str):
        raise ConfigError(f"body: expected nothing, or a JSON object {{\"source\": \"hf-hub:ORG/NAME[@REVISION]\"}} "
                          f"of at most {MAX_BODY} bytes")
    from arcvit.hub.refs import parse_ref
    return str(parse_ref(source))  # checked here: a bad reference answers 400 before any download
