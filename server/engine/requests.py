"""What a speech request is, family-neutral: its voice, sampling options and the job the engine
works through segment by segment (results go back to the event loop through `out`)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.sampling import Sampling

import numpy as np


@dataclass(frozen=True)
class ContextClip:
    """A clip and its transcript that condition a voice (CSM's context segments)."""

    audio: Path
    text: str


@dataclass
class Voicing:
    """How a request's voice is made, for the model named `model`.

    Qwen3-TTS: a speaker name (builtin or baked), or a clone clip. CSM: a builtin speaker name or
    an integer speaker id, with optional context clips. Either: an adapter directory.
    """

    model: str
    speaker_name: str | None = None
    ref_clip: Path | None = None
    ref_text: str | None = None  # a clone's transcript of ref_clip: the in-context (ICL) path
    adapter: Path | None = None
    speaker_id: int | None = None
    context: tuple[ContextClip, ...] = ()
    # Qwen3-TTS: codec rows of new languages the voice brought (name, row).
    language_rows: tuple[tuple[str, int], ...] = ()


@dataclass
class SpeakJob:
    voicing: Voicing
    segments: list[str]
    language: str | None
    sampling: Sampling
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    chunk_frames: int = 6
    # Qwen3-TTS CustomVoice / VoiceDesign: the request's instruct (checked by the server first).
    instruct: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    next_segment: int = 0
    frames_made: int = 0
    audio_seconds: float = 0.0
    sent: int = 0  # frames of the current segment already decoded to audio
    # The current segment's audio so far (a non-streaming job sends it joined at the end).
    segment_audio: list[np.ndarray] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Set by the engine: its round count when the job was queued, when the job's wall-time
    # budget runs out, and why it was stopped (a budget it went over, its audio failing to
    # decode): it then ends with that error.
    queued_round: int = 0
    deadline: float | None = None
    stop_error: BaseException | None = None
    # perf_counter times: first admitted into a batch, first audio sent (metrics).
    admitted: float | None = None
    first_audio: float | None = None
    # Continuous scheduling: the round (turn) its current segment started in.
    segment_round: int | None = None

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    @property
    def text(self) -> str:
        """The segment being made now."""
        return self.segments[self.next_segment]

    @property
    def segment_seed(self) -> int | None:
        """Each segment draws from its own seed, so a long text is reproducible piecewise."""
        return None if self.seed is None else self.seed + self.next_segment


@dataclass
class Done:
    frames: int
    seconds: float
