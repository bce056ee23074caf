"""The ONE definition of what a CSM voice conditions its model on, for training and serving.

A CSM voice is a speaker id, an optional adapter and optional context clips. The prompt is
Sesame's: each context clip is `[speaker]text` (wrapped in `<|begin_of_text|>` /
`<|end_of_text|>` by the tokenizer) followed by its audio frames and an all-zero EOS frame, then
the `[speaker]text` to speak. Frames are `[codebook_0 .. codebook_{N-1}, text]` rows with a mask
saying which entries count.

`prompt_frames` builds that prompt for generation (the server's rows, `generate.iter_frames`);
`training_sequence` builds a training example as the same prompt followed by the clip's audio
frames and EOS, so a voice is trained on exactly the prefix it is served with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune.families.csm.checkpoint import LoadedCsm

import mlx.core as mx
import numpy as np


class GenerationError(ValueError):
    """A generation request that cannot be served as asked."""


@dataclass(frozen=True)
class ContextClip:
    """A previous turn: what was said, by which speaker id, and its audio (or its Mimi codes)."""

    text: str
    speaker: int
    audio: np.ndarray | None = None  # float32 mono at 24 kHz
    codes: np.ndarray | None = None  # [T, num_codebooks] Mimi codes, instead of audio


@dataclass(frozen=True)
class Frames:
    """Backbone input rows: tokens [L, N + 1] int32 and mask [L, N + 1] bool."""

    tokens: np.ndarray
    mask: np.ndarray

    @staticmethod
    def concat(parts: Sequence[Frames]) -> Frames:
        return Frames(
            np.concatenate([p.tokens for p in parts]), np.concatenate([p.mask for p in parts])
        )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def speaker_text(loaded: LoadedCsm, text: str, speaker: int) -> str:
    if loaded.config.get("speaker_prefix_space", False):
        return f"[{speaker}] {text.lstrip()}"
    return f"[{speaker}]{text}"


def text_frames(loaded: LoadedCsm, text: str, speaker: int) -> Frames:
    ids = loaded.tokenizer.encode(speaker_text(loaded, text, speaker))
    width = loaded.num_codebooks + 1
    tokens = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return Frames(tokens, mask)


def audio_frames(codes: np.ndarray, *, eos: bool = True) -> Frames:
    """[T, N] codes (+ an all-zero EOS frame) as audio rows."""
    codes = np.asarray(codes, np.int32)
    if eos:
        codes = np.concatenate([codes, np.zeros((1, codes.shape[1]), np.int32)])
    t, n = codes.shape
    tokens = np.zeros((t, n + 1), np.int32)
    mask = np.zeros((t, n + 1), bool)
    tokens[:, :n] = codes
    mask[:, :n] = True
    return Frames(tokens, mask)


def encode_audio(loaded: LoadedCsm, audio: np.ndarray) -> np.ndarray:
    """float32 mono 24 kHz -> [T, N] int32 Mimi codes (T = ceil(samples / 1920))."""
    wav = mx.array(np.asarray(audio, np.float32).reshape(-1))
    codes = loaded.mimi.encode(wav[None, None, :])[0]  # [N, T]
    return np.asarray(codes, np.int32).T.copy()


def context_frames(loaded: LoadedCsm, clip: ContextClip) -> Frames:
    if (clip.audio is None) == (clip.codes is None):
        raise GenerationError("a context clip needs exactly one of audio or codes")
    codes = encode_audio(loaded, clip.audio) if clip.audio is not None else np.asarray(clip.codes)
    if codes.ndim != 2 or codes.shape[1] != loaded.num_codebooks or codes.shape[0] == 0:
        raise GenerationError(
            f"context codes have shape {codes.shape}, expected [T>=1, {loaded.num_codebooks}]"
        )
    check_speaker(clip.speaker)
    return Frames.concat([text_frames(loaded, clip.text, clip.speaker), audio_frames(codes)])


def prompt_frames(
    loaded: LoadedCsm, text: str, speaker: int, context: Sequence[ContextClip] = ()
) -> Frames:
    """Everything before the first audio frame to generate: context clips, then `[speaker]text`.
    Its last row's hidden state predicts the first audio frame."""
    check_speaker(speaker)
    if not text.strip():
        raise GenerationError("nothing to say: the text is empty")
    parts = [context_frames(loaded, clip) for clip in context]
    return Frames.concat([*parts, text_frames(loaded, text, speaker)])


def training_sequence(
    loaded: LoadedCsm,
    text: str,
    speaker: int,
    codes: np.ndarray,
    context: Sequence[ContextClip] = (),
) -> tuple[Frames, int]:
    """A training example: the served prompt, then the clip's audio frames and EOS; and the
    prompt's length (position `len - 1` onwards predicts the clip's frames)."""
    prompt = prompt_frames(loaded, text, speaker, context)
    return Frames.concat([prompt, audio_frames(codes)]), len(prompt)


def check_speaker(speaker: int) -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise GenerationError(f"speaker must be a non-negative integer id, got {speaker!r}")
