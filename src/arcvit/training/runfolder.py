"""The run folder's rules: one process trains into it at a time, a finished run or an earlier run's checkpoints
are never overwritten, and a resumed run continues with exactly what it started with."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from arcvit.errors import ConfigError
from arcvit.fileio import write_text
from arcvit.methods import method_spec
from arcvit.training.config import RUNTIME_FIELDS, TrainConfig

try:
    import fcntl
except ModuleNotFoundError:  # Windows: no advisory locks; runs are not guarded against a second process
    fcntl = None

# besides the training settings, what a resumed run must share with the run it continues
IDENTITY_FIELDS = ("backbone", "pretrained", "checkpoint_sha256", "data.root", "data.task",
                   "data_fingerprints.train", "data_fingerprints.val", "data_fingerprints.test")
_MISSING = object()


def _launching_rank_zero() -> bool:
    """Whether this process is, or will launch as, global rank 0 (Fabric's children and torchrun's ranks say
    otherwise in their environment)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def run_lock(out: Path, busy: str = "another arcvit process is training into this run folder; wait for it "
                                   "to finish, or choose another --out") -> Iterator[None]:
    """Hold an OS lock on the folder ``out`` (created if missing) while a run trains into it; the OS releases it
    when the process ends, however it ends. Only the process that becomes rank 0 takes it. ``busy``: what a
    second process is told."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; --out names the run folder")
    if fcntl is None or not _launching_rank_zero():
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)  # the folder itself: locking it leaves no file behind
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: {busy}") from None
        yield
    except BaseException:
        if created and not any(out.iterdir()):  # a run refused before it wrote anything leaves no folder
            out.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def refuse_to_overwrite(out: Path, resume: bool) -> dict[str, Any] | None:
    """Raise if starting a run in ``out`` would overwrite one; the finished results if resuming a finished run."""
    if (out / "results.json").exists():
        if not resume:
            raise ConfigError(f"{out}: this run has finished already (results.json); choose another --out")
        return json.loads((out / "results.json").read_text())
    if (out / "checkpoints").exists() and not resume:
        raise ConfigError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue it, "
                          "or choose another --out")
    return None


def _lookup(settings: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        settings = settings.get(part, _MISSING) if isinstance(settings, dict) else _MISSING
    return settings


def _same(name: str, before: Any, now: Any) -> bool:
    if name == "data.root":
        return Path(before).resolve() == Path(now).resolve()
    return before == now


def check_resumable(out: Path, now: dict[str, Any]) -> None:
    """A resumed run must continue with the settings it started with: the training settings (devices and
    workers may change), task, data, backbone and its weights. A field either side lacks (an older settings.json,
    a split not loaded) is not compared."""
    try:
        before = json.loads((out / "settings.json").read_text())
    except (OSError, ValueError):
        return
    names = list(IDENTITY_FIELDS) + [f"train.{k}" for k in now["train"] if k not in RUNTIME_FIELDS]
    pairs = {n.removeprefix("train."): (_lookup(before, n), _lookup(now, n)) for n in names}
    changed = [f"{n}: {a!r} -> {b!r}" for n, (a, b) in pairs.items()
               if a is not _MISSING and b is not _MISSING and not _same(n, a, b)]
    if changed:
        raise ConfigError(f"{out}: --resume with other settings than the run started with ({'; '.join(changed)})")


def started_settings(out: Path, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with what the run in ``out`` started with where its settings predate a field: the method's run
    format says what such a run ran with (``RunState.legacy``: an ARC run of arcvit 0.1, with no ``arc_impl``,
    placed its adapters as ``sequential`` does, and resumes so)."""
    try:
        before = json.loads((out / "settings.json").read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return cfg
    legacy = method_spec(cfg.method).state.legacy
    return replace(cfg, **{k: v for k, v in legacy.items() if k not in before and getattr(cfg, k) is None})


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())
