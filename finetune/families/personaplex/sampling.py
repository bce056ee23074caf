"""Top-k / temperature sampling for a batch of sessions, each with its own random stream.

Each session draws its own uniform noise from its own key, and a token is the Gumbel-max of
the top-k-masked, temperature-scaled logits: an exact draw from the top-k softmax. Because the
noise depends on nothing but the session's key, a session samples the same tokens whether it
is stepped alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    text_temperature: float = 0.7
    audio_temperature: float = 0.8
    text_top_k: int = 25
    audio_top_k: int = 250

    def problems(self) -> list[str]:
        problems = []
        for name in ("text_temperature", "audio_temperature"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                problems.append(f"{name} must be between 0 and 100, not {value}")
        for name in ("text_top_k", "audio_top_k"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0: no top-k), not {getattr(self, name)}")
        return problems


@dataclass
class StepNoise:
    """One step's uniform noise for one session: text [V_text], audio [codebooks, V_audio]."""

    text: mx.array
    audio: mx.array


def draw_noise(
    key: mx.array, text_vocab: int, audio_vocab: int, codebooks: int
) -> tuple[mx.array, StepNoise]:
    """Split the session's key and draw this step's noise; returns (next key, noise)."""
    next_key, text_key, audio_key = mx.random.split(key, 3)
    text = mx.random.uniform(shape=(text_vocab,), key=text_key)
    audio = mx.random.uniform(shape=(codebooks, audio_vocab), key=audio_key)
    return next_key, StepNoise(text=text, audio=audio)


def sample_top_k(
    logits: mx.array, temperature: mx.array, top_k: mx.array, uniform: mx.array
) -> mx.array:
    """Tokens [B] from logits [B, V]; per-row temperature [B] (0: greedy) and top_k [B] (0: all)."""
    vocab = logits.shape[-1]
    logits = logits.astype(mx.float32)
    greedy = temperature <= 0.0
    scaled = logits / mx.where(greedy, 1.0, temperature)[:, None]
    k = mx.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(mx.int32)
    ascending = mx.sort(scaled, axis=-1)
    threshold = mx.take_along_axis(ascending, (vocab - k)[:, None], axis=-1)
    masked = mx.where(scaled >= threshold, scaled, -mx.inf)
    tiny = 1e-20
    gumbel = -mx.log(-mx.log(mx.clip(uniform, tiny, 1.0 - 1e-7)))
    sampled = mx.argmax(masked + gumbel, axis=-1)
    return mx.where(greedy, mx.argmax(logits, axis=-1), sampled).astype(mx.int32)
