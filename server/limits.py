"""Per-key limits: what one API key may do at once and per period (in memory, per process).

`KeyLimits` is what the key file holds for a key (every field optional: no limit). `Limiter`
keeps the counters: a sliding one-minute window of requests, leases for things that run
(synthesis streams, duplex sessions, training-job intakes) and answers `LimitExceeded` with the
seconds after which the same request may succeed (the HTTP ``Retry-After``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
# Things a key holds while they run; a lease is taken before the work starts.
LeaseKind = Literal["streams", "duplex", "jobs"]
WINDOW_S = 60.0
# How long a refused caller waits when we cannot know when a running thing ends.
BUSY_RETRY_S = {"streams": 1, "duplex": 1, "jobs": 30}


class KeyLimits(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True, frozen=True
):
    requests_per_minute: Positive | None = None
    concurrent_streams: Positive | None = None  # /speak + /v1/audio/speech in flight
    duplex_sessions: Positive | None = None
    training_jobs: Positive | None = None  # jobs queued or running at once
    characters_per_day: Positive | None = None  # synthesised text, per UTC day

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__struct_fields__)

    def cap(self, kind: LeaseKind) -> int | None:
        return {
            "streams": self.concurrent_streams,
            "duplex": self.duplex_sessions,
            "jobs": self.training_jobs,
        }[kind]


NO_LIMITS = KeyLimits()


class LimitExceeded(Exception):
    """A key is over one of its limits; `retry_after` is whole seconds (>= 1)."""

    def __init__(self, key_id: str, limit: str, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.key_id = key_id
        self.limit = limit
        self.detail = detail
        self.retry_after = max(1, math.ceil(retry_after))


def seconds_to_next_utc_day(now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


@dataclass
class Lease:
    """One running thing counted against a key; `release` is idempotent (call it in finally)."""

    limiter: Limiter
    key_id: str
    kind: LeaseKind
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self)


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._active: dict[tuple[str, LeaseKind], int] = defaultdict(int)
        self.refused: dict[tuple[str, str], int] = defaultdict(int)  # (key id, limit) -> 429s

    def request(self, key_id: str, limits: KeyLimits) -> None:
        """Count one request of `key_id`; LimitExceeded past `requests_per_minute`."""
        cap = limits.requests_per_minute
        now = self._clock()
        with self._lock:
            recent = self._recent[key_id]
            while recent and recent[0] <= now - WINDOW_S:
                recent.popleft()
            if cap is not None and len(recent) >= cap:
                wait = recent[len(recent) - cap] + WINDOW_S - now
                self._refuse(key_id, "requests_per_minute")
                raise LimitExceeded(
                    key_id,
                    "requests_per_minute",
                    f"API key {key_id!r} is limited to {cap} requests per minute",
                    wait,
                )
            recent.append(now)
            if cap is None and len(recent) > 4096:  # unlimited keys: keep the window bounded
                recent.popleft()

    def acquire(self, key_id: str, kind: LeaseKind, limits: KeyLimits, held: int = 0) -> Lease:
        """A lease of `kind`, or LimitExceeded when `key_id` holds its cap (plus `held` things
        counted elsewhere, e.g. jobs already in the registry)."""
        cap = limits.cap(kind)
        with self._lock:
            if cap is not None and self._active[(key_id, kind)] + held >= cap:
                limit = {
                    "streams": "concurrent_streams",
                    "duplex": "duplex_sessions",
                    "jobs": "training_jobs",
                }[kind]
                self._refuse(key_id, limit)
                raise LimitExceeded(
                    key_id,
                    limit,
                    f"API key {key_id!r} already has {cap} {_NOUNS[kind]} (its {limit} limit)",
                    BUSY_RETRY_S[kind],
                )
            self._active[(key_id, kind)] += 1
        return Lease(self, key_id, kind)

    def refuse_characters(self, key_id: str, used: int, asked: int, cap: int) -> LimitExceeded:
        with self._lock:
            self._refuse(key_id, "characters_per_day")
        return LimitExceeded(
            key_id,
            "characters_per_day",
            f"API key {key_id!r} has used {used} of its {cap} characters today (UTC); this "
            f"request has {asked}",
            seconds_to_next_utc_day(),
        )

    def active(self) -> dict[tuple[str, LeaseKind], int]:
        """Leases held, per (key id, kind) ever used (0 once released)."""
        with self._lock:
            return dict(self._active)

    def refusals(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.refused)

    def _refuse(self, key_id: str, limit: str) -> None:
        self.refused[(key_id, limit)] += 1

    def _release(self, lease: Lease) -> None:
        with self._lock:
            self._active[(lease.key_id, lease.kind)] -= 1


_NOUNS = {
    "streams": "synthesis requests running",
    "duplex": "duplex sessions open",
    "jobs": "training jobs",
}
