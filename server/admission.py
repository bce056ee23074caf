"""What an API key may do now, for the routes: authenticate it, count its request against its
rate, take a lease for work that runs (a synthesis, a duplex session, a training-job intake)
before that work starts, and meter what it used. The counters live in server/limits.py (limits)
and server/usage.py (usage); a refusal is `LimitExceeded` (HTTP 429 + Retry-After, or a 4429
close on the duplex socket).
"""

from __future__ import annotations

import time
import weakref
from typing import Annotated, Any

from litestar import Request, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler
from litestar.params import Parameter

from server.auth import ANONYMOUS, ApiKey, Scope, secret_from_headers
from server.limits import Lease, Limiter
from server.usage import UsageMeter, UsageReport

_SCOPE_STATE = "voicefoundry_api_key"
# Jobs that hold a key's training_jobs slot (interrupted ones resume at the next start).
HOLDING_JOB_STATES = ("queued", "preparing", "training", "baking", "interrupted")


def authenticate(connection: ASGIConnection[Any, Any, Any, Any], needed: Scope) -> ApiKey:
    """The key of `connection` (401 / 403 otherwise), its request counted (429 past its rate);
    the route reads it back with `key_of`."""
    state = connection.app.state
    key: ApiKey = state.api_keys.authenticate(secret_from_headers(connection.headers), needed)
    count_request(state, key)
    connection.scope.setdefault("state", {})[_SCOPE_STATE] = key
    return key


def guard(needed: Scope) -> Any:
    def check(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        authenticate(connection, needed)

    return check


def count_request(state: State, key: ApiKey) -> None:
    limiter: Limiter = state.limiter
    limiter.request(key.id, key.limits)
    usage: UsageMeter = state.usage
    usage.add(key.id, requests=1)


def key_of(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiKey:
    """The key the route's guard admitted; ANONYMOUS without auth (or on an open route)."""
    key = connection.scope.get("state", {}).get(_SCOPE_STATE)
    return key if isinstance(key, ApiKey) else ANONYMOUS


class Metered:
    """One admitted piece of work: the lease it holds and what it produced. `end` (idempotent)
    releases the lease and records the usage; call it in a finally, and `watch` an object whose
    collection must end it too (a response body that may never be iterated)."""

    def __init__(self, usage: UsageMeter, key: ApiKey, lease: Lease) -> None:
        self.usage = usage
        self.key = key
        self.lease = lease
        self.started = time.monotonic()
        self.amounts: dict[str, float] = {}
        self._ended = False

    def add(self, counter: str, amount: float) -> None:
        self.amounts[counter] = self.amounts.get(counter, 0.0) + amount

    def watch(self, owner: object) -> None:
        weakref.finalize(owner, self.end)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.lease.release()
        if self.amounts:
            self.usage.add(self.key.id, **self.amounts)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def start_synthesis(state: State, key: ApiKey, characters: int) -> Metered:
    """Before a synthesis starts: a `concurrent_streams` slot and `characters` within today's
    `characters_per_day` (counted now, so parallel requests cannot all pass the check)."""
    limiter: Limiter = state.limiter
    usage: UsageMeter = state.usage
    lease = limiter.acquire(key.id, "streams", key.limits)
    try:
        cap = key.limits.characters_per_day
        if cap is not None:
            used = usage.characters_today(key.id)
            if used + characters > cap:
                raise limiter.refuse_characters(key.id, used, characters, cap)
        usage.add(key.id, characters=characters)
    except BaseException:
        lease.release()
        raise
    return Metered(usage, key, lease)


def start_duplex(state: State, key: ApiKey) -> Metered:
    limiter: Limiter = state.limiter
    return Metered(state.usage, key, limiter.acquire(key.id, "duplex", key.limits))


def start_job_intake(state: State, key: ApiKey) -> Lease:
    """Before an upload is read: a `training_jobs` slot, counting the key's jobs that are
    queued or running. Hold it until `job_created` has recorded the new job, then release."""
    limiter: Limiter = state.limiter
    usage: UsageMeter = state.usage
    held = usage.jobs_of(key.id, HOLDING_JOB_STATES) if key.limits.training_jobs else 0
    return limiter.acquire(key.id, "jobs", key.limits, held=held)


@get(
    "/usage",
    guards=[guard("admin")],
    summary="Usage per API key id: totals and per UTC day (admin)",
    sync_to_thread=True,
)
def usage_report(
    request: Request[Any, Any, Any],
    days: Annotated[int, Parameter(ge=1, le=366)] = 31,
    key_id: Annotated[str | None, Parameter(max_length=64)] = None,
) -> UsageReport:
    state = request.app.state
    labels = {key.id: key.label for key in state.api_keys.keys}
    meter: UsageMeter = state.usage
    return meter.report(labels, days, key_id)
