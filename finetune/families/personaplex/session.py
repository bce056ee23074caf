"""One full-duplex conversation's state, and what one step gives back."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from finetune.families.personaplex.caches import WindowKVCache
from finetune.families.personaplex.mimi_stream import MimiStreamState
from finetune.families.personaplex.sampling import SamplingParams
from finetune.families.personaplex.streams import DelayedStreams

import mlx.core as mx
import numpy as np


class DuplexError(ValueError):
    """A session or an input the runtime cannot use, with the reason."""


@dataclass
class StepOut:
    pcm: np.ndarray  # float32, exactly 1920 samples of agent audio
    text_token: int  # the text token of this output frame
    text: str | None  # its text piece; None for padding / special tokens


@dataclass(eq=False)
class DuplexSession:
    """Everything one conversation owns; the runtime keeps no reference to it.

    Phases: "new" (prompts not processed yet) -> "live" (after `condition`) -> "closed".
    """

    seed: int
    adapter_slot: int
    sampling: SamplingParams
    rng_key: mx.array  # one key, or [2, ...]: the text stream's and the audio streams'
    voice_prompt: np.ndarray | None
    text_prompt_tokens: list[int]
    streams: DelayedStreams
    temporal_cache: list[WindowKVCache]
    encoder: MimiStreamState
    decoder: MimiStreamState
    phase: str = "new"
    live_steps: int = 0
    conditioning_steps: int = 0
    last_tokens: list[int] = field(default_factory=list)
    # The text tokens of the last live steps, for the repetition penalty.
    recent_text: deque[int] = field(default_factory=deque)

    @property
    def position(self) -> int:
        """Steps taken so far, conditioning included."""
        return self.streams.offset

    def free(self) -> None:
        for cache in self.temporal_cache:
            cache.clear()
        self.temporal_cache = []
        self.encoder = MimiStreamState(values=[], caches=[])
        self.decoder = MimiStreamState(values=[], caches=[])
        self.voice_prompt = None
        self.phase = "closed"
