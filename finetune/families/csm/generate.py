"""CSM speech generation on mlx-audio's own frame step, without its hub calls.

The prompt is Sesame's, built by `conditioning.prompt_frames` (the same function training
builds its examples with): context clips, each `[speaker]text` + audio + an all-zero EOS frame,
then the `[speaker]text` to speak. Each step runs mlx-audio's `SesameModel.generate_frame`
(backbone over the sequence, depth decoder over the codebooks) with our sampler; an all-zero
frame ends the utterance. Audio comes from Mimi's streaming decoder, so `synthesize` and
`stream_audio` give the same samples.

Differences from mlx-audio's `Model.generate`: no default voice prompt from the hub, no
"voice match" rewriting of the first context segment, and sampling only among the 2048 real
codes (the ids above are special tokens Mimi cannot decode). A seed fixes every draw without
touching MLX's global random state.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

from finetune.families.csm.checkpoint import LoadedCsm
from finetune.families.csm.conditioning import (
    ContextClip,
    Frames,
    GenerationError,
    audio_frames,
    encode_audio,
    prompt_frames,
    text_frames,
)
from finetune.families.csm.mimi import FRAME_SAMPLES

import mlx.core as mx
import numpy as np

CODEBOOK_SIZE = 2048  # Mimi's codes; audio ids 2048-2050 are CSM specials
MAX_SEQUENCE = 2048  # the backbone's RoPE table
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 50


class FrameSampler:
    """Top-k / temperature sampling over the real codes, from its own PRNG key."""

    def __init__(self, seed: int | None, temperature: float, top_k: int) -> None:
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0: no limit), got {top_k}")
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.key = mx.random.key(self.seed)
        self.temperature = float(temperature)
        self.top_k = int(top_k)

    def __call__(self, logits: mx.array) -> mx.array:
        logits = logits[..., :CODEBOOK_SIZE].astype(mx.float32)
        if self.temperature == 0.0:
            return mx.argmax(logits, axis=-1)
        if 0 < self.top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -self.top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logits / self.temperature, axis=-1, key=draw)


def iter_frames(
    loaded: LoadedCsm,
    text: str,
    *,
    speaker: int,
    context: Sequence[ContextClip] = (),
    seed: int | None = None,
    max_audio_frames: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
) -> Iterator[np.ndarray]:
    """Each generated frame's codes ([N] int32) until the EOS frame or `max_audio_frames`."""
    if max_audio_frames < 1:
        raise GenerationError(f"max_audio_frames must be >= 1, got {max_audio_frames}")
    prompt = prompt_frames(loaded, text, speaker, context)
    if len(prompt) + max_audio_frames > MAX_SEQUENCE:
        raise GenerationError(
            f"prompt of {len(prompt)} frames + {max_audio_frames} audio frames exceeds the "
            f"model's {MAX_SEQUENCE}-frame window: shorten the text or the context"
        )
    sampler = FrameSampler(seed, temperature, top_k)
    sesame = loaded.backbone
    sesame.reset_caches()
    tokens = mx.array(prompt.tokens)[None]
    mask = mx.array(prompt.mask)[None]
    n = loaded.num_codebooks
    frame_mask = mx.array(np.arange(n + 1) < n)[None, None]
    position = mx.arange(len(prompt))[None]  # generate_frame takes it; its caches hold positions
    for _ in range(max_audio_frames):
        sample = sesame.generate_frame(tokens, mask, position, sampler)  # [1, N]
        codes = np.asarray(sample[0], np.int32)
        if not codes.any():
            return
        yield codes
        tokens = mx.concatenate([sample.astype(mx.int32), mx.zeros((1, 1), mx.int32)], axis=1)
        tokens = tokens[:, None, :]
        mask = frame_mask
        position = position[:, -1:] + 1


def generate_codes(loaded: LoadedCsm, text: str, **kwargs: object) -> np.ndarray:
    """All frames of one utterance: [T, N] int32 (T may be 0 if EOS came first)."""
    frames = list(iter_frames(loaded, text, **kwargs))  # type: ignore[arg-type]
    return np.stack(frames) if frames else np.zeros((0, loaded.num_codebooks), np.int32)


def decode_codes(loaded: LoadedCsm, codes: np.ndarray) -> np.ndarray:
    """[T, N] codes -> float32 audio of T x 1920 samples (a fresh decoder state)."""
    decoder = loaded.model._streaming_decoder
    decoder.reset()
    return _decode(decoder, codes)


def _decode(decoder: object, codes: np.ndarray) -> np.ndarray:
    if len(codes) == 0:
        return np.zeros(0, np.float32)
    batch = mx.array(np.asarray(codes, np.int32).T[None])  # [1, N, T]
    pcm = decoder.decode_frames(batch)  # type: ignore[attr-defined]
    return np.asarray(pcm.reshape(-1), np.float32)


def stream_audio(
    loaded: LoadedCsm,
    text: str,
    *,
    speaker: int,
    context: Sequence[ContextClip] = (),
    seed: int | None = None,
    max_audio_frames: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
    chunk_frames: int = 6,
) -> Iterator[np.ndarray]:
    """float32 24 kHz chunks of `chunk_frames` x 1920 samples (the last may be shorter)."""
    if chunk_frames < 1:
        raise GenerationError(f"chunk_frames must be >= 1, got {chunk_frames}")
    decoder = loaded.model._streaming_decoder
    decoder.reset()
    pending: list[np.ndarray] = []
    frames = iter_frames(
        loaded,
        text,
        speaker=speaker,
        context=context,
        seed=seed,
        max_audio_frames=max_audio_frames,
        temperature=temperature,
        top_k=top_k,
    )
    for codes in frames:
        pending.append(codes)
        if len(pending) == chunk_frames:
            yield _decode(decoder, np.stack(pending))
            pending = []
    if pending:
        yield _decode(decoder, np.stack(pending))


def synthesize(
    loaded: LoadedCsm,
    text: str,
    *,
    speaker: int,
    context: Sequence[ContextClip] = (),
    seed: int | None = None,
    max_audio_frames: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = DEFAULT_TOP_K,
) -> np.ndarray:
    """One utterance as float32 24 kHz audio (a multiple of 1920 samples; empty if the model
    ended at once)."""
    chunks = list(
        stream_audio(
            loaded,
            text,
            speaker=speaker,
            context=context,
            seed=seed,
            max_audio_frames=max_audio_frames,
            temperature=temperature,
            top_k=top_k,
            chunk_frames=max(1, min(max_audio_frames, 32)),
        )
    )
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


__all__ = [
    "FRAME_SAMPLES",
    "ContextClip",
    "FrameSampler",
    "Frames",
    "GenerationError",
    "audio_frames",
    "decode_codes",
    "encode_audio",
    "generate_codes",
    "iter_frames",
    "prompt_frames",
    "stream_audio",
    "synthesize",
    "text_frames",
]
