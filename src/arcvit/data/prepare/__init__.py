"""``arcvit data prepare``: put a suite's task folders under a data root, each complete and verified or absent.

Sources: ``hub`` (the public archives on the Hugging Face Hub, `arcvit.data.prepare.hub`), ``archive``
(a zip, tar or folder the user already has) and ``tfds`` (VTAB-1k tasks built from TensorFlow Datasets,
`arcvit.data.prepare.tfds`). Archives are unpacked into a staging folder inside the root
(``.arcvit-prepare-*``, removed at the end whatever happens); the task folders are found at any depth
(`discover.find_tasks`); each is checked by `arcvit.data.verify.verify_task` and renamed into place only
when it passes, then recorded in ``ROOT/MANIFEST.json`` with its source. An interrupted prepare therefore
never leaves a task folder that looks finished.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from arcvit.data.layouts import _MARKERS, FGVC_TASKS, VTAB_TASKS, resolve_task
from arcvit.data.manifest import read_manifest, record_tasks, stamp
from arcvit.data.prepare.archive import (
    ARCHIVE_SUFFIXES,
    MAX_MEMBER_BYTES,
    MAX_TOTAL_BYTES,
    Budget,
    copy_tree,
    is_archive,
    unpack,
)
from arcvit.data.prepare.discover import find_tasks
from arcvit.data.verify import SUITE_LAYOUTS, verify_task
from arcvit.errors import ConfigError, DataError
from arcvit.fileio import sha256_file

SOURCES = ("hub", "archive", "tfds")
STAGING_PREFIX = ".arcvit-prepare-"


@contextlib.contextmanager
def _staging(root: Path, log: Callable[[str], None]) -> Iterator[Path]:
    """A fresh staging folder in ``root`` (same file system, so placing a task is a rename), always removed.
    Another one is left alone (a prepare running beside this one, or one that was killed) and named."""
    for other in root.glob(f"{STAGING_PREFIX}*"):
        log(f"{other} is another prepare's staging folder (running, or killed: then delete it)")
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _wanted(suite: str, tasks: Sequence[str] | None) -> list[str]:
    layout = SUITE_LAYOUTS[suite]
    if tasks:
        return list(dict.fromkeys(resolve_task(t, layout).folder for t in tasks))
    return [t.folder for t in (VTAB_TASKS if layout == "vtab" else FGVC_TASKS).values()]


def _check_out(out: Path, wanted: list[str], force: bool, path: Path | None) -> None:
    if path is not None:
        a, b = out.resolve(), path.resolve()
        if a == b or a.is_relative_to(b) or (path.is_dir() and b.is_relative_to(a)):
            raise ConfigError(f"--out {out} overlaps the folder prepare reads ({path}); choose another --out, "
                              "or check a folder in place with `arcvit data verify`")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; name the data root folder to write")
    there = [t for t in wanted if (out / t).exists()]
    if there and not force:
        raise ConfigError(f"{out}: task folder(s) {', '.join(there)} exist already; pass --force to replace "
                          "them, or check them with `arcvit data verify`")


def _describe_missing(layout: str, missing: list[str], named: dict[str, Path], top: Path) -> str:
    def shown(folder: Path) -> Path:  # inside the archive (top/<source number>/...), or the user's folder
        return Path(*folder.relative_to(top).parts[1:]) if folder.is_relative_to(top) else folder
    notes = [f"{t} (folder {shown(named[t])} holds none of {', '.join(_MARKERS[layout])})"
             if t in named else t for t in missing]
    return f"not found at any depth: {', '.join(notes)}"


def _gather(origins: list[tuple[Path, str]], stage: Path, layout: str, wanted: list[str],
            max_member_bytes: int, budget: Budget,
            log: Callable[[str], None]) -> tuple[dict[str, Path], dict[str, Path], Path]:
    """Unpack (or, for a folder, copy) the sources, every byte within one ``budget``; the task folders found,
    the same-named folders without list files, and the folder they were looked for in."""
    top = stage / "unpacked"
    seen: dict[str, Path] = {}
    for n, (path, _) in enumerate(origins):
        if path.is_dir():
            found, seen = find_tasks(path, layout)
            for task in wanted:
                if task in found:
                    log(f"copying {found[task]}")
                    copy_tree(found[task], top / str(n) / task, max_member_bytes, budget)
            continue
        log(f"unpacking {path}")
        unpack(path, top / str(n), max_member_bytes, budget=budget)
    if not top.is_dir():
        top.mkdir()
    found, named = find_tasks(top, layout)
    return found, {**seen, **named}, top


def _origins(source: str, suite: str, path: str | None, repo: str | None, revision: str,
             files: Sequence[str] | None, cache_dir: str | None, quiet: bool) -> list[tuple[Path, str]]:
    """(local path, source label) of each archive or folder to read."""
    if source == "archive":
        if not path:
            raise ConfigError("--source archive needs the archive or folder: --source archive PATH")
        local = Path(path)
        if not local.exists():
            raise DataError(f"{local}: archive or folder not found")
        if local.is_dir():
            return [(local, f"folder {local.resolve()}")]
        if not is_archive(local):
            raise DataError(f"{local}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return [(local, f"archive {local.name} sha256:{sha256_file(local)}")]
    if source != "hub":
        raise ConfigError(f"--source {source!r}: choose one of {', '.join(SOURCES)}")
    from arcvit.data.prepare.hub import HUB_REPOS, download
    default_repo, default_files = HUB_REPOS[suite]
    names = list(files or default_files)
    if not names:
        raise ConfigError(f"--source hub for {suite}: name the repo's archive(s) with --files (arcvit does not "
                          f"know the file names of {repo or default_repo})")
    got = download(repo or default_repo, names, revision, cache_dir, quiet)
    return [(p, f"{label} sha256:{sha256_file(p)}") for p, label in got]


def _build_tfds(wanted: list[str], stage: Path, image_format: str, data_dir: str | None, labels: dict[str, str],
                log: Callable[[str], None]) -> dict[str, Path]:
    """Each wanted task built from TFDS into the staging folder (``labels`` gets each task's source)."""
    from arcvit.data.prepare.tfds import build_task
    found = {}
    for task in wanted:
        found[task] = stage / "built" / task
        labels[task] = build_task(task, found[task], image_format, data_dir, log)
    return found


def _place(folder: Path, target: Path, stage: Path) -> None:
    """Rename a verified task folder into place; an existing one (--force) is moved aside first."""
    if target.exists():
        os.replace(target, stage / f"replaced-{target.name}")
    os.replace(folder, target)


def prepare(suite: str, out: str | Path, source: str = "hub", *, path: str | None = None,
            tasks: Sequence[str] | None = None, repo: str | None = None, revision: str = "main",
            files: Sequence[str] | None = None, cache_dir: str | None = None, force: bool = False,
            check_sizes: bool = True, max_member_bytes: int = MAX_MEMBER_BYTES,
            max_total_bytes: int = MAX_TOTAL_BYTES, image_format: str = "png", quiet: bool = False,
            log: Callable[[str], None] = lambda line: None) -> dict:
    """Prepare ``suite``'s tasks (all, or ``tasks``) under ``out`` from ``source``; see the module docstring.

    Returns what was prepared. Raises DataError (one line) when a task is missing from the source or fails
    its check; the tasks that passed are in place and recorded all the same.
    """
    if suite not in SUITE_LAYOUTS:
        raise ConfigError(f"suite {suite!r}: choose one of {', '.join(SUITE_LAYOUTS)}")
    layout, wanted, out = SUITE_LAYOUTS[suite], _wanted(suite, tasks), Path(out)
    _check_out(out, wanted, force, Path(path) if source == "archive" and path else None)
    if source == "tfds" and suite != "vtab1k":
        raise ConfigError("--source tfds builds VTAB-1k tasks only; FGVC comes from --source hub or archive")
    origins = [] if source == "tfds" else _origins(source, suite, path, repo, revision, files, cache_dir, quiet)
    labels = {t: "; ".join(lbl for _, lbl in origins) for t in wanted}
    out.mkdir(parents=True, exist_ok=True)
    read_manifest(out)  # a damaged MANIFEST.json is named now, before any task is placed beside it
    prepared, failed = {}, []
    with _staging(out, log) as stage:
        if source == "tfds":
            found, named, top = _build_tfds(wanted, stage, image_format, cache_dir, labels, log), {}, stage
        else:
            found, named, top = _gather(origins, stage, layout, wanted, max_member_bytes,
                                        Budget(max_total_bytes), log)
        log(f"found {len(found)} task folder(s): {', '.join(sorted(found)) or 'none'}")
        missing = [t for t in wanted if t not in found]
        for task in (t for t in wanted if t in found):
            log(f"verifying {task}")
            report = verify_task(found[task], suite, task, check_sizes)
            if report.problems:
                more = len(report.problems) - 1
                failed.append(report.problems[0] + (f" (and {more} more problem(s))" if more else ""))
                continue
            _place(found[task], out / task, stage)
            prepared[task] = stamp(report.entry, suite, labels[task])
            record_tasks(out, {task: prepared[task]})
            log(f"{task}: ready, digest {report.entry['digest'][:12]}")
    problems = ([_describe_missing(layout, missing, named, top)] if missing else []) + failed
    if problems:
        done = f"; prepared: {', '.join(prepared)}" if prepared else "; nothing prepared"
        raise DataError(f"{', '.join(str(p) for p, _ in origins) or source}: {'; '.join(problems)}{done}")
    return {"root": str(out), "suite": suite, "source": "; ".join(sorted({labels[t] for t in prepared})),
            "tasks": {t: e["digest"] for t, e in prepared.items()}}
