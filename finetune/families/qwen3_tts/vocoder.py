"""The speech tokenizer's decoder as the official Qwen3-TTS runs it: its transformer attends over
a sliding window (`sliding_window` frames, 72 in the 12 Hz release), causal. mlx-audio's
`DecoderTransformer` (mlx-audio 0.4.x) builds a plain causal mask and ignores the window, so
beyond the window's length its audio drifts from the reference implementation's (measured on
the tiny checkpoint: equal within 3e-4 up to frame 72, then up to 0.6 by frame 150). This
subclass adds the window to the mask and changes nothing else; `use_sliding_window` installs it
on a loaded model. Checked against qwen-tts by tests/parity/test_qwen3_parity.py.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_audio.tts.models.qwen3_tts.speech_tokenizer import DecoderTransformer


def window_mask(offset: int, length: int, window: int, dtype: mx.Dtype) -> mx.array:
    """Additive mask [length, offset + length]: query i (at offset + i) sees keys j with
    i - window < j <= i."""
    queries = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(offset + length)[None, :]
    allowed = (keys <= queries) & (keys > queries - window)
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


class SlidingWindowDecoderTransformer(DecoderTransformer):
    def __call__(
        self, inputs_embeds: mx.array, mask: mx.array | None = None, cache: Any = None
    ) -> mx.array:
        window = int(self.layers[0].self_attn.sliding_window or 0)
        length = inputs_embeds.shape[1]
        offset = cache[0].offset if cache is not None else 0
        # Within the window the parent's causal mask is the same; beyond it, the window's.
        if mask is None and window and offset + length > window:
            mask = window_mask(offset, length, window, inputs_embeds.dtype)
        return super().__call__(inputs_embeds, mask=mask, cache=cache)


def use_sliding_window(model: Any) -> None:
    """Make a loaded Qwen3-TTS model's speech-tokenizer decoder attend as the official one."""
    tokenizer = getattr(model, "speech_tokenizer", None)
    decoder = getattr(tokenizer, "decoder", None)
    transformer = getattr(decoder, "pre_transformer", None)
    if isinstance(transformer, DecoderTransformer):
        transformer.__class__ = SlidingWindowDecoderTransformer
