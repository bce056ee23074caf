"""Per-key usage: requests, characters synthesised, seconds of audio produced, duplex seconds
and training seconds, per key id and UTC day.

Counted in memory as it happens (so limits and `/metrics` read it at no cost) and written to
two small tables of the registry's database (key_usage, job_keys: server/db) by `flush()`:
every `usage_flush_s` and when the server stops, so usage survives a restart (a crash loses at
most the last interval). The key id is the public part of a key, never its secret; without auth
everything is ``anonymous``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from server.db.schema import job_keys, jobs, key_usage
from server.registry import Registry, upsert

COUNTERS = ("requests", "characters", "audio_seconds", "duplex_seconds", "training_seconds")


class Usage(msgspec.Struct, kw_only=True):
    requests: int = 0
    characters: int = 0
    audio_seconds: float = 0.0
    duplex_seconds: float = 0.0
    training_seconds: float = 0.0

    def add(self, other: Usage) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def rounded(self) -> Usage:
        return Usage(
            requests=self.requests,
            characters=self.characters,
            audio_seconds=round(self.audio_seconds, 3),
            duplex_seconds=round(self.duplex_seconds, 3),
            training_seconds=round(self.training_seconds, 3),
        )


class DayUsage(Usage, kw_only=True):
    day: str


class KeyUsage(msgspec.Struct, kw_only=True):
    key_id: str
    label: str | None  # None: the key is no longer in the key file
    totals: Usage
    days: list[DayUsage]


class UsageReport(msgspec.Struct, kw_only=True):
    keys: list[KeyUsage]


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


class UsageMeter:
    def __init__(self, registry: Registry, today: Callable[[], str] = utc_day) -> None:
        self.registry = registry
        self._today = today
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], Usage] = defaultdict(Usage)
        self._totals: dict[str, Usage] = defaultdict(Usage)
        self._day = today()
        self._chars_today: dict[str, int] = defaultdict(int)
        with registry.transaction() as conn:
            rows = conn.execute(sa.select(key_usage)).mappings().all()
        for row in rows:
            self._totals[row["key_id"]].add(_usage(row))
            if row["day"] == self._day:
                self._chars_today[row["key_id"]] = row["characters"]

    # --- counting -----------------------------------------------------------------------
    def add(self, key_id: str, **amounts: float) -> None:
        """Add to `key_id`'s counters of today (names from COUNTERS)."""
        delta = Usage(**amounts)  # type: ignore[arg-type]
        with self._lock:
            day = self._roll()
            self._pending[(key_id, day)].add(delta)
            self._totals[key_id].add(delta)
            self._chars_today[key_id] += delta.characters

    def characters_today(self, key_id: str) -> int:
        with self._lock:
            self._roll()
            return self._chars_today.get(key_id, 0)

    def totals(self) -> dict[str, Usage]:
        with self._lock:
            return {k: Usage(**msgspec.structs.asdict(u)) for k, u in self._totals.items()}

    def _roll(self) -> str:
        day = self._today()
        if day != self._day:
            self._day = day
            self._chars_today.clear()
        return day

    # --- jobs ---------------------------------------------------------------------------
    def job_created(self, job_id: str, key_id: str) -> None:
        with self.registry.transaction() as conn:
            insert = upsert(conn, job_keys).values(job_id=job_id, key_id=key_id)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[job_keys.c.job_id], set_={"key_id": insert.excluded.key_id}
                )
            )

    def job_key(self, job_id: str) -> str | None:
        with self.registry.transaction() as conn:
            key_id = conn.execute(
                sa.select(job_keys.c.key_id).where(job_keys.c.job_id == job_id)
            ).scalar_one_or_none()
        return key_id

    def jobs_of(self, key_id: str, states: tuple[str, ...]) -> int:
        """How many jobs `key_id` created are in one of `states`."""
        query = (
            sa.select(sa.func.count())
            .select_from(job_keys.join(jobs, jobs.c.id == job_keys.c.job_id))
            .where(job_keys.c.key_id == key_id, jobs.c.state.in_(states))
        )
        with self.registry.transaction() as conn:
            return int(conn.execute(query).scalar_one())

    def training_ended(self, job_id: str, seconds: float) -> None:
        """A training process of `job_id` ran `seconds` (wall time); counted to its key."""
        key_id = self.job_key(job_id)
        if key_id is not None:
            self.add(key_id, training_seconds=seconds)

    # --- persistence --------------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(Usage)
        if not pending:
            return
        try:
            with self.registry.transaction() as conn:
                for (key_id, day), usage in pending.items():
                    values = {name: getattr(usage, name) for name in COUNTERS}
                    insert = upsert(conn, key_usage).values(key_id=key_id, day=day, **values)
                    added = {c: key_usage.c[c] + insert.excluded[c] for c in COUNTERS}
                    conn.execute(
                        insert.on_conflict_do_update(
                            index_elements=[key_usage.c.key_id, key_usage.c.day], set_=added
                        )
                    )
        except BaseException:
            with self._lock:  # written next time
                for slot, usage in pending.items():
                    self._pending[slot].add(usage)
            raise

    def report(self, labels: dict[str, str], days: int, key_id: str | None = None) -> UsageReport:
        """Totals and the last `days` days of every key (or one), flushed first."""
        self.flush()
        query = sa.select(key_usage)
        if key_id is not None:
            query = query.where(key_usage.c.key_id == key_id)
        with self.registry.transaction() as conn:
            found = conn.execute(query).mappings().all()
        # Sorted here, not in SQL: the same order (code points) on SQLite and PostgreSQL.
        rows = sorted(found, key=lambda r: r["day"], reverse=True)
        rows.sort(key=lambda r: r["key_id"])
        by_key: dict[str, KeyUsage] = {}
        for row in rows:
            entry = by_key.setdefault(
                row["key_id"],
                KeyUsage(
                    key_id=row["key_id"], label=labels.get(row["key_id"]), totals=Usage(), days=[]
                ),
            )
            usage = _usage(row)
            entry.totals.add(usage)
            if len(entry.days) < days:
                entry.days.append(
                    DayUsage(day=row["day"], **msgspec.structs.asdict(usage.rounded()))
                )
        for known, label in labels.items():  # keys with no usage yet are listed too
            if key_id in (None, known) and known not in by_key:
                by_key[known] = KeyUsage(key_id=known, label=label, totals=Usage(), days=[])
        for entry in by_key.values():
            entry.totals = entry.totals.rounded()
        return UsageReport(keys=[by_key[k] for k in sorted(by_key)])


def _usage(row: Any) -> Usage:
    return Usage(**{name: row[name] for name in COUNTERS})
