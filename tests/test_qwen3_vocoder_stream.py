"""The streamed speech-tokenizer decoder (finetune/families/qwen3_tts/vocoder_stream.py) against
the decoder's one-shot decode, on the tiny checkpoint.

Tolerance: AUDIO_ATOL (1e-3 of full scale). A chunk takes other convolution and GEMM paths than
one long input, so float32 sums run in another order; the tiny random decoder amplifies that (its
output sits near +-1): decoding the first 6 frames alone already differs from the same frames
inside a 60-frame decode by ~2.4e-4. A stream that lost its carried state differs by ~1
(`test_a_stream_without_its_state_is_far_off` shows the bound can fail).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from finetune.families.qwen3_tts import vocoder_stream
from finetune.families.qwen3_tts.vocoder_stream import StreamingVocoder

import mlx.core as mx
import numpy as np
import pytest

AUDIO_ATOL = 1e-3


@pytest.fixture(scope="module")
def vocoder(loaded_qwen3_base: Any) -> StreamingVocoder:
    tokenizer = loaded_qwen3_base.model.speech_tokenizer
    return StreamingVocoder(tokenizer.decoder, tokenizer.decode_upsample_rate)


def _codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2048, (frames, 16)).astype(np.int32)


def _one_shot(vocoder: StreamingVocoder, codes: np.ndarray) -> np.ndarray:
    wav = vocoder.decoder(mx.array(codes)[None].transpose(0, 2, 1))
    return np.array(wav[0, 0], dtype=np.float32)


def _chunks(codes: np.ndarray, sizes: list[int]) -> Iterator[np.ndarray]:
    start = 0
    for size in sizes * len(codes):
        if start >= len(codes):
            return
        yield codes[start : start + size]
        start += size


def _streamed(vocoder: StreamingVocoder, codes: np.ndarray, sizes: list[int]) -> np.ndarray:
    stream = vocoder.open()
    return np.concatenate([vocoder.decode([(stream, c)])[0] for c in _chunks(codes, sizes)])


def test_one_call_is_the_one_shot_decode_bit_for_bit(vocoder: StreamingVocoder) -> None:
    codes = _codes(12, 0)
    got = vocoder.decode([(vocoder.open(), codes)])[0]
    np.testing.assert_array_equal(got, _one_shot(vocoder, codes))


def test_chunks_join_into_the_one_shot_decode(vocoder: StreamingVocoder) -> None:
    codes = _codes(20, 1)
    whole = _one_shot(vocoder, codes)
    got = _streamed(vocoder, codes, [6, 1, 7])
    assert got.shape == whole.shape
    assert np.abs(got - whole).max() <= AUDIO_ATOL


def test_a_stream_without_its_state_is_far_off(vocoder: StreamingVocoder) -> None:
    codes = _codes(12, 2)
    fresh = np.concatenate([vocoder.decode([(vocoder.open(), c)])[0] for c in _chunks(codes, [6])])
    assert np.abs(fresh - _one_shot(vocoder, codes)).max() > 50 * AUDIO_ATOL


def test_past_a_chunk_boundary_the_stream_restarts_as_the_reference_does(
    vocoder: StreamingVocoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference decodes in 300-frame chunks after 25 frames of context (mlx-audio's
    `chunked_decode`); scaled down to 6 / 3 here so the test stays small."""
    monkeypatch.setattr(vocoder_stream, "CHUNK_FRAMES", 6)
    monkeypatch.setattr(vocoder_stream, "CHUNK_CONTEXT", 3)
    codes = _codes(15, 3)
    reference = vocoder.decoder.chunked_decode(
        mx.array(codes)[None].transpose(0, 2, 1), chunk_size=6, left_context_size=3
    )
    reference = np.array(reference[0, 0], dtype=np.float32)
    got = _streamed(vocoder, codes, [4, 5])
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() <= AUDIO_ATOL
    # ... and not the plain causal decode, which carries all the frames before.
    assert np.abs(got - _one_shot(vocoder, codes)).max() > 50 * AUDIO_ATOL


def test_a_lead_gives_context_and_no_audio(vocoder: StreamingVocoder) -> None:
    lead, codes = _codes(4, 4), _codes(9, 5)
    stream = vocoder.open(lead)
    got = np.concatenate([vocoder.decode([(stream, c)])[0] for c in _chunks(codes, [5])])
    whole = _one_shot(vocoder, np.concatenate([lead, codes]))
    cut = len(lead) * vocoder.upsample
    assert got.shape == whole[cut:].shape
    assert np.abs(got - whole[cut:]).max() <= AUDIO_ATOL
    assert stream.frames_in == len(codes)


def test_rows_decoded_together_each_match_alone(vocoder: StreamingVocoder) -> None:
    """Rows of different lengths (one with a lead) in one pass: padding stays out of each row."""
    codes = [_codes(7, 6), _codes(4, 7), _codes(6, 8)]
    leads: list[np.ndarray | None] = [None, _codes(3, 9), None]
    together = [vocoder.open(lead) for lead in leads]
    alone = [vocoder.open(lead) for lead in leads]
    for half in (slice(0, 3), slice(3, None)):
        batched = vocoder.decode([(s, c[half]) for s, c in zip(together, codes, strict=True)])
        for s, c, got in zip(alone, codes, batched, strict=True):
            solo = vocoder.decode([(s, c[half])])[0]
            assert got.shape == solo.shape
            assert np.abs(got - solo).max() <= AUDIO_ATOL


def test_a_failed_decode_leaves_the_stream_as_it_was(
    vocoder: StreamingVocoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = _codes(8, 10)
    stream = vocoder.open()
    head = vocoder.decode([(stream, codes[:3])])[0]
    with monkeypatch.context() as patch:  # the pass fails half-way (after the transformer)
        patch.setattr(vocoder_stream._Batch, "convnext", _fail)
        with pytest.raises(MemoryError):
            vocoder.decode([(stream, codes[3:5])])
    assert stream.frames_in == 3
    rest = vocoder.decode([(stream, codes[3:])])[0]
    expected = _streamed(vocoder, codes, [3, 5])
    np.testing.assert_array_equal(np.concatenate([head, rest]), expected)


def _fail(*_: Any) -> Any:
    raise MemoryError("out of memory")
