"""Top-k / temperature sampling for a batch of sessions, each with its own random stream.

Each session draws its own uniform noise from its own key, and a token is the Gumbel-max of
the temperature-scaled logits over the row's top-k candidates: an exact draw from the top-k
softmax. `CandidateDraw` (the tick's) draws noise for the k candidates only, found by one
partition per distinct k (exactly k of them, as Kyutai's `torch.topk`); `FullVocabDraw` (the tick
before it, kept to measure against) draws noise for the whole vocabulary and masks all but the
values at or above the k-th largest. Both sample the top-k softmax; for a seed they draw different
tokens. Because the noise depends on nothing but the session's keys (one for the text stream, one
for the audio streams, so `text_seed` and `audio_seed` set them apart) and every step is
row-wise, a session samples the same tokens whether it is stepped alone or batched with others.

Before sampling, the text logits may take a repetition penalty (CTRL's: a positive logit divided
by it, a negative one multiplied) over the text tokens of the last `repetition_context` steps,
padding excluded, and `pad_bias` added to the padding token's logit (the web clients'
`pad_mult`: above 0 the model pauses more, below 0 it talks more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
    """One step's uniform noise for one session: text [W_text], audio [codebooks, W_audio], W
    the vocabulary (`FullVocabDraw`) or the session's candidate count (`CandidateDraw`)."""

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


def candidate_count(top_k: int, vocab: int) -> int:
    """How many tokens a top-k draw chooses among (top_k <= 0 or > vocab: all of them)."""
    return vocab if top_k <= 0 or top_k > vocab else top_k


def draw_noise(
    key: mx.array, text_width: int, audio_width: int, codebooks: int
) -> tuple[mx.array, StepNoise]:
    """Advance the session's key (one, or the two streams') and draw this step's noise, text
    [text_width] and audio [codebooks, audio_width]; returns (next key, noise)."""
    if key.ndim == 1:
        next_key, text_key, audio_key = mx.random.split(key, 3)
    else:
        text_next, text_key = mx.random.split(key[0])
        audio_next, audio_key = mx.random.split(key[1])
        next_key = mx.stack([text_next, audio_next])
    text = mx.random.uniform(shape=(text_width,), key=text_key)
    audio = mx.random.uniform(shape=(codebooks, audio_width), key=audio_key)
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


def gumbel(uniform: mx.array) -> mx.array:
    return -mx.log(-mx.log(mx.clip(uniform, 1e-20, 1.0 - 1e-7)))


class Draw(Protocol):
    """One stream's sampling set-up for a batch of rows, built once per tick."""

    def sample(self, logits: mx.array, index: int | None) -> mx.array: ...


def sample_top_k(logits: mx.array, draw: Draw, index: int | None = None) -> mx.array:
    """Tokens [B] of logits [B, V] by `draw`, with its noise of codebook `index` (None: the
    text stream's). The one place the runtime samples: tests record logits here."""
    return draw.sample(logits, index)


class CandidateDraw:
    """Gumbel-max over each row's k candidates, noise [..., k] per row.

    Rows are grouped by (greedy, k); each group runs one `argpartition` for its candidates, adds
    its noise's Gumbel values to the candidates' scaled logits and takes the argmax. Every op is
    row-wise, so a row's token does not depend on its group. Greedy rows (temperature 0) take
    the argmax of their logits, as before."""

    def __init__(
        self,
        temperatures: Sequence[float],
        top_ks: Sequence[int],
        vocab: int,
        noise: Sequence[mx.array],
    ) -> None:
        self.vocab = vocab
        groups: dict[int, list[int]] = {}
        for row, (temperature, k) in enumerate(zip(temperatures, top_ks, strict=True)):
            groups.setdefault(0 if temperature <= 0 else candidate_count(k, vocab), []).append(row)
        self.groups: list[tuple[int, mx.array | None, mx.array | None, mx.array | None]] = []
        order: list[int] = []
        for width, rows in sorted(groups.items()):
            take = None if len(rows) == len(temperatures) else mx.array(rows)
            if width == 0:
                self.groups.append((0, take, None, None))
            else:
                scale = mx.array([[temperatures[r]] for r in rows], dtype=mx.float32)
                self.groups.append((width, take, scale, gumbel(mx.stack([noise[r] for r in rows]))))
            order.extend(rows)
        ordered = order == list(range(len(order)))
        self.inverse = None if ordered else mx.array(np.argsort(np.array(order)))

    def sample(self, logits: mx.array, index: int | None) -> mx.array:
        if logits.shape[-1] != self.vocab:
            raise ValueError(f"logits are {logits.shape[-1]} wide, the draw {self.vocab}")
        logits = logits.astype(mx.float32)
        parts = []
        for width, take, scale, noise in self.groups:
            rows = logits if take is None else logits[take]
            if scale is None or noise is None:
                parts.append(mx.argmax(rows, axis=-1))
                continue
            scaled = rows / scale
            row_noise = noise if index is None else noise[:, index]
            if width == self.vocab:
                parts.append(mx.argmax(scaled + row_noise, axis=-1))
                continue
            candidates = mx.argpartition(scaled, self.vocab - width, axis=-1)[:, -width:]
            values = mx.take_along_axis(scaled, candidates, axis=-1)
            pick = mx.argmax(values + row_noise, axis=-1)
            parts.append(mx.take_along_axis(candidates, pick[:, None], axis=-1)[:, 0])
        tokens = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        tokens = tokens if self.inverse is None else tokens[self.inverse]
        return tokens.astype(mx.int32)


class FullVocabDraw:
    """The tick before `CandidateDraw`: noise [..., V] per row, all but the top-k masked."""

    def __init__(
        self,
        temperatures: Sequence[float],
        top_ks: Sequence[int],
        noise: Sequence[mx.array],
        sort: bool = False,
    ) -> None:
        self.temperature = mx.array(list(temperatures), dtype=mx.float32)
        self.top_k = mx.array(list(top_ks), dtype=mx.int32)
        self.noise = mx.stack(list(noise))
        self.sort = sort

    def sample(self, logits: mx.array, index: int | None) -> mx.array:
        noise = self.noise if index is None else self.noise[:, index]
        return sample_full_vocab(logits, self.temperature, self.top_k, noise, self.sort)


def sample_full_vocab(
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
    sampled = mx.argmax(masked + gumbel(uniform), axis=-1)
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
