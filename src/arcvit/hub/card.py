"""The model card (README.md) of a pushed repo: YAML front matter the Hub indexes (``library_name: arcvit``) with
every number taken from the files pushed beside it (results.json, settings.json, the adapter's or merged file's
own header), and a body that says what the repo holds and how to use it."""
from __future__ import annotations

import json
from math import prod
from typing import Any

from arcvit.backends import TRANSFORMERS_PREFIX

# The facts a card states, in its order; a fact the pushed files do not record is left out, never guessed.
FACTS = ("kind", "backbone", "method", "settings", "task", "num_classes", "class_names", "data_source",
         "data_digest", "test_top1", "protocol", "seed", "trainable_params")
USAGE = {
    "adapter": ("arcvit predict --backbone {backbone} --adapter {ref} image.png",
                'model = create_backbone("{backbone}", {num_classes})\n'
                'arcvit.load_adapter(model, pull("{ref}", "adapter").path)  # checked: checksums, backbone'),
    "run": ("arcvit merge --run {ref} --out merged.safetensors",
            'folder = pull("{ref}", "run").path  # a run folder, as `arcvit train` wrote it\n'
            'model, method, info = load_run(folder)'),
    "merged": ("arcvit predict --merged {ref} image.png",
               'model, info = load_merged(pull("{ref}", "merged").path)'),
    "onnx": ("arcvit predict --onnx {ref} image.png",
             'model = OnnxModel(pull("{ref}", "onnx").path)'),
}
IMPORTS = {"adapter": "import arcvit\nfrom arcvit.backends import create_backbone",
           "run": "from arcvit.training.runmodel import load_run",
           "merged": "from arcvit.backends.merged import load_merged",
           "onnx": "from arcvit.export.session import OnnxModel"}


def tensor_count(shapes: dict[str, list[int]]) -> int:
    """Parameters in an adapter file, from the shapes its config records (adapter and head)."""
    return sum(prod(shape) for shape in shapes.values())


def base_model(backbone: str) -> str | None:
    """The backbone as a Hub model id, when it is one (the Hub links cards by it): a transformers hub id, or a
    tagged timm name (``timm/NAME.TAG``). A local folder or an untagged name has none."""
    if backbone.startswith(TRANSFORMERS_PREFIX):
        name = backbone.removeprefix(TRANSFORMERS_PREFIX)
        return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) else None
    return f"timm/{backbone}" if "." in backbone and "/" not in backbone else None


def front_matter(facts: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata: what the Hub indexes, and under ``arcvit`` every fact, as the files say it."""
    meta: dict[str, Any] = {"library_name": "arcvit", "pipeline_tag": "image-classification",
                            "tags": ["arcvit", "image-classification", str(facts.get("method", facts["kind"]))]}
    hub_id = base_model(str(facts.get("backbone", "")))
    if hub_id:
        meta["base_model"] = hub_id
    meta["arcvit"] = {k: facts[k] for k in FACTS if facts.get(k) is not None}
    return meta


def _rows(facts: dict[str, Any]) -> list[str]:
    """The body's table: one row per fact the files record."""
    top1 = facts.get("test_top1")
    score = None if top1 is None else (f"{100 * top1:.1f} % ({facts.get('protocol') or 'protocol not recorded'}"
                                       f" protocol, seed {facts.get('seed', 'not recorded')})")
    data = facts.get("data_source") and f"{facts['data_source']} (manifest digest `{facts.get('data_digest')}`)"
    names = facts.get("class_names")
    shown = names and ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    rows = [("base model", facts.get("backbone") and f"`{facts['backbone']}`"),
            ("method", facts.get("method")), ("task", facts.get("task")),
            ("classes", shown or facts.get("num_classes")), ("data", data), ("test top-1", score),
            ("trainable parameters", facts.get("trainable_params") and f"{facts['trainable_params']:,}")]
    return [f"| {name} | {value} |" for name, value in rows if value]


def render(facts: dict[str, Any], ref: str) -> str:
    """The README.md text for ``facts`` of a repo named ``ref`` (``hf-hub:ORG/NAME``)."""
    import yaml
    kind = facts["kind"]
    command, python = USAGE[kind]
    values = {"ref": ref, "backbone": facts.get("backbone", "BACKBONE"), "num_classes": facts.get("num_classes", 0)}
    settings = facts.get("settings")
    lines = ["---", yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {ref.split(':', 1)[1]}", "",
             f"An arcvit {kind} (ARC and its peers: https://arxiv.org/abs/2310.06234), pushed with `arcvit push`. "
             "Every number below is read from the files in this repo; `arcvit.json` holds each file's SHA-256, "
             "checked on every pull.", "", "| | |", "|---|---|", *_rows(facts), ""]
    if settings:
        lines += ["Settings:", "", "```json", json.dumps(settings, indent=2, sort_keys=True), "```", ""]
    lines += ["## Use it", "", "```bash", "pip install arcvit", command.format(**values), "```", "",
              "```python", f"{IMPORTS[kind]}\nfrom arcvit.hub import pull\n\n{python.format(**values)}", "```", "",
              f"Pin a commit with `{ref}@REVISION`; with `HF_HUB_OFFLINE=1` a pulled commit loads from the cache.", ""]
    return "\n".join(lines)
