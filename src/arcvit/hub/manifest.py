"""``arcvit.json``: what a pushed repo holds (its kind) and the SHA-256 of every file, checked on every pull.

The Hub serves whatever was committed last, by anyone with write access, and a cache can be edited: a file that
differs from its recorded SHA-256, or is missing, is refused before any loader reads it. As with local files, a
checksum finds corruption and careless edits, not a forger who rewrites this file too.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from arcvit.core import headers
from arcvit.errors import ModelError
from arcvit.fileio import sha256_file
from arcvit.version import __version__

NAME = "arcvit.json"
FORMAT = "arcvit-hub"
FORMAT_VERSION = 1
# Only these are ever uploaded or downloaded: weights as safetensors (or an ONNX graph: protobuf, no code),
# metadata as JSON, and the model card. Nothing pickled.
SUFFIXES = (".safetensors", ".json", ".onnx")
PATTERNS = ["*.safetensors", "*.json", "*.onnx", "*/*.safetensors", "*/*.json"]
MERGED_FILE = "merged.safetensors"
ONNX_FILE = "model.onnx"
ADAPTER_CONFIG = "adapter_config.json"
# what each command reads, and where it finds it in a repo of each kind (relative to the snapshot)
ENTRIES = {"adapter": {"adapter": ".", "run": "adapter"}, "run": {"run": "."},
           "merged": {"merged": MERGED_FILE}, "onnx": {"onnx": ONNX_FILE}}
KINDS = tuple(ENTRIES)


def document(kind: str, files: dict[str, Path]) -> bytes:
    """The manifest of a push of ``kind``: each repo path with the SHA-256 of the local file it uploads."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "arcvit_version": __version__, "kind": kind,
            "files": {name: sha256_file(path) for name, path in sorted(files.items())}}
    return (json.dumps(body, indent=2) + "\n").encode()


def _safe_name(name: str) -> bool:
    """A repo path the manifest may list: relative, no '..', one of the allowed formats."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and path.suffix in SUFFIXES


def read(snapshot: Path, where: str) -> dict[str, Any]:
    """The checked manifest of a downloaded snapshot (format, kind, file names)."""
    path = snapshot / NAME
    if not path.is_file():
        raise ModelError(f"{where}: not a repo pushed by `arcvit push` (no {NAME})")
    try:
        body = headers.mapping(headers.read_json_file(path), NAME)
        if body.get("format") != FORMAT or body.get("format_version") != FORMAT_VERSION:
            raise headers.HeaderError(f"format {body.get('format')!r} version {body.get('format_version')!r} is "
                                      f"not {FORMAT!r} version {FORMAT_VERSION}")
        if body.get("kind") not in KINDS:
            raise headers.HeaderError(f"field kind: {body.get('kind')!r} is not one of {', '.join(KINDS)}")
        files = headers.mapping(body.get("files"), "files")
        for name, digest in files.items():
            headers.text(digest, f"files.{name}")
            if not _safe_name(name):
                raise headers.HeaderError(f"field files: {name!r} is not a safetensors, JSON or ONNX file in the repo")
    except (headers.HeaderError, OSError) as e:
        raise ModelError(f"{where}: {NAME}: {e}") from None
    return body


def verify(snapshot: Path, body: dict[str, Any], where: str) -> None:
    """Every listed file is in the snapshot with its recorded SHA-256."""
    for name, digest in body["files"].items():
        path = snapshot / name
        if not path.is_file():
            raise ModelError(f"{where}: {name} is listed in {NAME} but missing from the repo")
        if sha256_file(path) != digest:
            raise ModelError(f"{where}: {name}: its SHA-256 differs from the one {NAME} recorded at push "
                             "(tampered or corrupt upload)")


def entry(body: dict[str, Any], use: str, where: str) -> str:
    """Where in a repo of this kind the file or folder a command reads as ``use`` lies."""
    kind = body["kind"]
    place = ENTRIES[use].get(kind)
    if place is None or (place == "adapter" and f"adapter/{ADAPTER_CONFIG}" not in body["files"]):
        raise ModelError(f"{where}: holds {_article(kind)}, not {_article(use)}: "
                         f"pass it where {_article(kind)} is read (--{kind})")
    return place


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeio' else 'a'} {kind}"
