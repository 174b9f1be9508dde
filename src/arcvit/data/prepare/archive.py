"""Unpack a zip or tar archive safely, member by member, never holding a member (or the archive) in memory.

Refused, with one line naming the archive and member: a path that is absolute or climbs out with '..'
(zip-slip), a symlink, hard link or device, a member larger than ``max_member_bytes`` (counted while
copying, so a header that lies about the size does not help), a member that cannot be read (encrypted, a
compression method Python does not decode) or written (a path longer than the file system allows), more bytes
in all than the prepare's `Budget` (counted across nested archives: a few KB of zips of zips can expand to
gigabytes), and an archive that is truncated or corrupt. A folder source is copied under the same rules (a FIFO
or device in it is refused, never opened). Archives found inside the archive (a per-data-set .tar.gz in a zip,
say) are unpacked in place, up to ``NESTING`` levels deep. The caller unpacks into a staging folder it removes
on any error, so a refused archive leaves nothing behind.

Memory: one copy buffer (``CHUNK`` bytes) per member, plus the zip's central directory.
"""
from __future__ import annotations

import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from arcvit.errors import DataError

CHUNK = 1 << 20
MAX_MEMBER_BYTES = 4 << 30  # far above any image or list file of VTAB-1k/FGVC; an inner archive may be large
# All one prepare may write, nested archives counted each time they are written: VTAB-1k unpacks to a few GB,
# FGVC's five data sets (inner archives written, then unpacked) to about 30 GB.
MAX_TOTAL_BYTES = 64 << 30
NESTING = 3
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_BROKEN = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def is_archive(path: Path) -> bool:
    """A file whose name says it is an archive prepare unpacks (zip, tar and its compressed forms)."""
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


@dataclass
class Budget:
    """The bytes one prepare may still write, shared by every archive, nested archive and copied folder."""

    limit: int = MAX_TOTAL_BYTES
    written: int = 0

    def check(self, where: str, size: int) -> None:
        """DataError naming ``where`` when ``size`` more bytes would not fit."""
        if self.written + size > self.limit:
            raise DataError(f"{where} would take this prepare past {self.limit:,} bytes written in all "
                            f"({self.written:,} written so far; --max-total-gb raises the limit); refusing it")

    def take(self, where: str, size: int) -> None:
        """Count ``size`` bytes about to be written for ``where``, refused before they pass the limit."""
        self.check(where, size)
        self.written += size


