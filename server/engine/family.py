"""The surface every served speech family implements, and loading a model by its family.

The engine (server/engine/worker.py) knows only this surface: it asks a model for one row per
request and segment, runs a batch of rows, and asks for audio (streamed ranges, or the whole
segment). Everything about prompts, sampling and codecs stays inside the family's module.

Families the speech engine does not list here (e.g. "personaplex", served by the duplex engine)
are skipped by the startup loop: `serves_family` is that hook.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.engine.bank import AdapterBank
from server.engine.requests import SpeakJob, Voicing

# family name (ModelSpec.family) -> "module:class" of its SpeechModel; imported on first use.
SPEECH_FAMILIES: dict[str, str] = {
    "qwen3_tts": "server.engine.families.qwen3:Qwen3Model",
    "csm": "server.engine.families.csm:CsmModel",
}


class SpeechRow(Protocol):
    """One request's current segment inside a batch.

    The family appends each generated frame to `frames` and then calls `on_frames` (set by the
    engine when streaming) with that frame; it stops a row whose `cancel` is set.
    """

    slot: int
    cancel: threading.Event
    frames: list[np.ndarray]
    on_frames: Callable[[np.ndarray], None] | None


class SpeechModel(Protocol):
    name: str
    family: str
    loaded: Any  # the family's loaded checkpoint; `.path` is where it came from
    bank: AdapterBank
    adapter_module: str  # what an adapter_config.json's "module" must say to fit the bank

    @property
    def sample_rate(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    def builtin_speakers(self) -> list[str]:
        """Speaker names the checkpoint itself serves (lower case)."""
        ...

    def make_row(self, job: SpeakJob, *, slot: int) -> SpeechRow:
        """A row for `job.text` in `job.voicing`'s voice, seeded with `job.segment_seed`,
        using adapter-bank slot `slot` (0 = none). Raises for a voice the model cannot make."""
        ...

    def run(self, rows: list[SpeechRow]) -> None:
        """Generate every row until it ends, hits its frame budget, or is cancelled."""
        ...

    def decode_chunk(self, row: SpeechRow, start: int, end: int) -> np.ndarray:
        """Audio of frames [start, end) of `row`. Called with consecutive ranges from 0, while
        the row is generating (from `on_frames`) and once after `run` for the rest."""
        ...

    def decode_all(self, row: SpeechRow) -> np.ndarray:
        """The whole segment's audio (non-streaming requests), after `run`."""
        ...

    def forget(self, voicing: Voicing) -> None:
        """Drop whatever the model cached for this voice (clone vectors, encoded context)."""
        ...


@dataclass(frozen=True)
class BankLimits:
    slots: int
    max_rank: int
    max_bytes: int


def serves_family(family: str) -> bool:
    return family in SPEECH_FAMILIES


def speech_model_class(family: str) -> Any:
    try:
        target = SPEECH_FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"model family {family!r} is not served by the speech engine; "
            f"served: {', '.join(sorted(SPEECH_FAMILIES))}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def load_speech_model(name: str, family: str, path: str | Path, limits: BankLimits) -> SpeechModel:
    """Load a checkpoint of `family` for serving (runs on the engine's MLX thread)."""
    return speech_model_class(family).load(
        name, str(path), slots=limits.slots, max_rank=limits.max_rank, max_bytes=limits.max_bytes
    )
