"""When to retry and how long to wait: exponential backoff with full jitter, `Retry-After` first."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({429, 503})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class RetryPolicy:
    """`max_retries` more attempts after the first; `delay` says how long before each."""

    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    # A Retry-After longer than this is not slept through: the error is raised instead.
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)]."""
        return self.rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2.0**attempt))

    def delay(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retry number `attempt + 1`; None when not to retry."""
        if attempt >= self.max_retries:
            return None
        asked = parse_retry_after(retry_after)
        if asked is None:
            return self.backoff(attempt)
        if asked > self.max_retry_after:
            return None
        # Never earlier than asked; a little jitter so many clients do not return in step.
        return asked + self.rng.uniform(0.0, min(1.0, 0.1 * asked + 0.05))
