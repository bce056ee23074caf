"""Training progress: one tagged union of events, written as JSON lines (stdout or a file) by the
trainer and decoded against the same union by the server's job runner.

Each line is one `Event` subclass; its tag is the `event` field (`{"event": "step", ...}`), so a
reader decodes a line with `EVENT_DECODER.decode(line)` and matches on the class.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Literal

import msgspec


def _now() -> float:
    return round(time.time(), 3)


class Event(msgspec.Struct, tag_field="event", kw_only=True, omit_defaults=True):
    """The common part of every progress line: when it was written."""

    time: float = msgspec.field(default_factory=_now)


PhaseName = Literal["validate", "preprocess", "training", "baking", "packaging"]


class Phase(Event, tag="phase"):
    """The job entered a phase."""

    phase: PhaseName


class Preprocessed(Event, tag="preprocessed"):
    encoded: int
    skipped: int


class LanguageRow(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    row: int


class NewLanguageRows(Event, tag="language_rows"):
    """Qwen3 language training: the codec rows the new languages take."""

    rows: list[LanguageRow]


class Start(Event, tag="start"):
    step: int
    total_steps: int
    trainable_parameters: int


class Step(Event, tag="step"):
    """One optimizer step. `loss` is the total; the other losses are the family's parts (each
    family reports its own; unset ones are left out of the line)."""

    step: int
    total_steps: int
    epoch: int
    lr: float
    samples_per_s: float
    eta_s: float
    loss: float
    grad_norm: float | None = None
    main: float | None = None  # Qwen3-TTS: talker
    sub: float | None = None  # Qwen3-TTS: code predictor
    codebook0: float | None = None  # CSM
    decoder: float | None = None  # CSM
    text: float | None = None  # PersonaPlex
    audio: float | None = None  # PersonaPlex
    user_audio: float | None = None  # PersonaPlex

    def losses(self) -> dict[str, float]:
        """The step's losses by name (the total and every part it reported)."""
        return {name: value for name in STEP_LOSSES if (value := getattr(self, name)) is not None}


# The loss fields of a step, in order: the total first, then the parts families report.
STEP_LOSSES = ("loss", "main", "sub", "codebook0", "decoder", "text", "audio", "user_audio")


class Eval(Event, tag="eval"):
    step: int
    val_loss: float
    improved: bool


class Checkpoint(Event, tag="checkpoint"):
    step: int
    path: str


class Resume(Event, tag="resume"):
    step: int
    checkpoint: str


class Quality(Event, tag="quality"):
    """A quality report: the similarity of a preview to the uploaded voice (None with a reason
    when it cannot be measured), and the preview WAV's path."""

    step: int
    similarity: float | None
    preview: str | None
    reason: str | None = None


class Stopped(Event, tag="stopped"):
    """Stopped on SIGTERM after saving `checkpoint` (a restarted job resumes from it)."""

    step: int
    checkpoint: str


class Done(Event, tag="done"):
    step: int
    checkpoint: str
    loss: float | None
    best_val: float | None


class Package(Event, tag="package"):
    """The job's voice package is written at `path`."""

    path: str


class Failed(Event, tag="failed"):
    """The job stopped on an error; `reason` is the one line a person reads."""

    reason: str


ProgressEvent = (
    Phase
    | Preprocessed
    | NewLanguageRows
    | Start
    | Step
    | Eval
    | Checkpoint
    | Resume
    | Quality
    | Stopped
    | Done
    | Package
    | Failed
)

EVENT_DECODER: msgspec.json.Decoder[ProgressEvent] = msgspec.json.Decoder(ProgressEvent)


def encode_event(event: Event) -> bytes:
    """One progress line (no newline), spaced as `json.dumps` spaces it: people and scripts grep
    trainer output and job logs for `"event": "step"`."""
    return json.dumps(msgspec.to_builtins(event)).encode()


def decode_event(line: bytes | str) -> ProgressEvent:
    """One progress line as its event; raises msgspec.DecodeError (a ValidationError for a
    well-formed line of an unknown kind or with wrong fields)."""
    return EVENT_DECODER.decode(line)


class ProgressWriter:
    def __init__(self, path: Path | None = None, stream: IO[str] | None = None) -> None:
        self._file = path.open("a", buffering=1) if path is not None else None
        self._stream = stream if stream is not None else (None if path else sys.stdout)

    def emit(self, event: Event) -> None:
        line = encode_event(event).decode()
        for out in (self._file, self._stream):
            if out is not None:
                out.write(line + "\n")
                out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