def _writable(where: str, path: Path, folder: bool = False) -> BinaryIO | None:
    """Create ``path`` (a folder, or a file opened for writing), naming ``where`` when the file system refuses
    it (a name longer than it allows, no space, no permission)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            path.mkdir(exist_ok=True)
            return None
        return open(path, "wb")
    except OSError as e:
        raise _unwritable(where, e) from None


def _unwritable(where: str, error: OSError) -> DataError:
    return DataError(f"{where} cannot be written into the staging folder ({error.strerror or error}); "
                     "refusing the archive")


def _copy(where: str, source: BinaryIO, target: Path, limit: int, budget: Budget) -> None:
    """Stream ``source`` (``where``: the archive and member, or a file) into ``target``, stopping as soon as
    more than ``limit`` bytes arrive or the budget is spent."""
    written = 0
    with _writable(where, target) as out:
        while block := source.read(CHUNK):
            written += len(block)
            if written > limit:
                raise DataError(f"{where} is larger than {limit:,} bytes "
                                "(--max-member-mb raises the limit); refusing the archive")
            budget.take(where, len(block))
            try:
                out.write(block)
            except OSError as e:
                raise _unwritable(where, e) from None


def _zip_source(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> BinaryIO:
    """A zip member opened for reading; DataError naming it when it is encrypted or compressed in a way the
    zipfile module cannot decode (it would raise mid-copy otherwise)."""
    where = f"{archive}: member {info.filename!r}"
    if info.flag_bits & 0x1:
        raise DataError(f"{where} is encrypted (arcvit reads no password-protected archive); refusing the archive")
    try:
        return zf.open(info)
    except (NotImplementedError, RuntimeError) as e:
        raise DataError(f"{where} cannot be read: compression method {info.compress_type} ({e}); "
                        "refusing the archive") from None


def _unpack_zip(archive: Path, dest: Path, limit: int, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        declared = sum(i.file_size for i in members)  # refused up front when the sizes it declares do not fit
        budget.check(f"{archive}: its members ({declared:,} bytes as declared)", declared)
        for info in members:
            rel = _safe_name(archive, info.filename)
            where = f"{archive}: member {info.filename!r}"
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"{where} is a symlink; refusing the archive")
            if info.is_dir():
                _writable(where, dest / rel, folder=True)
                continue
            if info.file_size > limit:
                raise DataError(f"{where} is {info.file_size:,} bytes, larger than the "
                                f"{limit:,}-byte limit (--max-member-mb raises it); refusing the archive")
            with _zip_source(archive, zf, info) as source:
                _copy(where, source, dest / rel, limit, budget)


def _unpack_tar(archive: Path, dest: Path, limit: int, budget: Budget) -> None:
    with tarfile.open(archive, "r|*") as tf:  # stream mode: one pass, no member index held
        for member in tf:
            rel = _safe_name(archive, member.name)
            where = f"{archive}: member {member.name!r}"
            if member.isdir():
                _writable(where, dest / rel, folder=True)
                continue
            if not member.isreg():
                kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                raise DataError(f"{where} is a {kind}; refusing the archive")
            if member.size > limit:
                raise DataError(f"{where} is {member.size:,} bytes, larger than the "
                                f"{limit:,}-byte limit (--max-member-mb raises it); refusing the archive")
            source = tf.extractfile(member)
            if source is None:
                raise DataError(f"{where} cannot be read; refusing the archive")
            _copy(where, source, dest / rel, limit, budget)


def unpack(archive: Path, dest: Path, max_member_bytes: int = MAX_MEMBER_BYTES, depth: int = 0,
           budget: Budget | None = None) -> None:
    """Unpack ``archive`` (zip or tar, any compression tarfile reads) into ``dest``, then the archives in it,
    every byte written counted against ``budget`` (one per prepare; a fresh default one when None)."""
    budget = Budget() if budget is None else budget
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, dest, max_member_bytes, budget)
        elif tarfile.is_tarfile(archive):
            _unpack_tar(archive, dest, max_member_bytes, budget)
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
            unpack(inner, target, max_member_bytes, depth + 1, budget)
            os.remove(inner)


def _plain_file(path: Path) -> None:
    """DataError unless ``path`` is a regular file: a symlink could lead anywhere, and opening a FIFO or a
    device would block, or read without end (/dev/zero)."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        raise DataError(f"{path}: is a symlink; copy the data without links")
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise DataError(f"{path}: is a {kind}, not a regular file; copy the data as plain files")


def _walk_error(error: OSError) -> None:
    raise DataError(f"{error.filename}: cannot be read ({error.strerror or error})")


def copy_tree(source: Path, dest: Path, max_member_bytes: int = MAX_MEMBER_BYTES,
              budget: Budget | None = None) -> None:
    """Copy a task folder from a user's unpacked copy under an archive's rules: no links or special files,
    each file within ``max_member_bytes``, all within ``budget``."""
    budget = Budget() if budget is None else budget
    for folder, dirs, files in os.walk(source, onerror=_walk_error):
        here = Path(folder)
        for name in dirs + files:
            _plain_file(here / name)
        target = dest / here.relative_to(source)
        _writable(str(here), target, folder=True)
        for name in files:
            try:
                with open(here / name, "rb") as file:
                    _copy(str(here / name), file, target / name, max_member_bytes, budget)
            except OSError as e:
                raise DataError(f"{here / name}: cannot be read ({e.strerror or e})") from None
