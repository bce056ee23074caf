"""Top-k / temperature sampling for a batch of sessions, each with its own random stream.

Each session draws its own uniform noise from its own key, and a token is the Gumbel-max of
the top-k-masked, temperature-scaled logits: an exact draw from the top-k softmax. Because the
noise depends on nothing but the session's keys (one for the text stream, one for the audio
streams, so `text_seed` and `audio_seed` set them apart), a session samples the same tokens
whether it is stepped alone or batched with others.

Before sampling, the text logits may take a repetition penalty (CTRL's: a positive logit divided
by it, a negative one multiplied) over the text tokens of the last `repetition_context` steps,
padding excluded, and `pad_bias` added to the padding token's logit (the web clients'
`pad_mult`: above 0 the model pauses more, below 0 it talks more).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

MAX_REPETITION_CONTEXT = 3000  # PersonaPlex's context, in steps


@dataclass(frozen=True)
class SamplingParams:
    text_temperature: float = 0.7
    audio_temperature: float = 0.8
    text_top_k: int = 25
    audio_top_k: int = 250
    repetition_penalty: float = 1.0  # 1: none
    repetition_context: int = 64  # text steps the penalty looks back over
    pad_bias: float = 0.0

    @property
    def biases_text(self) -> bool:
        penalised = self.repetition_penalty != 1.0 and self.repetition_context > 0
        return penalised or self.pad_bias != 0.0

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 < self.repetition_penalty <= 10.0:
            problems.append(f"repetition_penalty must be in (0, 10], not {self.repetition_penalty}")
        if not 0 <= self.repetition_context <= MAX_REPETITION_CONTEXT:
            problems.append(
                f"repetition_context must be between 0 and {MAX_REPETITION_CONTEXT}, "
                f"not {self.repetition_context}"
            )
        if not -100.0 <= self.pad_bias <= 100.0:
            problems.append(f"pad_bias must be between -100 and 100, not {self.pad_bias}")
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


def stream_keys(seed: int, text_seed: int | None, audio_seed: int | None) -> mx.array:
    """The session's sampling key: one key from `seed` for both streams, or with `text_seed` or
    `audio_seed` given, two [2, ...]: the text stream's from `text_seed` (else `seed`), the
    audio streams' from `audio_seed` (else `seed`)."""
    if text_seed is None and audio_seed is None:
        return mx.random.key(seed)
    text = mx.random.split(mx.random.key(seed if text_seed is None else text_seed))[0]
    audio = mx.random.split(mx.random.key(seed if audio_seed is None else audio_seed))[1]
    return mx.stack([text, audio])


def draw_noise(
    key: mx.array, text_vocab: int, audio_vocab: int, codebooks: int
) -> tuple[mx.array, StepNoise]:
    """Advance the session's key (one, or the two streams') and draw this step's noise;
    returns (next key, noise)."""
    if key.ndim == 1:
        next_key, text_key, audio_key = mx.random.split(key, 3)
    else:
        text_next, text_key = mx.random.split(key[0])
        audio_next, audio_key = mx.random.split(key[1])
        next_key = mx.stack([text_next, audio_next])
    text = mx.random.uniform(shape=(text_vocab,), key=text_key)
    audio = mx.random.uniform(shape=(codebooks, audio_vocab), key=audio_key)
    return next_key, StepNoise(text=text, audio=audio)


def bias_text_logits(
    logits: mx.array,
    recent: list[list[int]],
    params: list[SamplingParams],
    *,
    pad_id: int,
    exempt: frozenset[int],
) -> mx.array:
    """Text logits [B, V] after each row's repetition penalty over its `recent` tokens (the
    `exempt` ones never penalised) and its pad bias."""
    batch, vocab = logits.shape
    seen = np.zeros((batch, vocab), dtype=bool)
    penalty = np.ones((batch, 1), dtype=np.float32)
    bias = np.zeros((batch, vocab), dtype=np.float32)
    for row, (tokens, p) in enumerate(zip(recent, params, strict=True)):
        if p.repetition_context > 0 and p.repetition_penalty != 1.0:
            window = [t for t in tokens[-p.repetition_context :] if t not in exempt and t < vocab]
            seen[row, window] = True
            penalty[row, 0] = p.repetition_penalty
        bias[row, pad_id] = p.pad_bias
    logits = logits.astype(mx.float32)
    scale = mx.array(penalty)
    penalised = mx.where(logits > 0, logits / scale, logits * scale)
    return mx.where(mx.array(seen), penalised, logits) + mx.array(bias)


def sample_top_k(
    logits: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    uniform: mx.array,
    sort: bool = False,
) -> mx.array:
    """Tokens [B] from logits [B, V]; per-row temperature [B] (0: greedy) and top_k [B] (0: all).
    `sort`: find the top-k threshold by a full sort, as before (the same value, slower)."""
    logits = logits.astype(mx.float32)
    greedy = temperature <= 0.0
    scaled = logits / mx.where(greedy, 1.0, temperature)[:, None]
    threshold = _kth_largest_sorted(scaled, top_k) if sort else _kth_largest(scaled, top_k)
    masked = mx.where(scaled >= threshold, scaled, -mx.inf)
    tiny = 1e-20
    gumbel = -mx.log(-mx.log(mx.clip(uniform, tiny, 1.0 - 1e-7)))
    sampled = mx.argmax(masked + gumbel, axis=-1)
    return mx.where(greedy, mx.argmax(logits, axis=-1), sampled).astype(mx.int32)


def _kth_largest(scaled: mx.array, top_k: mx.array) -> mx.array:
    """[B, 1]: each row's top_k-th largest value (top_k <= 0 or > V: its smallest).

    A partition per distinct k instead of a full sort (the text vocabulary is 32000 wide): the
    element a partition puts at index V - k is the one a sort would, so the value is the same.
    `top_k` is built from host lists, so reading it back costs no evaluation of the graph.
    """
    vocab = scaled.shape[-1]
    ks = [vocab if k <= 0 or k > vocab else k for k in np.array(top_k).reshape(-1).tolist()]
    threshold: mx.array | None = None
    for k in sorted(set(ks)):
        value = mx.partition(scaled, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
        if threshold is None:
            threshold = value
        else:
            threshold = mx.where(mx.array([[r == k] for r in ks]), value, threshold)
    assert threshold is not None
    return threshold


def _kth_largest_sorted(scaled: mx.array, top_k: mx.array) -> mx.array:
    vocab = scaled.shape[-1]
    k = mx.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(mx.int32)
    ascending = mx.sort(scaled, axis=-1)
    return mx.take_along_axis(ascending, (vocab - k)[:, None], axis=-1)
