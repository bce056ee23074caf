"""The duplex tick's speed-ups keep its results: batched == alone bit for bit on the fast path;
greedy, the same tokens as the tick before them (`fast=False`); sampling, the same distribution
(the fast tick draws noise for the top-k candidates only, so a seed draws other tokens than the
old tick did: compared by distribution here); top-k thresholds equal to a full sort's; the host
ELU equal to MLX's within float rounding and independent of the batch; so is Mimi's row-exact
transposed conv."""

from __future__ import annotations

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
from finetune.families.personaplex.mimi_stream import _conv_transpose1d_rows, host_elu
from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.personaplex.sampling import (
    CandidateDraw,
    FullVocabDraw,
    sample_full_vocab,
    sample_top_k,
)

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


MIXED = [
    dict(text_top_k=10, audio_top_k=100),
    {},
    dict(repetition_penalty=1.2),
    dict(text_temperature=0.0, audio_top_k=0),  # a greedy stream, and every code a candidate
]
GREEDY = [dict(text_temperature=0.0, audio_temperature=0.0)]


def trace(
    runtime: PersonaPlexRuntime, seeds: list[int], *, batched: bool, kwargs: list[dict] = MIXED
) -> list[list]:
    """Per session: (text token, 17 tokens, pcm bytes) of every tick."""
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


def test_fast_tick_batched_equals_alone(runtimes) -> None:
    seeds = [5, 6, 7, 8]
    batched = trace(runtimes[True], seeds, batched=True)
    alone = trace(runtimes[True], seeds, batched=False)
    for b, a in zip(batched, alone, strict=True):
        assert [(t, k, p.tobytes()) for t, k, p in b] == [(t, k, p.tobytes()) for t, k, p in a]
    assert any(np.abs(p).max() > 0 for _, _, p in batched[0])
    assert len({tuple(k for _, k, _ in b) for b in batched}) == len(seeds)  # they do differ


def test_greedy_fast_tick_keeps_the_old_tokens(runtimes) -> None:
    seeds = [5, 6]
    fast = trace(runtimes[True], seeds, batched=True, kwargs=GREEDY)
    old = trace(runtimes[False], seeds, batched=True, kwargs=GREEDY)
    for f, o in zip(fast, old, strict=True):
        assert [(t, k) for t, k, _ in f] == [(t, k) for t, k, _ in o]
        for (_, _, pcm), (_, _, old_pcm) in zip(f, o, strict=True):
            np.testing.assert_allclose(pcm, old_pcm, atol=1e-5)  # ELU: expm1 vs exp(x) - 1
    assert any(np.abs(p).max() > 0 for _, _, p in fast[0])


def top_k_softmax(logits: np.ndarray, temperature: float, k: int) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    keep = scaled >= np.sort(scaled)[-k]
    weights = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return weights / weights.sum()


def test_candidate_and_full_vocab_draws_sample_the_top_k_softmax() -> None:
    """Both draws' token frequencies over 40,000 independent rows match the exact top-k softmax
    within 5 standard errors per token, and neither ever leaves the top k."""
    vocab, k, temperature, rows = 40, 8, 0.9, 40_000
    logits = np.random.default_rng(8).normal(0.0, 1.5, vocab).astype(np.float32)
    expected = top_k_softmax(logits, temperature, k)
    batch = mx.broadcast_to(mx.array(logits), (rows, vocab))
    keys = mx.random.split(mx.random.key(11), 2)
    few = mx.random.uniform(shape=(rows, k), key=keys[0])
    full = mx.random.uniform(shape=(rows, vocab), key=keys[1])
    temps, ks = [temperature] * rows, [k] * rows
    draws = {
        "candidates": CandidateDraw(temps, ks, vocab, list(few)),
        "full vocabulary": FullVocabDraw(temps, ks, list(full)),
    }
    for name, draw in draws.items():
        tokens = np.array(sample_top_k(batch, draw))
        counts = np.bincount(tokens, minlength=vocab) / rows
        assert (counts[expected == 0] == 0).all(), name
        error = np.sqrt(expected * (1 - expected) / rows)
        assert (np.abs(counts - expected) <= 5 * error + 1e-12).all(), name


def test_candidate_draw_rows_do_not_depend_on_their_batch() -> None:
    rng = np.random.default_rng(9)
    vocab = 300
    logits = mx.array(rng.normal(size=(6, vocab)).astype(np.float32))
    temps = [0.7, 0.0, 1.3, 0.7, 0.9, 1.0]
    ks = [25, 25, 0, 25, 400, 5]  # groups, a greedy row, "all" and k > vocab
    widths = [vocab if k <= 0 or k > vocab else k for k in ks]
    text = [mx.array(rng.uniform(size=w).astype(np.float32)) for w in widths]
    audio = [mx.array(rng.uniform(size=(3, w)).astype(np.float32)) for w in widths]
    for noise, index in ((text, None), (audio, 0), (audio, 2)):
        batched = np.array(sample_top_k(logits, CandidateDraw(temps, ks, vocab, noise), index))
        for row in range(6):
            alone = CandidateDraw([temps[row]], [ks[row]], vocab, [noise[row]])
            token = np.array(sample_top_k(logits[row : row + 1], alone, index))
            assert token.tolist() == [int(batched[row])]
    assert int(batched[1]) == int(np.argmax(np.array(logits[1])))


def test_partition_threshold_samples_what_the_sort_did() -> None:
    rng = np.random.default_rng(3)
    logits = mx.array(rng.normal(size=(5, 3000)).astype(np.float32))
    logits[1, :50] = 0.25  # ties at the threshold
    temperature = mx.array([0.7, 1.0, 0.0, 1.3, 0.9], mx.float32)
    top_k = mx.array([25, 60, 25, 0, 5000], mx.int32)  # mixed k, "all" and k > vocab
    for draw in range(4):
        noise = mx.array(np.random.default_rng(draw).uniform(size=(5, 3000)).astype(np.float32))
        fast = sample_full_vocab(logits, temperature, top_k, noise)
        sorted_ = sample_full_vocab(logits, temperature, top_k, noise, True)
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


@pytest.mark.parametrize(
    ("kernel", "stride"),
    [(16, 8), (8, 4), (4, 4), (7, 3), (3, 5)],  # SEANet's upsamplers (kernel = 2 * stride), others
)
def test_row_exact_transposed_conv_matches_mlx_and_ignores_the_batch(kernel: int, stride: int):
    rng = np.random.default_rng(kernel * 10 + stride)
    xs = mx.array(rng.normal(0.0, 1.0, (4, 9, 24)).astype(np.float32))
    weight = mx.array(rng.normal(0.0, 0.2, (12, kernel, 24)).astype(np.float32))
    ours = np.array(_conv_transpose1d_rows(xs, weight, stride))
    np.testing.assert_allclose(
        ours, np.array(mx.conv_transpose1d(xs, weight, stride=stride)), rtol=1e-5, atol=1e-5
    )
    for row in range(4):  # a row alone gives its batch's bits
        alone = np.array(_conv_transpose1d_rows(xs[row : row + 1], weight, stride))
        assert np.array_equal(alone, ours[row : row + 1])
