"""What a served task is (name, classes, method) and which folder names may be served."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcvit.core.config import ARCConfig
from arcvit.errors import ConfigError

ALL = "all"  # the task name that asks for every loaded task
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class UnknownTask(ConfigError):
    """A request names a task that is not loaded."""

    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} is not loaded")


@dataclass(frozen=True)
class TaskInfo:
    """One loaded task, as GET /v1/tasks lists it."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    method: str  # "ARC" or "ARC_att"
    rank: int
    backbone: str
    directory: Path

    @classmethod
    def from_meta(cls, name: str, directory: Path, meta: dict[str, Any], num_classes: int) -> "TaskInfo":
        """From an adapter file's metadata (``extra.class_names`` as `arcvit train` writes them, else "0", "1", …)."""
        names = (meta.get("extra") or {}).get("class_names") or meta.get("class_names")
        if not isinstance(names, list) or len(names) != num_classes:
            names = [str(i) for i in range(num_classes)]
        config = ARCConfig.from_dict(meta["arc_config"])
        return cls(name, num_classes, tuple(map(str, names)), config.label, config.rank, str(meta["backbone"]["name"]),
                   directory)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "method": self.method, "rank": self.rank, "backbone": self.backbone}


def check_task_name(name: str) -> str:
    """A task name is a plain folder name: no path separators, no '..', not the reserved 'all'."""
    if not _NAME.fullmatch(name) or name == ALL or ".." in name:
        raise ConfigError(f"task name {name!r}: use letters, digits, '.', '_' or '-' (a plain folder name, "
                          f"not {ALL!r})")
    return name


def task_folder(root: Path, name: str) -> Path:
    """``root/name`` for a valid task name, when it is a real folder directly under ``root`` whose files do not
    lead out of ``root`` (a link to ``/etc/...`` or another user's files is refused, not read)."""
    folder = Path(root) / check_task_name(name)
    if folder.is_symlink() or not folder.is_dir():
        raise UnknownTask(name) if not folder.exists() else ConfigError(f"{folder}: not a plain folder")
    inside = Path(root).resolve()
    for entry in folder.iterdir():
        try:
            target = entry.resolve()
        except (OSError, RuntimeError):  # a link loop
            raise ConfigError(f"{entry}: a link that leads nowhere (a loop)") from None
        if not target.is_relative_to(inside):
            raise ConfigError(f"{entry}: a link that leads out of the adapter folder {root} (refused)")
    return folder


def task_folders(root: Path) -> dict[str, Path]:
    """Every servable task folder under ``root`` (hidden and invalid names skipped), by name."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--adapters {root}: no such folder")
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and not p.is_symlink() and _NAME.fullmatch(p.name) and p.name != ALL}
