"""One Mimi streaming-decoder state per utterance, over the model's one mlx-audio Mimi.

mlx-audio keeps the streaming decoder's state on Mimi's modules: each streaming conv's buffered
input (`_prev_xs`, `_left_pad_applied`), each transposed conv's overlap (`_prev_ys`), each
residual add's leftovers (`_lhs`, `_rhs`) and the decoder transformer's KV caches
(`decoder_cache`). A `MimiRowState` holds one utterance's copy of all of it; `decode` puts that
copy on the modules, runs mlx-audio's own `decode_step`, and takes the new state back, so rows
of a batch each stream through their own state and nothing of a row stays on the modules.

The arithmetic is mlx-audio's, frame by frame, unchanged: a row's samples are exactly what the
model's `MimiStreamingDecoder` gives for the same frames alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

_STATE_ATTRS = ("_prev_xs", "_left_pad_applied", "_prev_ys", "_lhs", "_rhs")


@dataclass
class MimiRowState:
    values: list[Any]  # one per (module, attribute) slot of the decoder
    caches: list[Any]  # the decoder transformer's KV caches


class MimiRowDecoders:
    def __init__(self, mimi: Any) -> None:
        self.mimi = mimi
        self._slots = [
            (module, attr)
            for root in (mimi.upsample, mimi.decoder)
            for _, module in root.named_modules()
            for attr in _STATE_ATTRS
            if hasattr(module, attr)
        ]

    def new(self) -> MimiRowState:
        """A fresh state: what `MimiStreamingDecoder.reset()` leaves on the modules."""
        values = [False if attr == "_left_pad_applied" else None for _, attr in self._slots]
        return MimiRowState(values=values, caches=self.mimi.decoder_transformer.make_cache())

    def decode(self, state: MimiRowState, codes: np.ndarray) -> mx.array:
        """PCM [1920] (lazy) of one frame's codes [N], streamed on through `state`."""
        mimi = self.mimi
        shared = mimi.decoder_cache
        for (module, attr), value in zip(self._slots, state.values, strict=True):
            setattr(module, attr, value)
        mimi.decoder_cache = state.caches
        try:
            pcm = mimi.decode_step(mx.array(np.asarray(codes, np.int32)[None, :, None]))
        finally:
            state.values = [getattr(module, attr) for module, attr in self._slots]
            mimi.decoder_cache = shared
            for module, attr in self._slots:  # leave the modules as a reset decoder has them
                setattr(module, attr, False if attr == "_left_pad_applied" else None)
        return pcm.reshape(-1)
