"""Find a suite's task folders at any depth of an unpacked archive, whose inner layout is not known ahead.

A task folder is a folder named as the task (or a usual alias, any case) that holds the layout's files
(VTAB-1k: a ``<split>.txt`` list; FGVC: ``train.json``). Folders named like a task without those files are
remembered, so that "missing" can say what was seen instead.
"""
from __future__ import annotations

import os
from pathlib import Path

from arcvit.data.layouts import _MARKERS, resolve_task
from arcvit.errors import DataError

_SKIPPED = ("__MACOSX", ".")  # macOS zip resource forks, hidden folders


def find_tasks(top: Path, layout: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """(task folder name -> folder holding its files, task folder name -> a same-named folder without them)."""
    found: dict[str, Path] = {}
    named: dict[str, Path] = {}
    for folder, dirs, _ in os.walk(top):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(_SKIPPED))
        try:
            task = resolve_task(here.name, layout).folder
        except DataError:
            continue
        if not any((here / m).is_file() for m in _MARKERS[layout]):
            named.setdefault(task, here)
            continue
        if task in found:
            raise DataError(f"task {task} found twice: {found[task].relative_to(top)} and {here.relative_to(top)}; "
                            "keep one copy")
        found[task] = here
        dirs[:] = []  # a task folder's own sub-folders hold images, not tasks
    return found, {t: p for t, p in named.items() if t not in found}
