"""Free disk space: what the server writes on request is refused with 507 before the data dir's
file system goes below `min_free_bytes` (checked with statvfs before and while writing)."""

from __future__ import annotations

import errno
from pathlib import Path

from finetune import fsutil

from server.errors import ServiceError

CHECK_EVERY_BYTES = 1 << 20  # while streaming: statvfs once per MiB written, not per chunk


class InsufficientStorage(ServiceError):
    status, title = 507, "Insufficient storage"


def require_free(path: Path, min_free_bytes: int, what: str, incoming: int = 0) -> None:
    """507 unless `incoming` more bytes under `path` still leave `min_free_bytes` free."""
    try:
        fsutil.ensure_free_space(path, min_free_bytes, what, incoming)
    except fsutil.DiskSpaceError as exc:
        raise InsufficientStorage(_public(str(exc))) from exc


def _public(message: str) -> str:
    return message.replace("min_free_bytes", "the server's min_free_bytes setting")


class DiskBudget:
    """The free-space floor for one request's writes under `path`: call `before_write(n)`
    before each write; it asks statvfs again after every `CHECK_EVERY_BYTES`."""

    def __init__(self, path: Path, min_free_bytes: int, what: str) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.what = what
        self._unchecked = 0

    def start(self, content_length: str | None = None) -> None:
        """The check before anything is written (`content_length`: what the client announced)."""
        declared = int(content_length) if content_length and content_length.isdigit() else 0
        require_free(self.path, self.min_free_bytes, self.what, declared)

    def before_write(self, size: int) -> None:
        if self.min_free_bytes <= 0:
            return
        self._unchecked += size
        if self._unchecked >= CHECK_EVERY_BYTES:  # what was written since is in statvfs now
            require_free(self.path, self.min_free_bytes, self.what, size)
            self._unchecked = 0


def is_disk_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota (the file system filled despite the floor)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(what: str) -> InsufficientStorage:
    return InsufficientStorage(f"the server's disk is full while writing {what}")
