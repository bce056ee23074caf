"""The duplex tick's speed-ups keep its results: batched == alone bit for bit on the fast path,
the same tokens as the tick before them (`fast=False`), top-k thresholds equal to a full sort's,
the host ELU equal to MLX's within float rounding and independent of the batch."""

from __future__ import annotations

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
from finetune.families.personaplex.mimi_stream import host_elu
from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.personaplex.sampling import sample_top_k

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

TICKS = 5


def frame(stream: int, step: int) -> np.ndarray:
    return np.random.default_rng(500 * stream + step).normal(0.0, 0.1, 1920).astype(np.float32)


@pytest.fixture(scope="module")
def runtimes(loaded_personaplex) -> dict[bool, PersonaPlexRuntime]:
    return {fast: PersonaPlexRuntime(loaded_personaplex, fast=fast) for fast in (True, False)}


def trace(runtime: PersonaPlexRuntime, seeds: list[int], *, batched: bool) -> list[list]:
    """Per session: (text token, 17 tokens, pcm bytes) of every tick."""
    kwargs = [dict(text_top_k=10, audio_top_k=100), {}, dict(repetition_penalty=1.2)]
    sessions = []
    for i, seed in enumerate(seeds):
        session = runtime.new_session(seed=seed, **kwargs[i % len(kwargs)])
        runtime.condition(session)
        sessions.append(session)
    out: list[list] = [[] for _ in seeds]
    for t in range(TICKS):
        groups = [list(range(len(seeds)))] if batched else [[i] for i in range(len(seeds))]
        for rows in groups:
            steps = runtime.step([sessions[i] for i in rows], [frame(i, t) for i in rows])
            for i, step in zip(rows, steps, strict=True):
                out[i].append((step.text_token, tuple(sessions[i].last_tokens), step.pcm))
    for session in sessions:
        runtime.close(session)
    return out


def test_fast_tick_batched_equals_alone_and_keeps_the_old_tokens(runtimes) -> None:
    seeds = [5, 6, 7]
    batched = trace(runtimes[True], seeds, batched=True)
    alone = trace(runtimes[True], seeds, batched=False)
    old = trace(runtimes[False], seeds, batched=True)
    for b, a, o in zip(batched, alone, old, strict=True):
        assert [(t, k, p.tobytes()) for t, k, p in b] == [(t, k, p.tobytes()) for t, k, p in a]
        assert [(t, k) for t, k, _ in b] == [(t, k) for t, k, _ in o]  # same tokens as before
        for (_, _, pcm), (_, _, old_pcm) in zip(b, o, strict=True):
            np.testing.assert_allclose(pcm, old_pcm, atol=1e-5)  # ELU: expm1 vs exp(x) - 1
    assert any(np.abs(p).max() > 0 for _, _, p in batched[0])


def test_partition_threshold_samples_what_the_sort_did() -> None:
    rng = np.random.default_rng(3)
    logits = mx.array(rng.normal(size=(5, 3000)).astype(np.float32))
    logits[1, :50] = 0.25  # ties at the threshold
    temperature = mx.array([0.7, 1.0, 0.0, 1.3, 0.9], mx.float32)
    top_k = mx.array([25, 60, 25, 0, 5000], mx.int32)  # mixed k, "all" and k > vocab
    for draw in range(4):
        noise = mx.array(np.random.default_rng(draw).uniform(size=(5, 3000)).astype(np.float32))
        fast = sample_top_k(logits, temperature, top_k, noise)
        sorted_ = sample_top_k(logits, temperature, top_k, noise, True)
        assert np.array_equal(np.array(fast), np.array(sorted_))


def test_host_elu_matches_mlx_and_ignores_the_batch() -> None:
    values = np.random.default_rng(4).normal(0.0, 3.0, (4, 16, 1931)).astype(np.float32)
    values[0, 0, :4] = [0.0, -0.0, 100.0, -100.0]
    xs = mx.array(values)
    ours = np.array(host_elu(xs))
    np.testing.assert_allclose(ours, np.array(nn.elu(xs)), rtol=2e-6, atol=2e-7)
    for row in range(4):  # a row alone, and a transposed view, give the same bits
        assert np.array_equal(np.array(host_elu(xs[row : row + 1])), ours[row : row + 1])
    swapped = np.array(host_elu(xs.swapaxes(1, 2)))
    assert np.array_equal(swapped, ours.swapaxes(1, 2))
    half = host_elu(xs.astype(mx.float16))  # other dtypes keep MLX's ELU
    assert half.dtype == mx.float16
