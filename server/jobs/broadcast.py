"""Job events across processes (PostgreSQL): whoever changes a job (the replica that accepted
it, the worker training it, the replica registering its voice) sends each public event with
``pg_notify('voicefoundry_jobs', ...)``; every replica LISTENs (server/replicas.py) and hands the
events of other processes to its own `/jobs/{id}/events` listeners.

A notification carries at most 8000 bytes: a bigger event goes without its log tail, and one
still too big as just its kind and state (a listener reads the rest with `GET /jobs/{id}`).
Notifications are best effort, as the events of one process are: `GET /jobs/{id}` reads the row.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa

from server.jobs.events import PublicEvent
from server.registry import Registry

log = logging.getLogger("voicefoundry.jobs")

CHANNEL = "voicefoundry_jobs"
MAX_PAYLOAD = 7900  # PostgreSQL's limit is 8000 bytes


def encode(origin: str, job_id: str, event: PublicEvent) -> str:
    """The notification's payload for `event` (cut down to fit, see the module docstring)."""
    message: dict[str, Any] = {"origin": origin, "job": job_id, "event": event}
    payload = json.dumps(message)
    if len(payload.encode()) > MAX_PAYLOAD and "log_tail" in event:
        message["event"] = {k: v for k, v in event.items() if k != "log_tail"}
        payload = json.dumps(message)
    if len(payload.encode()) > MAX_PAYLOAD:
        kept = {k: event[k] for k in ("event", "state") if k in event}
        message["event"] = kept
        payload = json.dumps(message)
    return payload


def decode(payload: str) -> tuple[str, str, PublicEvent] | None:
    """(origin, job id, event) of a notification; None for one that is not ours."""
    try:
        message = json.loads(payload)
        origin, job_id, event = message["origin"], message["job"], message["event"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(origin, str) and isinstance(job_id, str) and isinstance(event, dict)):
        return None
    return origin, job_id, event


class JobBroadcast:
    """Sends this process's job events to the other processes sharing the registry."""

    def __init__(self, registry: Registry, origin: str) -> None:
        self.registry = registry
        self.origin = origin

    def __call__(self, job_id: str, event: PublicEvent) -> None:
        payload = encode(self.origin, job_id, event)
        try:
            with self.registry.transaction() as conn:
                conn.execute(
                    sa.text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": CHANNEL, "payload": payload},
                )
        except sa.exc.SQLAlchemyError as exc:  # events are best effort; the row is the truth
            log.warning("job %s: event not sent to the other replicas: %s", job_id, exc)
