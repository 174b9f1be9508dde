"""What `arcvit report` reads from a bench folder (``results.json`` and ``settings.json`` of each run folder,
the plan ``bench.json``), checked field by field before it is used.

These files come back from disk, from other machines, or edited by hand: a top-1 of 37.5 (a percentage typed
where a fraction belongs) would average into "1893.8 ± 2625.1", a NaN would print as a table cell, a list
where an object belongs would be a traceback. Each check names the file and the field. Fields the report only
copies into results.csv are checked for their kind (a number is finite), not for their meaning.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from arcvit.errors import ConfigError

_SCALARS = (str, int, float, bool, type(None))
_HEX64 = re.compile(r"[0-9a-f]{64}")
UNVERIFIED = "unverified"  # as arcvit.data.manifest writes it for a root without a manifest entry
_NUMBERS = ("val_top1", "selected_epoch", "total_params", "train_images", "test_images", "wall_time_s",
            "images_per_s")  # optional in results.json: a finite number or null when present


def _bad(path: Path, field: str, expected: str, value: Any) -> ConfigError:
    shown = repr(value)[:40]
    return ConfigError(f"{path}: field {field}: expected {expected}, got {type(value).__name__} {shown}")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object(path: Path, value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, field, "an object", value)
    return value


def _fraction(path: Path, value: Any, field: str) -> float:
    if not (_real(value) and 0 <= value <= 1):
        raise _bad(path, field, "a fraction in [0, 1] (a top-1 accuracy, not in %)", value)
    return value


def _scalar_fields(path: Path, value: Any, field: str) -> dict[str, Any]:
    """An object whose values are strings, numbers (finite), booleans or null: what a table cell can show."""
    for key, item in _object(path, value, field).items():
        if not isinstance(item, _SCALARS) or (isinstance(item, float) and not math.isfinite(item)):
            raise _bad(path, f"{field}.{key}", "a string, a finite number, true/false or null", item)
    return value


def check_results(path: Path, results: Any) -> dict[str, Any]:
    """A run's results.json: test_top1 a fraction, trainable_params a count, the other numbers finite."""
    results = _object(path, results, "(the file)")
    _fraction(path, results.get("test_top1"), "test_top1")
    params = results.get("trainable_params")
    if type(params) is not int or params < 0:
        raise _bad(path, "trainable_params", "a whole number >= 0", params)
    for field in _NUMBERS:
        value = results.get(field)
        if value is not None and not _real(value):
            raise _bad(path, field, "a finite number or null", value)
    if results.get("val_top1") is not None:
        _fraction(path, results["val_top1"], "val_top1")
    for field in ("data_digest", "data_source", "protocol", "backbone"):
        if not isinstance(results.get(field, ""), (str, type(None))):
            raise _bad(path, field, "a string", results[field])
    return results


def check_settings(path: Path, settings: Any) -> dict[str, Any]:
    """A run's settings.json: the fields the report describes the runs with (backbone, the training settings,
    the splits, versions, data fingerprints and digest)."""
    settings = _object(path, settings, "(the file)")
    if not isinstance(settings.get("backbone"), str):
        raise _bad(path, "backbone", "a string", settings.get("backbone"))
    train = _object(path, settings.get("train"), "train")  # values may be objects (a method's own options)
    for key, value in train.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, f"train.{key}", "a finite number", value)
    if not isinstance(train.get("protocol"), str):
        raise _bad(path, "train.protocol", "a string", train.get("protocol"))
    splits = _object(path, _object(path, settings.get("data"), "data").get("splits"), "data.splits")
    for role in ("train", "test", *(["val"] if train["protocol"] == "select" else [])):
        if not isinstance(splits.get(role), str):
            raise _bad(path, f"data.splits.{role}", "a split name", splits.get(role))
    for field in ("versions", "data_fingerprints"):
        if field in settings:
            _scalar_fields(path, settings[field], field)
    manifest = settings.get("data_manifest")
    if manifest is not None:
        digest = _object(path, manifest, "data_manifest").get("digest")
        if not (isinstance(digest, str) and (digest == UNVERIFIED or _HEX64.fullmatch(digest))):
            raise _bad(path, "data_manifest.digest", f"64 hex digits or {UNVERIFIED!r}", digest)
        if not isinstance(manifest.get("source"), (str, type(None))):
            raise _bad(path, "data_manifest.source", "a string or null", manifest.get("source"))
    return settings


def _names(path: Path, plan: dict[str, Any], field: str, kind: type) -> None:
    value = plan.get(field, [])
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        raise _bad(path, field, f"a list of {kind.__name__}", value)


def check_plan(path: Path, plan: Any) -> dict[str, Any]:
    """bench.json: suite a string, tasks and methods lists of names, seeds a list of whole numbers, tuning
    (when there) an object whose tuned records hold settings, a validation top-1 and a trial count."""
    plan = _object(path, plan, "(the file)")
    if not isinstance(plan.get("suite", ""), (str, type(None))):
        raise _bad(path, "suite", "a suite name", plan["suite"])
    _names(path, plan, "tasks", str)
    _names(path, plan, "methods", str)
    _names(path, plan, "seeds", int)
    tuning = plan.get("tuning")
    if tuning:
        tuned = _object(path, _object(path, tuning, "tuning").get("tuned") or {}, "tuning.tuned")
        for task, methods in tuned.items():
            for method, record in _object(path, methods, f"tuning.tuned.{task}").items():
                where = f"tuning.tuned.{task}.{method}"
                record = _object(path, record, where)
                _scalar_fields(path, record.get("settings"), f"{where}.settings")
                _fraction(path, record.get("val_top1"), f"{where}.val_top1")
                if type(record.get("trials")) is not int:
                    raise _bad(path, f"{where}.trials", "a whole number", record.get("trials"))
    return plan


def run_seed(folder: Path) -> int | None:
    """The seed of a run folder named ``seed<k>`` (None for other names). Python's int() reads other scripts'
    digits too (``seed١`` is seed 1); collect_runs refuses two folders that give one seed."""
    return int(folder.name[4:]) if folder.name[4:].isdecimal() else None
