"""What `GET /jobs/{id}/events` streams: the job's state changes and the trainer's progress
events, fanned out to every listener of the job, without what a client must not see (the
trainer's pid, paths on this server)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from finetune.progress import ProgressEvent, Quality

import msgspec

# What job events never show a client: the trainer's pid and paths on this server.
PRIVATE_EVENT_FIELDS = frozenset(
    {"pid", "ref_clip", "path", "checkpoint", "package_dir", "package", "task_id", "worker"}
)

PublicEvent = dict[str, Any]


def preview_url(job_id: str, step: int) -> str:
    return f"/jobs/{job_id}/previews/{step}"


def public_progress(job_id: str, event: ProgressEvent) -> PublicEvent:
    """A progress event as a client sees it (`event` is its kind)."""
    fields = msgspec.to_builtins(event)
    public = {k: v for k, v in fields.items() if k not in PRIVATE_EVENT_FIELDS}
    if isinstance(event, Quality) and event.preview:
        public["preview"] = preview_url(job_id, event.step)
    return public


def public_state(state: str, fields: dict[str, Any]) -> PublicEvent:
    """A change of the job's state or fields as a client sees it."""
    public = {k: v for k, v in fields.items() if k not in PRIVATE_EVENT_FIELDS}
    return {"event": "state", "state": state, **public}


class JobEvents:
    """Per-job listener queues (one per open event stream)."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[asyncio.Queue[PublicEvent]]] = {}

    def subscribe(self, job_id: str) -> asyncio.Queue[PublicEvent]:
        queue: asyncio.Queue[PublicEvent] = asyncio.Queue()
        self._listeners.setdefault(job_id, []).append(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[PublicEvent]) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._listeners[job_id].remove(queue)
            if not self._listeners[job_id]:
                del self._listeners[job_id]

    def publish(self, job_id: str, event: PublicEvent) -> None:
        for queue in self._listeners.get(job_id, []):
            queue.put_nowait(event)
