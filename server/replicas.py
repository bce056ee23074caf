"""Replicas: several `voicefoundry serve` processes with one `database_url` (PostgreSQL) and one
artifacts dir serve the same voices. Started from the lifespan only when `database_url` is set.

How: every voice write (create, import, delete) sends ``pg_notify('voicefoundry_voices', name)``
inside the transaction that writes the registry row, so the notification is delivered when, and
only if, the row commits. Each replica LISTENs on its own connection (psycopg); a notification
wakes its reconcile at once. The reconcile compares the registry's rows with what this process
has installed (`VoiceService.installed`) and installs (baked row, language rows; adapters load on
demand from the shared artifacts dir) or removes (rows, adapters, caches) what differs. It also
runs every `replica_poll_s` (default 2 s) whatever was heard: notifications sent while a
listening connection is down are lost (it reconnects), and the poll alone is correct.

The bound: a voice created, imported or deleted on one replica is installed or removed on every
other one within `replica_poll_s` plus the time its install takes (milliseconds for a baked row
of a small model), and usually within tens of milliseconds of the commit. Names resolve through
the database, so a deleted voice is refused (404) by every replica as soon as the delete commits;
a new one answers 503 + Retry-After on a replica that has not installed it yet.

Job events: the same connection LISTENs on server/jobs/broadcast.py's channel, so a job's events
reach `/jobs/{id}/events` on every replica, whichever process (replica or `voicefoundry worker`)
changed the job. Usage windows are per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import sqlalchemy as sa

from server.jobs import broadcast
from server.jobs.events import PublicEvent
from server.registry import Voice
from server.voices import VoiceService

log = logging.getLogger("voicefoundry.replicas")

CHANNEL = "voicefoundry_voices"
# Crash leftovers in the shared artifacts dir (staging folders, a name's claimed folder) older
# than this are removed at a start; younger ones may be another replica's import in flight.
LEFTOVER_AGE_S = 6 * 3600.0
RECONNECT_S = (0.5, 10.0)  # the listener's first and longest wait before connecting again


def notify(conn: sa.Connection, name: str) -> None:
    """Tell the other replicas voice `name` changed; sent when `conn`'s transaction commits."""
    conn.execute(sa.text("SELECT pg_notify(:channel, :name)"), {"channel": CHANNEL, "name": name})


def replica_id(data_dir: Path) -> str:
    """This replica's id, kept in its own data dir (stable across restarts)."""
    file = data_dir / "replica-id"
    with contextlib.suppress(FileNotFoundError):
        return file.read_text().strip()
    made = f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
    staging = file.with_name(f".replica-id.{os.getpid()}")
    staging.write_text(made)
    staging.rename(file)
    return made


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL as psycopg's own connection string (no driver suffix)."""
    url = sa.make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ReplicaSync:
    """Keeps this replica's installed voices equal to the shared registry. See the module
    docstring for how and the bound."""

    def __init__(
        self, voices: VoiceService, database_url: str, poll_s: float, origin: str = ""
    ) -> None:
        self.voices = voices
        self.url = libpq_url(database_url)
        self.poll_s = poll_s
        self.origin = origin  # this replica's id: its own job events are not handed back
        # Where other processes' job events go (the job service's listeners).
        self.on_job_event: Callable[[str, PublicEvent], None] | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        voices.shared = True
        voices.on_change = notify

    async def start(self) -> None:
        self._wake.set()  # one reconcile at once: what changed since the restore read the rows
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reconcile(self) -> dict[str, int]:
        """Install and remove what differs from the registry; counts of each."""
        rows: dict[str, Voice] = {
            v.name: v for v in await anyio.to_thread.run_sync(self.voices.registry.list)
        }
        names = set(rows) | set(self.voices.installed)
        done = {"installed": 0, "removed": 0}
        # Removals first: a row a deleted voice freed may be what a new voice was given.
        for name in sorted(names, key=lambda n: (n in rows, n)):
            outcome = await self.voices.sync_voice(name, rows.get(name))
            if outcome is not None:
                done[outcome] += 1
                log.info("replica sync: voice %s %s", name, outcome)
        return done

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # the registry down a moment: the next round tries again
                log.exception("replica sync failed; retried in %.1f s", self.poll_s)

    def _job_event(self, payload: str) -> None:
        message = broadcast.decode(payload)
        if message is None or self.on_job_event is None:
            return
        origin, job_id, event = message
        if origin != self.origin:
            self.on_job_event(job_id, event)

    async def _listen(self) -> None:
        import psycopg

        wait = RECONNECT_S[0]
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {broadcast.CHANNEL}")
                    wait = RECONNECT_S[0]
                    self._wake.set()  # anything sent while not listening
                    async for note in conn.notifies():
                        if note.channel == broadcast.CHANNEL:
                            self._job_event(note.payload)
                        else:
                            self._wake.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("replica notifications: %s; polling every %.1f s", exc, self.poll_s)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_S[1])
