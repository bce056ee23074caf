"""The speech tokenizer's decoder attends over its sliding window, as the official one does
(finetune/families/qwen3_tts/vocoder.py; the audio against qwen-tts: tests/parity)."""

from __future__ import annotations

from typing import Any

from finetune.families.qwen3_tts.vocoder import SlidingWindowDecoderTransformer, window_mask

import mlx.core as mx
import numpy as np


def test_window_mask_allows_the_last_window_keys_causally() -> None:
    mask = np.array(window_mask(offset=2, length=3, window=2, dtype=mx.float32))
    allowed = np.isfinite(mask)
    # queries at positions 2, 3, 4 over keys 0..4: each sees itself and the key before it.
    assert allowed.tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def test_a_loaded_model_decodes_with_the_window(loaded_qwen3_base: Any) -> None:
    decoder = loaded_qwen3_base.model.speech_tokenizer.decoder
    assert isinstance(decoder.pre_transformer, SlidingWindowDecoderTransformer)
    window = decoder.pre_transformer.layers[0].self_attn.sliding_window
    codes = mx.array(np.random.default_rng(0).integers(0, 2048, (1, 16, window + 20)))
    whole = np.array(decoder(codes))
    # Within the window the windowed mask is the plain causal one; past it, it differs.
    plain = decoder.pre_transformer
    plain.__class__ = SlidingWindowDecoderTransformer.__mro__[1]
    try:
        windowless = np.array(decoder(codes))
    finally:
        plain.__class__ = SlidingWindowDecoderTransformer
    upsample = whole.shape[-1] // codes.shape[-1]
    head = window * upsample - upsample  # well inside the window: the same either way
    assert np.abs(whole[..., :head] - windowless[..., :head]).max() < 1e-5
    assert np.abs(whole[..., -upsample:] - windowless[..., -upsample:]).max() > 1e-3
