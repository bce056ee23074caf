"""The API key file while a server runs, and the CLI's edits of it.

A running server re-reads the key file when it changes: every authentication stats the file
(inode, mtime, size: one syscall) and reloads it when that differs, so `voicefoundry keys
revoke|rotate|limit` take effect on the next request without a restart. Edits replace the file
atomically (temp file + rename, under a lock file so two CLI edits never lose one another), so
a reader sees the old file or the new one, never half of one.

Fail closed: a key file that stops being usable while the server runs (deleted, unreadable,
malformed, or its last key revoked) refuses every key, with one logged error, until it is fixed;
it never turns auth off.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from server.auth import ChangingKeys, KeyStore

log = logging.getLogger("voicefoundry.auth")

Stamp = tuple[int, int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class KeyFile(ChangingKeys):
    """`KeyStore`'s read side over a file that may change; always enabled (a key file is
    configured). Raises ValueError at construction if the file cannot be used (no start)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        stamp = _stamp(self.path)
        self._store: KeyStore | None = KeyStore.load_configured(path)
        self._stamp = stamp

    def current(self) -> KeyStore | None:
        """The keys as the file holds them now; None while the file is unusable."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._reload(stamp)
        return self._store

    def _reload(self, stamp: Stamp) -> None:
        try:
            store = KeyStore.load_configured(self.path)
        except ValueError as exc:
            log.error("%s; every API key is refused until the key file is fixed", exc)
            self._store = None
        else:
            log.info("api_keys_file reloaded: %d keys", len(store))
            self._store = store
        self._stamp = stamp


@contextlib.contextmanager
def edit_key_file(path: Path | str) -> Iterator[KeyStore]:
    """Load the key file (a missing one is empty), let the caller change the store, save it
    atomically. A lock file beside it serialises concurrent edits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            store = KeyStore.load(path, missing_ok=True)
            yield store
            store.save(path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
