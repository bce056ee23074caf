"""Per-key usage: requests, characters synthesised, seconds of audio produced, duplex seconds
and training seconds, per key id and UTC day.

Counted in memory as it happens (so limits and `/metrics` read it at no cost) and written to
two small tables of the registry's SQLite file by `flush()`: every `usage_flush_s` and when the
server stops, so usage survives a restart (a crash loses at most the last interval). The key id
is the public part of a key, never its secret; without auth everything is ``anonymous``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from server.registry import Registry

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS key_usage (
        key_id           TEXT NOT NULL,
        day              TEXT NOT NULL,
        requests         INTEGER NOT NULL DEFAULT 0,
        characters       INTEGER NOT NULL DEFAULT 0,
        audio_seconds    REAL NOT NULL DEFAULT 0,
        duplex_seconds   REAL NOT NULL DEFAULT 0,
        training_seconds REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    )""",
    # Which key created a fine-tune job: its training seconds and its training_jobs limit.
    """CREATE TABLE IF NOT EXISTS job_keys (
        job_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL
    )""",
)
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
            for statement in _SCHEMA:
                conn.execute(statement)
            rows = conn.execute(
                f"SELECT key_id, day, {', '.join(COUNTERS)} FROM key_usage"
            ).fetchall()
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
            conn.execute(
                "INSERT OR REPLACE INTO job_keys (job_id, key_id) VALUES (?, ?)", (job_id, key_id)
            )

    def job_key(self, job_id: str) -> str | None:
        with self.registry.transaction() as conn:
            row = conn.execute("SELECT key_id FROM job_keys WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row is not None else None

    def jobs_of(self, key_id: str, states: tuple[str, ...]) -> int:
        """How many jobs `key_id` created are in one of `states`."""
        marks = ", ".join("?" * len(states))
        with self.registry.transaction() as conn:
            row = conn.execute(
                "SELECT count(*) FROM job_keys JOIN jobs ON jobs.id = job_keys.job_id "
                f"WHERE job_keys.key_id = ? AND jobs.state IN ({marks})",
                (key_id, *states),
            ).fetchone()
        return int(row[0])

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
                    values = [getattr(usage, name) for name in COUNTERS]
                    conn.execute(
                        f"INSERT INTO key_usage (key_id, day, {', '.join(COUNTERS)}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, day) DO UPDATE SET "
                        + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS),
                        (key_id, day, *values),
                    )
        except BaseException:
            with self._lock:  # written next time
                for slot, usage in pending.items():
                    self._pending[slot].add(usage)
            raise

    def report(self, labels: dict[str, str], days: int, key_id: str | None = None) -> UsageReport:
        """Totals and the last `days` days of every key (or one), flushed first."""
        self.flush()
        query = f"SELECT key_id, day, {', '.join(COUNTERS)} FROM key_usage"
        params: tuple[Any, ...] = ()
        if key_id is not None:
            query, params = query + " WHERE key_id = ?", (key_id,)
        with self.registry.transaction() as conn:
            rows = conn.execute(query + " ORDER BY key_id, day DESC", params).fetchall()
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
