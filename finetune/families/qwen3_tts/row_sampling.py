"""Sampling the next token of every row of a decode batch at once, each row drawing what it
would draw alone.

mlx-audio's `_sample_token` takes one row ([1, V] logits): sampled row by row, a step of 8 rows
was ~50 graph nodes a row for each of its 16 tokens (a logits slice, the top-k mask, MLX's
categorical: max, exp, cumulative sum, search, ...), ~5,500 of the step's ~11,800. Here rows with
the same options go through each op together; only what depends on a row's own random key (its
key split and its uniform draw) stays per row. Every op works along a row's own logits, in the
same order as alone, so a row's token is the one it draws alone, bit for bit
(tests/test_decode_batch.py, tests/test_qwen3_row_sampling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from finetune.sampling import Sampling

import mlx.core as mx
from mlx_audio.lm.sample_utils import apply_top_k
from mlx_audio.tts.models.qwen3_tts.qwen3_tts import _apply_probability_filters

REPETITION_CONTEXT = 64


class SampledRow(Protocol):
    sampling: Sampling
    generated: list[int]

    def next_key(self) -> mx.array: ...


def sample_rows(
    logits: mx.array, rows: Sequence[SampledRow], *, suppress: mx.array | None = None
) -> mx.array:
    """[B, V] logits -> [B, 1] tokens (uint32). With `suppress` (the first code of a frame):
    those ids are masked and each row's repetition penalty applies to its recent tokens."""
    if suppress is not None:
        logits = mx.put_along_axis(
            logits,
            mx.broadcast_to(suppress[None, :], (logits.shape[0], suppress.shape[0])),
            mx.array(float("-inf"), logits.dtype),
            axis=-1,
        )
        logits = _penalise_repeats(logits, rows)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        opts = row.sampling
        groups.setdefault((opts.temperature, opts.top_k, opts.top_p), []).append(i)
    parts, order = [], []
    for (temperature, top_k, top_p), members in groups.items():
        part = logits if len(members) == len(rows) else logits[mx.array(members)]
        parts.append(_draw(part, [rows[i] for i in members], temperature, top_k, top_p))
        order.extend(members)
    tokens = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    if order != sorted(order):
        inverse = sorted(range(len(order)), key=order.__getitem__)
        tokens = tokens[mx.array(inverse)]
    return tokens[:, None]


def _penalise_repeats(logits: mx.array, rows: Sequence[SampledRow]) -> mx.array:
    """mlx-audio's repetition penalty, each row over its own recent tokens: a row's ids padded
    with its first id (written twice, the same value), a row without a penalty given factor 1
    (x * 1 and x / 1 are x)."""
    recent: list[list[int]] = []
    factors: list[float] = []
    for row in rows:
        penalty = row.sampling.repetition_penalty
        ids = sorted(set(row.generated[-REPETITION_CONTEXT:])) if penalty != 1.0 else []
        ids = [t for t in ids if t < logits.shape[-1]]
        recent.append(ids)
        factors.append(penalty if ids else 1.0)
    width = max(len(ids) for ids in recent)
    if width == 0:
        return logits
    padded = []
    for ids in recent:
        written = ids or [0]
        padded.append(written + [written[0]] * (width - len(written)))
    index = mx.array(padded, dtype=mx.int32)
    factor = mx.array(factors, dtype=logits.dtype)[:, None]
    chosen = mx.take_along_axis(logits, index, axis=-1)
    penalised = mx.where(chosen < 0, chosen * factor, chosen / factor)
    return mx.put_along_axis(logits, index, penalised, axis=-1)


def _draw(
    logits: mx.array, rows: Sequence[SampledRow], temperature: float, top_k: int, top_p: float
) -> mx.array:
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = apply_top_k(logits, top_k)
    logits = _apply_probability_filters(logits, top_p, 0.0)
    return categorical_rows(logits, [row.next_key() for row in rows])


def categorical_rows(logits: mx.array, keys: Sequence[mx.array]) -> mx.array:
    """Row i drawn as `mx.random.categorical(logits[i:i+1], key=keys[i])` draws it ([B] uint32):
    MLX samples one row by its inverse CDF (weights exp(x - max), or the maxima alone where the
    max is infinite; an exclusive cumulative sum; a uniform draw times the total; the last
    position at or below it), which is done here for all rows at once, with each row's own
    uniform draw."""
    draws = [mx.random.uniform(shape=(1,), key=key) for key in keys]
    uniform = draws[0] if len(draws) == 1 else mx.concatenate(draws)
    x = logits.astype(mx.float32)
    top = mx.max(x, axis=-1, keepdims=True)
    weights = mx.where(mx.isinf(top), (x == top).astype(mx.float32), mx.exp(x - top))
    cdf = mx.cumsum(weights, axis=-1, inclusive=False)
    target = uniform[:, None] * mx.sum(weights, axis=-1, keepdims=True)
    # "not below" rather than "at or below": the same on a sorted CDF, and a row poisoned by a NaN
    # (every weight NaN) counts every position, the last id, as MLX's binary search ends there.
    at_or_below = mx.logical_not(target < cdf)
    return (mx.sum(at_or_below, axis=-1) - 1).astype(mx.uint32)
