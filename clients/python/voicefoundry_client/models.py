"""Response bodies as msgspec Structs, decoded leniently: fields the server adds are ignored."""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

JOB_ACTIVE: Final = ("queued", "preparing", "training", "baking", "interrupted")
JOB_TERMINAL: Final = ("succeeded", "failed", "cancelled")


class Voice(msgspec.Struct, kw_only=True, frozen=True):
    """A speaker the server can speak with."""

    name: str
    base_model: str
    kind: str  # baked | adapter | clone | builtin ...
    slot: int | None = None
    has_adapter: bool = False
    has_ref_clip: bool = False
    default_language: str | None = None
    created_at: str | None = None
    meta: dict[str, Any] = {}


class VoiceList(msgspec.Struct, kw_only=True):
    voices: list[Voice]


class Job(msgspec.Struct, kw_only=True, frozen=True):
    """A fine-tune job: `state` is one of JOB_ACTIVE or JOB_TERMINAL."""

    id: str
    name: str
    state: str
    created_at: str | None = None
    updated_at: str | None = None
    base_model: str | None = None
    strategy: str | None = None
    clips: int | None = None
    step: int = 0
    total_steps: int | None = None
    losses: dict[str, float] = {}
    eta_s: float | None = None
    reason: str | None = None
    note: str | None = None
    voice: str | None = None
    hyper: dict[str, Any] = {}
    log_tail: list[str] = []

    @property
    def done(self) -> bool:
        return self.state in JOB_TERMINAL


class JobList(msgspec.Struct, kw_only=True):
    jobs: list[Job]


class Health(msgspec.Struct, kw_only=True):
    status: str
    models: list[str] = []


# --- job events (Server-Sent Events of GET /jobs/{id}/events) -------------------------------
class JobEvent(msgspec.Struct, kw_only=True, frozen=True):
    """Any event; `data` holds the whole JSON object as sent. Subclasses type the known kinds."""

    event: str
    data: dict[str, Any] = {}


class StateEvent(JobEvent, kw_only=True, frozen=True):
    """The job changed state or fields (`event: "state"`); the first one is the whole job."""

    state: str
    step: int | None = None
    total_steps: int | None = None
    losses: dict[str, float] | None = None
    eta_s: float | None = None
    reason: str | None = None
    note: str | None = None
    voice: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in JOB_TERMINAL


class ProgressEvent(JobEvent, kw_only=True, frozen=True):
    """One optimizer step of the trainer (`event: "step"`)."""

    step: int
    total_steps: int | None = None
    losses: dict[str, float] = {}
    eta_s: float | None = None
    epoch: int | None = None


class PhaseEvent(JobEvent, kw_only=True, frozen=True):
    """The job process entered a phase: validate, preprocess, training, baking."""

    phase: str


_LOSS_KEYS: Final = ("loss", "main", "sub", "val_loss")


def decode_job_event(text: str) -> JobEvent:
    """One SSE `data:` payload as a typed event; unknown kinds come back as a plain JobEvent."""
    try:
        data = json.loads(text)
    except ValueError:
        return JobEvent(event="message", data={"text": text})
    if not isinstance(data, dict):
        return JobEvent(event="message", data={"value": data})
    kind = str(data.get("event", "message"))
    fields = {"event": kind, "data": data}
    try:
        if kind == "state" and isinstance(data.get("state"), str):
            names = ("state", "step", "total_steps", "losses", "eta_s", "reason", "note", "voice")
            return msgspec.convert(
                {**fields, **{k: data[k] for k in names if k in data}}, StateEvent, strict=False
            )
        if kind == "step" and isinstance(data.get("step"), int):
            losses = {k: data[k] for k in _LOSS_KEYS if isinstance(data.get(k), int | float)}
            if isinstance(data.get("losses"), dict):
                losses.update(data["losses"])
            return msgspec.convert(
                {
                    **fields,
                    "step": data["step"],
                    "total_steps": data.get("total_steps"),
                    "losses": losses,
                    "eta_s": data.get("eta_s"),
                    "epoch": data.get("epoch"),
                },
                ProgressEvent,
                strict=False,
            )
        if kind == "phase" and isinstance(data.get("phase"), str):
            return PhaseEvent(event=kind, data=data, phase=data["phase"])
    except msgspec.ValidationError:
        pass  # a shape this SDK does not know: still delivered, untyped
    return JobEvent(event=kind, data=data)
