"""One validator per kind of field found in arcvit's file headers (merged checkpoints, adapter configs).

A header is JSON someone may have edited: every field is checked for its type and bounds before it is used,
and a failure names the file and the field (``<file>: field extra.class_names[3]: ...``), so that a
mistyped or crafted header is one clear line, never a ``KeyError`` or a silently wrong class name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arcvit.errors import ArcvitError

MAX_TEXT = 1000  # characters in a name (backbone, task, class name)
MAX_PATH_TEXT = 4096  # characters in a recorded path
# A class count beyond this is a typo or a crafted header: the head it asks for would be allocated before any
# tensor is read (ImageNet-21k has 21,843 classes).
MAX_CLASSES = 100_000
MAX_HEADER_BYTES = 16 << 20  # an adapter_config.json larger than this is refused unread


class HeaderError(ArcvitError):
    """Raised by the validators; callers re-raise it as their own error kind with the file's name."""


def parse_json(text: str | bytes, field: str = "") -> Any:
    """JSON, with deep nesting (``[[[[...]]]]``, which makes ``json`` recurse) refused as invalid."""
    where = f"field {field}: " if field else ""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"{where}not valid JSON ({e})") from None
    except RecursionError:
        raise HeaderError(f"{where}not valid JSON (nested too deeply)") from None


def read_json_file(path: Path, limit: int | None = None) -> Any:
    """A small UTF-8 JSON file (at most ``limit`` bytes, default ``MAX_HEADER_BYTES``, else refused unread; a
    byte-order mark is dropped)."""
    limit = MAX_HEADER_BYTES if limit is None else limit
    size = path.stat().st_size
    if size > limit:
        raise HeaderError(f"{size} bytes, more than the {limit} a header may hold")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HeaderError(f"not valid JSON (not UTF-8: {e})") from None
    return parse_json(text)


def text(value: Any, field: str, limit: int = MAX_TEXT, empty: bool = False) -> str:
    """A printable string of at most ``limit`` characters (non-empty unless ``empty``)."""
    if not isinstance(value, str):
        raise HeaderError(f"field {field}: expected a string, got {_kind(value)}")
    if not value and not empty:
        raise HeaderError(f"field {field}: is empty")
    if len(value) > limit:
        raise HeaderError(f"field {field}: {len(value)} characters, at most {limit} allowed")
    if not value.isprintable():
        raise HeaderError(f"field {field}: holds control characters ({value[:40]!r})")
    return value


def optional_text(value: Any, field: str, limit: int = MAX_TEXT) -> str | None:
    return None if value is None else text(value, field, limit)


def count(value: Any, field: str, low: int = 1, high: int = MAX_CLASSES) -> int:
    """A whole number in ``low..high`` (JSON's true/false and 6.0 are not counts)."""
    if type(value) is not int:
        raise HeaderError(f"field {field}: expected a whole number, got {_kind(value)}")
    if not low <= value <= high:
        raise HeaderError(f"field {field}: {value} is outside {low}..{high}")
    return value


def class_names(value: Any, field: str, num_classes: int | None) -> list[str] | None:
    """None, or exactly ``num_classes`` non-empty printable names (a short list would make a prediction's
    name an IndexError; a long or permuted one, silently the wrong name)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise HeaderError(f"field {field}: expected a list of names, got {_kind(value)}")
    if num_classes is not None and len(value) != num_classes:
        raise HeaderError(f"field {field}: holds {len(value)} names for num_classes {num_classes}")
    for i, name in enumerate(value):
        text(name, f"{field}[{i}]")
    return value


def mapping(value: Any, field: str, optional: bool = False) -> dict | None:
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise HeaderError(f"field {field}: expected an object, got {_kind(value)}")
    return value


def only_fields(value: dict, allowed: tuple[str, ...], field: str = "") -> None:
    """Refuses fields arcvit does not know: a header it would partly ignore is not one it can vouch for."""
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        where = f" in {field}" if field else ""
        raise HeaderError(f"unknown field(s){where}: {', '.join(map(repr, unknown[:5]))} "
                          f"(known: {', '.join(allowed)})")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
