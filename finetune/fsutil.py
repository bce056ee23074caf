"""Writing a whole directory atomically: build it beside the target, then rename it in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """The one way whole directories are written here (voice packages, adapters, checkpoints,
    exports). Yields an empty staging folder beside `target`; on success its files are synced
    and it replaces `target` whole (the old one is moved aside first, so a crash leaves the
    old or the new directory, never neither); on any error it is removed and `target` is left
    as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)
    retired = staging.with_suffix(".old")
    try:
        yield staging
        for item in staging.rglob("*"):
            if item.is_file():
                _fsync(item)
        if target.exists():
            target.rename(retired)
        try:
            staging.rename(target)
        except BaseException:
            if retired.exists():
                retired.rename(target)
            raise
        with contextlib.suppress(OSError):
            _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(dest: Path, write: Callable[[Path], object], *, mode: int = 0o644) -> None:
    """The one way files are written here: `write(tmp)` fills a temp file beside `dest`, which
    is synced and renamed over `dest`; readers see the old file or the new, never half of one,
    and a failed write leaves nothing behind."""
    dest = Path(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file through a synced temp file and a rename: readers see old or new, never half."""
    atomic_write(dest, lambda tmp: tmp.write_bytes(data), mode=mode)


class DiskSpaceError(OSError):
    """Writing would leave less free space on a file system than its configured floor."""


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (statvfs)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # a folder about to be made: ask its nearest existing parent
    stats = os.statvfs(probe)
    return stats.f_bavail * stats.f_frsize


def ensure_free_space(path: Path, min_free_bytes: int, what: str, incoming: int = 0) -> None:
    """Raise `DiskSpaceError` unless writing `incoming` more bytes under `path` still leaves
    `min_free_bytes` free (0 turns the check off)."""
    if min_free_bytes <= 0:
        return
    free = free_bytes(path)
    if free - incoming < min_free_bytes:
        raise DiskSpaceError(
            f"not enough free disk space for {what}: {free} bytes free"
            + (f", {incoming} more needed" if incoming else "")
            + f", and at least {min_free_bytes} must stay free (min_free_bytes)"
        )
