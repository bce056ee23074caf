"""The ONE definition of how a duplex voice conditions PersonaPlex, for training and serving.

A session starts with forced prompt frames, in NVIDIA's order: the voice prompt (normalised to
-24 LUFS, streamed through a fresh Mimi encoder) as agent tokens with text PAD and sine tokens
on the user stream; 0.5 s of agent silence; the text prompt `<system> ... <system>`, one forced
text token a frame; 0.5 s of silence. The conversation follows.

The runtime (`runtime.py`) feeds `prompt_frames` through its delayed streams; training
(`training.py`) prepends `prefix_codes` to every exchange with `conditioned_codes`, so the
teacher-forced sequence is token for token what a session reads (tests/
test_personaplex_conditioning.py pins it). The streams' first step only seeds the initial
tokens (Moshi's `LMGen`): the first prompt frame is never read, and `conditioned_codes` drops
it too. Prompt frames carry no loss: a session never samples them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.families.personaplex.layout import (
    FRAME_SIZE,
    SAMPLE_RATE,
    SILENCE_TOKENS,
    SINE_TOKENS,
    STREAM_CODEBOOKS,
    TEXT_PAD_ID,
    spacer_steps,
)
from finetune.families.personaplex.loudness import normalize_loudness
from finetune.families.personaplex.text_tokenizer import text_prompt_tokens

import mlx.core as mx
import numpy as np

VOICE_PROMPT_CHUNK_FRAMES = 25

Codes = Sequence[int] | np.ndarray
Frame = tuple[int, Codes, Codes]  # (text, agent codes, user codes)


@dataclass(frozen=True)
class DuplexConditioning:
    """What a session is conditioned on: the voice prompt's agent codes and the text prompt."""

    voice_prompt_codes: np.ndarray | None = None  # [8, frames] int
    text_prompt_tokens: list[int] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        streamer: Any,
        tokenizer: Any,
        *,
        voice_prompt: np.ndarray | None,
        text_prompt: str | None,
    ) -> DuplexConditioning:
        """From 24 kHz mono audio and the role text; `streamer` is a `MimiStreamer`."""
        codes = None if voice_prompt is None else encode_voice_prompt(streamer, voice_prompt)
        return cls(codes, text_prompt_tokens(tokenizer, text_prompt))


def encode_voice_prompt(streamer: Any, audio: np.ndarray) -> np.ndarray:
    """Agent codes [8, frames] of a voice prompt, streamed through a fresh Mimi encoder."""
    pcm = normalize_loudness(np.asarray(audio, dtype=np.float32).reshape(-1), SAMPLE_RATE)
    frames = max(1, -(-pcm.shape[0] // FRAME_SIZE))
    pcm = np.pad(pcm, (0, frames * FRAME_SIZE - pcm.shape[0]))
    state = streamer.new_encoder()
    chunks = []
    step = VOICE_PROMPT_CHUNK_FRAMES * FRAME_SIZE
    for start in range(0, pcm.shape[0], step):
        codes = streamer.encode(state, mx.array(pcm[start : start + step]))
        mx.eval(codes, state.arrays())
        chunks.append(np.array(codes)[0])
    return np.concatenate(chunks, axis=1).astype(np.int64)


def prompt_frames(cond: DuplexConditioning) -> list[Frame]:
    """The forced frames a session runs before it goes live."""
    spacer: list[Frame] = [(TEXT_PAD_ID, SILENCE_TOKENS, SINE_TOKENS)] * spacer_steps()
    frames: list[Frame] = []
    codes = cond.voice_prompt_codes
    if codes is not None:
        frames += [(TEXT_PAD_ID, codes[:, f], SINE_TOKENS) for f in range(codes.shape[1])]
    frames += spacer
    frames += [(t, SILENCE_TOKENS, SINE_TOKENS) for t in cond.text_prompt_tokens]
    frames += spacer
    return frames


def prefix_codes(cond: DuplexConditioning) -> np.ndarray:
    """`prompt_frames` as [frames, 17] int32: text, agent codebooks, user codebooks."""
    rows = [
        [int(text), *(int(a) for a in agent), *(int(u) for u in user)]
        for text, agent, user in prompt_frames(cond)
    ]
    out = np.asarray(rows, dtype=np.int32)
    if out.shape[1] != 1 + 2 * STREAM_CODEBOOKS:
        raise ValueError(f"prompt frames have {out.shape[1]} streams, expected 17")
    return out


def conditioned_codes(prefix: np.ndarray, exchange: np.ndarray) -> tuple[np.ndarray, int]:
    """(the [T, 17] sequence a session reads for `exchange` after `prefix`, the number of
    prompt frames in it: no loss there). The first prompt frame is dropped (never read)."""
    if prefix.shape[0] < 1:
        raise ValueError("a session always has prompt frames (the spacers)")
    kept = prefix[1:]
    codes = np.concatenate([kept, exchange], axis=0).astype(np.int32)
    return np.ascontiguousarray(codes), int(kept.shape[0])
