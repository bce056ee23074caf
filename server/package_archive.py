"""Unpacking an uploaded voice package (.zip, or .tar plain / .gz / .bz2 / .xz) into a folder.

Every member must be a plain file or folder whose name stays inside the folder (no links,
devices, absolute names or `..`). The number of members, each member's size and the total are
capped and checked while each member streams out, so an archive bomb is refused before more than
a cap is written; the caller removes the folder whatever happens.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from server.disk import DiskBudget
from server.engine.family import PackageError, package_member
from server.errors import BadRequest, PayloadTooLarge

CHUNK = 1 << 20
MAX_NAME_CHARS = 1024
MAX_HEADER_BYTES = 64 * 1024  # a tar long-name or pax header record (read into memory whole)
# tar member types a package may hold: regular files and folders
_TAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)
_TAR_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int = 2 * 1024**3  # all members together, unpacked
    max_member_bytes: int = 1024**3
    max_members: int = 256
    min_free_bytes: int = 0  # the disk's free-space floor while members are written (507 below)


class _Budget:
    """Members and bytes unpacked so far, refused the moment one more would pass a limit."""

    def __init__(self, limits: ArchiveLimits, into: Path) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0
        self.disk = DiskBudget(into, limits.min_free_bytes, "the unpacked voice package")

    def member(self, name: str, declared: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(
                f"voice package has more than {self.limits.max_members} members (the limit)"
            )
        self.check(name, declared, declared)

    def check(self, name: str, member_bytes: int, more: int) -> None:
        if member_bytes > self.limits.max_member_bytes:
            raise PayloadTooLarge(
                f"voice package member {name!r} unpacks to more than "
                f"{self.limits.max_member_bytes} bytes (the per-member limit)"
            )
        if self.total + more > self.limits.max_bytes:
            raise PayloadTooLarge(
                f"voice package unpacks to more than {self.limits.max_bytes} bytes (the limit)"
            )

    def copy(self, source: IO[bytes], target: Path, name: str) -> None:
        written = 0
        with target.open("wb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                self.check(name, written, len(chunk))
                self.disk.before_write(len(chunk))
                self.total += len(chunk)
                out.write(chunk)


def unpack(archive: Path | bytes, into: Path, limits: ArchiveLimits) -> None:
    """Unpack `archive` (a file, or its bytes) into the existing, empty folder `into`."""
    budget = _Budget(limits, into)
    budget.disk.start()
    with _open(archive) as fileobj:
        if zipfile.is_zipfile(fileobj):
            fileobj.seek(0)
            _unzip(fileobj, into, budget)
        else:
            fileobj.seek(0)
            _untar(fileobj, into, budget)
    # Packages made with `tar -C parent folder` hold one top-level folder: unwrap it.
    entries = list(into.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (into / "voice.json").exists():
        inner = entries[0]
        for item in inner.iterdir():
            item.rename(into / item.name)
        inner.rmdir()


def _open(archive: Path | bytes) -> IO[bytes]:
    return io.BytesIO(archive) if isinstance(archive, bytes) else Path(archive).open("rb")


def _target(root: Path, name: str, *, folder: bool) -> Path:
    if len(name) > MAX_NAME_CHARS or any(len(p.encode()) > 255 for p in name.split("/")):
        raise BadRequest(f"voice package member name is too long: {name[:64]!r}...")
    try:
        target = package_member(root, name)
    except PackageError as exc:
        raise BadRequest(str(exc)) from exc
    if target == root.resolve() and not folder:
        raise BadRequest(f"voice package member {name!r} is not a file name")
    return target


def _make_parent(target: Path, name: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise BadRequest(f"voice package member {name!r} clashes with another member") from exc


def _unzip(fileobj: IO[bytes], into: Path, budget: _Budget) -> None:
    # The member count from the end record, before ZipFile reads every central-directory entry
    # into memory (a few MB of archive can name millions of members).
    end = zipfile._EndRecData(fileobj)  # type: ignore[attr-defined]  # there since Python 2
    total = 0 if end is None else end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    if total > budget.limits.max_members:
        raise PayloadTooLarge(
            f"voice package has more than {budget.limits.max_members} members (the limit)"
        )
    try:
        with zipfile.ZipFile(fileobj) as zf:
            for info in zf.infolist():
                budget.member(info.filename, info.file_size)
                target = _target(into, info.filename, folder=info.is_dir())
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BadRequest(f"voice package holds a link: {info.filename}")
                if info.is_dir():
                    _make_parent(target / "x", info.filename)
                    continue
                _make_parent(target, info.filename)
                with zf.open(info) as source:
                    _copy_member(budget, source, target, info.filename)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
        raise BadRequest(f"voice package is not a readable .zip archive: {exc}") from exc


def _untar(fileobj: IO[bytes], into: Path, budget: _Budget) -> None:
    limits = budget.limits
    # The decompressed stream, bounded too: tar headers (long names, pax records) are read by
    # tarfile itself, outside the per-member accounting.
    overhead = (limits.max_members + 2) * (2 * MAX_HEADER_BYTES + 1024) + tarfile.RECORDSIZE
    stream = _Bounded(_decompressed(fileobj), limits.max_bytes + overhead, limits.max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tf:
            for member in tf:
                budget.member(member.name, member.size)
                if member.type not in _TAR_TYPES:
                    raise BadRequest(f"voice package holds a link or device: {member.name}")
                target = _target(into, member.name, folder=member.isdir())
                if member.isdir():
                    _make_parent(target / "x", member.name)
                    continue
                _make_parent(target, member.name)
                source = tf.extractfile(member)
                assert source is not None  # a regular file
                _copy_member(budget, source, target, member.name)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise BadRequest(f"voice package is not a .tar.gz or .zip archive: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:  # the disk's, not the archive's
            raise
        raise BadRequest(f"voice package is not a .tar.gz or .zip archive: {exc}") from exc


def _copy_member(budget: _Budget, source: IO[bytes], target: Path, name: str) -> None:
    try:
        budget.copy(source, target, name)
    except IsADirectoryError as exc:
        raise BadRequest(f"voice package member {name!r} clashes with another member") from exc


def _decompressed(fileobj: IO[bytes]) -> IO[bytes]:
    head = fileobj.read(6)
    fileobj.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return cast(IO[bytes], gzip.GzipFile(fileobj=fileobj, mode="rb"))
    if head.startswith(b"BZh"):
        return bz2.BZ2File(fileobj)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fileobj)
    return fileobj


class _Bounded(io.RawIOBase):
    """A read-only stream that refuses to yield more than `limit` bytes."""

    def __init__(self, inner: IO[bytes], limit: int, cap: int) -> None:
        self.inner, self.limit, self.cap, self.read_so_far = inner, limit, cap, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.read_so_far
        size = room + 1 if size is None or size < 0 else min(size, room + 1)
        data = self.inner.read(size)
        self.read_so_far += len(data)
        if self.read_so_far > self.limit:
            raise PayloadTooLarge(
                f"voice package unpacks to more than {self.cap} bytes (the limit)"
            )
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo refusing long-name / pax header records larger than MAX_HEADER_BYTES (tarfile
    reads each into memory whole)."""

    def _proc_member(self, tarfile: Any) -> Any:
        if self.type in _TAR_EXTENDED and self.size > MAX_HEADER_BYTES:
            raise BadRequest(f"voice package has a tar header record of {self.size} bytes")
        return super()._proc_member(tarfile)  # type: ignore[misc]
