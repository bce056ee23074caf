"""What keeps one fine-tune job to one trainer process at a time, on one host or several that
mount the job's folder.

- The trainer holds a POSIX record lock (`fcntl.lockf`, which NFS carries to the server) on
  `<job>/trainer.lock` while it runs; a second trainer of the job waits for it, then refuses.
- The trainer stops itself when the process that started it is gone (its parent changed: a
  killed server or worker): it is sent SIGTERM, so it checkpoints and exits as on a stop, and
  whoever runs the job next resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "trainer.lock"
PARENT_POLL_S = 0.5


class JobBusy(RuntimeError):
    """Another trainer holds the job."""


@contextlib.contextmanager
def trainer_lock(job_dir: Path, wait_s: float) -> Iterator[None]:
    """Hold `job_dir`'s trainer lock; wait up to `wait_s` for another holder (a trainer whose
    supervisor died, checkpointing before it exits), then raise JobBusy."""
    fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise JobBusy(
                        f"another trainer is running this job (it holds {job_dir / LOCK_FILE})"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def is_locked(job_dir: Path) -> bool:
    """Whether a trainer holds `job_dir`'s lock now (a check: the answer can change at once)."""
    try:
        fd = os.open(job_dir / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def stop_when_orphaned(poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """A daemon thread that sends this process SIGTERM once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
