"""``ROOT/MANIFEST.json``: what a data root held when it was verified, and the digest runs record.

Per task the manifest keeps the sha256 of each list file, a digest per split over its entries (image path,
label, sha256 of the image's bytes), the image formats and sizes seen, the source the task came from and the
arcvit version that checked it; the task's ``digest`` covers the list files and split digests only, so the
same bytes from two sources get the same digest. Training reads the digest (`data_provenance`), never the
images: checking them is `verify_root`'s job.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from arcvit.data.layouts import FGVC_TASKS, VTAB_TASKS, resolve_task, task_key
from arcvit.data.verify import SUITE_LAYOUTS, verify_task
from arcvit.errors import DataError
from arcvit.fileio import write_json

MANIFEST = "MANIFEST.json"
FORMAT = 1
UNVERIFIED = "unverified"
UNRECORDED_SOURCE = "unrecorded (verified in place)"
_HEX = frozenset("0123456789abcdef")


def read_manifest(root: str | Path) -> dict:
    """The manifest of ``root``, or an empty one when there is none; a damaged or hand-edited file (not JSON,
    nested too deeply, a field of the wrong type, a digest that is not hex, a folder in its place) is one
    DataError naming the file and field, so that no run records a digest verify never wrote."""
    path = Path(root) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return {"format": FORMAT, "tasks": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{path}: unreadable manifest (nested too deeply); move it aside and run "
                        "`arcvit data verify` again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e  # a folder: "Is a directory"
        raise DataError(f"{path}: unreadable manifest ({reason}); move it aside and run `arcvit data verify` "
                        "again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), dict):
        raise DataError(f"{path}: not an arcvit manifest (no 'tasks' object)")
    for task, entry in manifest["tasks"].items():
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"{path}: field tasks.{task}{problem}; move it aside and run `arcvit data verify` "
                            "again")
    return manifest


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one task's entry (``.field: ...``), or None: the fields runs and verify read."""
    if not isinstance(entry, dict):
        return f": expected an object, got {type(entry).__name__}"
    if not _is_digest(entry.get("digest")):
        return f".digest: expected 64 hex digits, got {str(entry.get('digest'))[:40]!r}"
    for field in ("source", "suite"):
        if not isinstance(entry.get(field, ""), str):
            return f".{field}: expected a string, got {type(entry[field]).__name__}"
    lists, splits = entry.get("lists", {}), entry.get("splits", {})
    if not isinstance(lists, dict) or not all(_is_digest(d) for d in lists.values()):
        return ".lists: expected an object of list file -> 64 hex digits"
    if not isinstance(splits, dict) or not all(isinstance(s, dict) and _is_digest(s.get("digest"))
                                               for s in splits.values()):
        return ".splits: expected an object of split -> {\"digest\": 64 hex digits, ...}"
    return None


def record_tasks(root: str | Path, entries: dict[str, dict]) -> None:
    """Add or replace these tasks' entries in ``root``'s manifest (one atomic write)."""
    manifest = read_manifest(root)
    manifest["tasks"].update(entries)
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    write_json(Path(root) / MANIFEST, manifest)


def differences(task: str, recorded: dict, entry: dict) -> list[str]:
    """One line per list file or split whose content differs from what the manifest recorded."""
    lines = []
    for name, split in entry["splits"].items():
        before, digest = recorded.get("splits", {}).get(name, {}).get("digest"), split["digest"]
        if before != digest:
            lines.append(f"{task}/{name}: images or labels differ from {MANIFEST} "
                         f"(recorded {str(before)[:12]}, now {digest[:12]})")
    for name, digest in entry["lists"].items():
        if recorded.get("lists", {}).get(name) != digest:
            lines.append(f"{task}/{name}: list file differs from {MANIFEST}")
    return lines


def require_root(root: str | Path) -> Path:
    """``root`` as a Path, or one line saying it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return root


def verify_root(root: str | Path, suite: str, tasks: Sequence[str] | None = None, *, check_sizes: bool = True,
                force: bool = False, progress: Callable[[str], None] | None = None) -> tuple[list[str], dict]:
    """Check every task of ``suite`` (or ``tasks``) under ``root``; returns (problems, the tasks' entries).

    A task that passes and is not in the manifest is added to it; one that is there must match it (with
    ``force``, its entry is replaced instead). The manifest is written only when no problem was found.
    """
    root = require_root(root)
    layout = SUITE_LAYOUTS[suite]
    infos = [resolve_task(t, layout) for t in tasks] if tasks else None
    infos = infos or list((VTAB_TASKS if layout == "vtab" else FGVC_TASKS).values())
    manifest = read_manifest(root)
    problems, entries = [], {}
    for info in infos:
        folder = root / info.folder
        if not folder.is_dir():
            problems.append(f"{info.folder}: task folder {folder} not found")
            continue
        if progress:
            progress(info.folder)
        report = verify_task(folder, suite, info.folder, check_sizes)
        problems += report.problems
        if report.problems:
            continue
        recorded = manifest["tasks"].get(info.folder)
        if recorded and not force:
            problems += differences(info.folder, recorded, report.entry)
        source = (recorded or {}).get("source", UNRECORDED_SOURCE)
        entries[info.folder] = stamp(report.entry, suite, source)
    if not problems:
        record_tasks(root, entries)
    return problems, entries


def stamp(entry: dict, suite: str, source: str) -> dict:
    """A verified task's entry with its suite, source and the arcvit version that checked it."""
    from arcvit.version import __version__
    return {"suite": suite, "source": source, "arcvit": __version__, **entry}


def data_provenance(root: str | Path, task: str) -> dict[str, str | None]:
    """``{"digest", "source"}`` of a task as its root's manifest records it; digest "unverified" when the
    root has no manifest entry for it. Reads the manifest only (no image is opened). A damaged manifest of the
    root is a DataError; without a task, the parent folder's is only a guess, and skipped when damaged."""
    root = Path(root)
    if not task:
        try:
            return _provenance(root.parent, root.name)
        except DataError:
            return {"digest": UNVERIFIED, "source": None}
    names = {task}
    for layout in ("vtab", "fgvc"):
        try:
            names.add(resolve_task(task, layout).folder)
        except DataError:
            pass
    for name in sorted(names):
        found = _provenance(root, name)
        if found["digest"] != UNVERIFIED:
            return found
    return {"digest": UNVERIFIED, "source": None}


def _provenance(where: Path, name: str) -> dict[str, str | None]:
    """The manifest of ``where``'s entry for task folder ``name`` (digest "unverified" when it has none)."""
    tasks = read_manifest(where)["tasks"]
    match = next((e for t, e in tasks.items() if task_key(t) == task_key(name)), None)
    return {"digest": match["digest"], "source": match.get("source")} if match else \
        {"digest": UNVERIFIED, "source": None}
