"""Per-session streaming Mimi encoders and decoders over ONE shared mlx-audio Mimi.

mlx-audio keeps Mimi's streaming state on its modules: each streaming conv's buffered input
(`_prev_xs`, `_left_pad_applied`), each transposed conv's overlap (`_prev_ys`), each residual
add's leftovers (`_lhs`, `_rhs`) and the transformer caches (`encoder_cache` / `decoder_cache`).
A `MimiStreamState` holds one session's copy of all of it; `MimiStreamer` swaps a state onto the
modules for one call and reads it back after, so nothing of a session stays on the modules.
Sessions run one after another (their states differ in length and position); the work stays
lazy, so a whole tick of sessions is evaluated at once by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.families.personaplex.caches import WindowKVCache
from finetune.families.personaplex.layout import FRAME_SIZE

import mlx.core as mx

_STATE_ATTRS = ("_prev_xs", "_left_pad_applied", "_prev_ys", "_lhs", "_rhs")


@dataclass
class MimiStreamState:
    values: list[Any]
    caches: list[WindowKVCache]
    frames: int = 0

    def arrays(self) -> list[mx.array]:
        out = [v for v in self.values if isinstance(v, mx.array)]
        for cache in self.caches:
            out.extend(cache.arrays())
        return out


@dataclass
class _Side:
    slots: list[tuple[Any, str]] = field(default_factory=list)
    cache_attr: str = ""
    layers: int = 0
    context: int = 0


def streaming_twin(mimi: Any) -> Any:
    """A Mimi sharing `mimi`'s weight arrays, with the conv classes that suit streaming.

    The per-tap conv fast path (`finetune.runtime.accelerate`) pays off on long inputs, but a
    streaming encoder step feeds each conv only a few samples: on the real Mimi the encoder was
    ~3.5x slower with it (the last 512-channel downsample alone: 619 ms vs 32 ms), while the
    decoder's transposed convs were ~5x faster with it. So the encoder side keeps mlx-audio's
    own convs and the decoder side takes the fast ones (when the CPU fast paths are on).
    """
    from finetune.runtime import fast_cpu_active

    from mlx_audio.codec.models.mimi.mimi import Mimi
    from mlx_audio.codec.models.mimi.modules import ConvTranspose1d, EuclideanCodebook

    twin = Mimi(mimi.cfg)
    twin.update(mimi.parameters())
    for _, module in twin.named_modules():
        if isinstance(module, (EuclideanCodebook, ConvTranspose1d)):
            module.update_in_place()
    if fast_cpu_active():
        from finetune.runtime.accelerate import install_fast_modules

        install_fast_modules(twin.decoder)
        install_fast_modules(twin.upsample)
    twin.eval()
    return twin


class MimiStreamer:
    def __init__(self, mimi: Any) -> None:
        twin = streaming_twin(mimi)
        self.mimi = twin
        context = int(twin.cfg.transformer.context)
        layers = int(twin.cfg.transformer.num_layers)
        self._encoder = _Side(
            _state_slots([twin.encoder, twin.downsample]), "encoder_cache", layers, context
        )
        self._decoder = _Side(
            _state_slots([twin.decoder, twin.upsample]), "decoder_cache", layers, context
        )

    def new_encoder(self) -> MimiStreamState:
        return _fresh(self._encoder)

    def new_decoder(self) -> MimiStreamState:
        return _fresh(self._decoder)

    def encode(self, state: MimiStreamState, pcm: mx.array) -> mx.array:
        """Codes [1, 8, frames] of whole frames of 24 kHz mono PCM [samples], streamed on."""
        if pcm.ndim != 1 or pcm.shape[0] % FRAME_SIZE:
            raise ValueError(f"PCM must be mono and whole {FRAME_SIZE}-sample frames")
        with self._swapped(self._encoder, state):
            codes = self.mimi.encode_step(pcm.astype(mx.float32)[None, None, :])
        state.frames += pcm.shape[0] // FRAME_SIZE
        return codes

    def decode(self, state: MimiStreamState, codes: mx.array) -> mx.array:
        """PCM [samples] of agent codes [8, frames], streamed on."""
        with self._swapped(self._decoder, state):
            pcm = self.mimi.decode_step(codes.astype(mx.int32)[None])
        state.frames += codes.shape[-1]
        return pcm[0, 0]

    def _swapped(self, side: _Side, state: MimiStreamState) -> _Swap:
        return _Swap(self.mimi, side, state)


class _Swap:
    def __init__(self, mimi: Any, side: _Side, state: MimiStreamState) -> None:
        self.mimi, self.side, self.state = mimi, side, state

    def __enter__(self) -> None:
        for (module, attr), value in zip(self.side.slots, self.state.values, strict=True):
            setattr(module, attr, value)
        setattr(self.mimi, self.side.cache_attr, self.state.caches)

    def __exit__(self, *exc: object) -> None:
        self.state.values = [getattr(module, attr) for module, attr in self.side.slots]
        for module, attr in self.side.slots:  # leave nothing of the session on the modules
            setattr(module, attr, False if attr == "_left_pad_applied" else None)
        setattr(self.mimi, self.side.cache_attr, [])


def _state_slots(roots: list[Any]) -> list[tuple[Any, str]]:
    slots = []
    for root in roots:
        for _, module in root.named_modules():
            for attr in _STATE_ATTRS:
                if attr in module.__dict__ or hasattr(module, attr):
                    slots.append((module, attr))
    return slots


def _fresh(side: _Side) -> MimiStreamState:
    values = [False if attr == "_left_pad_applied" else None for _, attr in side.slots]
    caches = [WindowKVCache(keep=side.context) for _ in range(side.layers)]
    return MimiStreamState(values=values, caches=caches)
