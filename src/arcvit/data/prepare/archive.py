"""Unpack a zip or tar archive safely, member by member, never holding a member (or the archive) in memory.

Refused, with one line naming the archive and member: a path that is absolute or climbs out with '..'
(zip-slip), a symlink, hard link or device, a member larger than ``max_member_bytes`` (counted while
copying, so a header that lies about the size does not help), and an archive that is truncated or corrupt.
Archives found inside the archive (a per-data-set .tar.gz in a zip, say) are unpacked in place, up to
``NESTING`` levels deep. The caller unpacks into a staging folder it removes on any error, so a refused
archive leaves nothing behind.

Memory: one copy buffer (``CHUNK`` bytes) per member, plus the zip's central directory.
"""
from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from arcvit.errors import DataError

CHUNK = 1 << 20
MAX_MEMBER_BYTES = 4 << 30  # far above any image or list file of VTAB-1k/FGVC; an inner archive may be large
NESTING = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_BROKEN = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_name(archive: Path, name: str) -> PurePosixPath:
    """The member's relative path, or DataError when it would land outside the destination."""
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or (parts and parts[0].endswith(":")) or ".." in parts:
        raise DataError(f"{archive}: member {name!r} would be written outside the destination "
                        "(absolute path or '..'); refusing the archive")
    clean = PurePosixPath(*[p for p in parts if p not in ("", ".")])
    if not clean.parts:
        raise DataError(f"{archive}: member {name!r} has an empty path; refusing the archive")
    return clean


def _copy(archive: Path, name: str, source: BinaryIO, target: Path, limit: int) -> None:
    """Stream ``source`` into ``target``, stopping as soon as more than ``limit`` bytes arrive."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "wb") as out:
        while block := source.read(CHUNK):
            written += len(block)
            if written > limit:
                raise DataError(f"{archive}: member {name!r} is larger than {limit:,} bytes "
                                "(--max-member-mb raises the limit); refusing the archive")
            out.write(block)


def _unpack_zip(archive: Path, dest: Path, limit: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_name(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"{archive}: member {info.filename!r} is a symlink; refusing the archive")
            if info.is_dir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if info.file_size > limit:
                raise DataError(f"{archive}: member {info.filename!r} is {info.file_size:,} bytes, larger than the "
                                f"{limit:,}-byte limit (--max-member-mb raises it); refusing the archive")
            with zf.open(info) as source:
                _copy(archive, info.filename, source, dest / rel, limit)


def _unpack_tar(archive: Path, dest: Path, limit: int) -> None:
    with tarfile.open(archive, "r|*") as tf:  # stream mode: one pass, no member index held
        for member in tf:
            rel = _safe_name(archive, member.name)
            if member.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isreg():
                kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                raise DataError(f"{archive}: member {member.name!r} is a {kind}; refusing the archive")
            if member.size > limit:
                raise DataError(f"{archive}: member {member.name!r} is {member.size:,} bytes, larger than the "
                                f"{limit:,}-byte limit (--max-member-mb raises it); refusing the archive")
            source = tf.extractfile(member)
            if source is None:
                raise DataError(f"{archive}: member {member.name!r} cannot be read; refusing the archive")
            _copy(archive, member.name, source, dest / rel, limit)


def unpack(archive: Path, dest: Path, max_member_bytes: int = MAX_MEMBER_BYTES, depth: int = 0) -> None:
    """Unpack ``archive`` (zip or tar, any compression tarfile reads) into ``dest``, then the archives in it."""
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, dest, max_member_bytes)
        elif tarfile.is_tarfile(archive):
            _unpack_tar(archive, dest, max_member_bytes)
        elif archive.name.lower().endswith(".zip"):
            raise DataError(f"{archive}: truncated or not a zip (its central directory, at the end, is missing)")
        else:
            raise DataError(f"{archive}: not a zip or tar archive")
    except DataError:
        raise
    except _BROKEN as e:
        raise DataError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e})") from None
    if depth < NESTING:
        for inner in sorted(p for p in dest.rglob("*") if is_archive(p)):
            target = inner.with_name(inner.name + ".d")
            unpack(inner, target, max_member_bytes, depth + 1)
            os.remove(inner)


def copy_tree(source: Path, dest: Path) -> None:
    """Copy a task folder from a user's unpacked copy, refusing symlinks as an archive's are refused."""
    for folder, dirs, files in os.walk(source):
        here = Path(folder)
        for name in dirs + files:
            if (here / name).is_symlink():
                raise DataError(f"{here / name}: is a symlink; copy the data without links")
        target = dest / here.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(here / name, target / name)
