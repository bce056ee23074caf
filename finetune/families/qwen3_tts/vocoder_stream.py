"""The speech tokenizer's decoder, streamed: frames in, audio out, chunk by chunk, rows batched.

Every stage of the 12 Hz decoder is causal (left-padded convolutions, transposed convolutions
trimmed on the right, a causal sliding-window transformer), so a decode that carries each stage's
state from one chunk to the next (the last inputs of every padded convolution, the overlap of
every transposed one, the transformer's KV cache) makes the same audio as decoding the whole
sequence at once; only the order of float32 sums differs (chunks take other convolution paths
than one long input: tests/test_qwen3_vocoder_stream.py bounds the difference).

The reference (qwen-tts, and mlx-audio after it) decodes a segment in chunks of 300 frames, each
after 25 frames of left context. A stream follows it: at every 300th frame its state restarts
from those 25 frames, so the joined stream is the reference's one-shot decode at any length.
The reference also trims its output by the count of frames whose first code is above 0 (meant
for its padded batches); a stream has no padding and cuts nothing.

Rows are decoded together: each stage runs once on a batch right-padded to the longest row's
chunk. Causality keeps padding out of every row's real outputs; each row's state is taken at its
own length, and a transposed convolution's padded inputs are zeroed so its carried overlap holds
only the row's own frames. The transformer runs row by row (each at its own position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.runtime.settings import on_unless_turned_off

import mlx.core as mx
import mlx.nn as nn
import numpy as np

CHUNK_FRAMES = 300  # the reference's one-shot decode: chunks of this many frames,
CHUNK_CONTEXT = 25  # each decoded after this many frames before it
ROW_SPLIT_BYTES = 512 * 1024  # a batched pass goes on row by row past this much input a row

BATCH_ENV = "VOICEFOUNDRY_VOCODER_BATCH"

__all__ = ["StreamingVocoder", "VocoderStream", "vocoder_batch_wanted"]


def vocoder_batch_wanted() -> bool:
    """Whether servers decode the due chunks of several rows in one pass (the default;
    VOICEFOUNDRY_VOCODER_BATCH=0 turns it off: see server/engine/families/qwen3.py)."""
    return on_unless_turned_off(BATCH_ENV)


@dataclass
class VocoderStream:
    """One row's decoder state between chunks."""

    queue: list[np.ndarray] = field(default_factory=list)  # frames [16] waiting to be decoded
    drop: int = 0  # leading frames of the queue whose audio is not kept (a clone's reference)
    lead: int = 0  # frames given at `open` for context (so `position - lead` frames are out)
    position: int = 0  # frames of the sequence decoded (kept or not)
    history: list[np.ndarray] = field(default_factory=list)  # the last CHUNK_CONTEXT frames
    cache: list[Any] | None = None  # the transformer's KV cache, per layer
    carried: dict[str, mx.array] = field(default_factory=dict)  # per stage: padded inputs, overlap

    @property
    def frames_in(self) -> int:
        """Frames handed to `decode` so far (the lead not counted)."""
        return self.position + len(self.queue) - self.lead


@dataclass
class _Pass:
    """What one row decodes in one batched pass."""

    stream: VocoderStream
    codes: np.ndarray  # [n, 16]
    skip: int  # leading frames whose audio is dropped (a lead's, or a restart's context)


class StreamingVocoder:
    """Streams of `decoder` (mlx-audio's `Qwen3TTSSpeechTokenizerDecoder`, weights as loaded)."""

    def __init__(self, decoder: Any, upsample: int) -> None:
        self.decoder = decoder
        self.upsample = upsample  # audio samples per frame

    def open(self, lead: np.ndarray | None = None) -> VocoderStream:
        """A new stream; `lead` [T, 16] frames (an in-context reference's) come first and are
        decoded for the context they give, their audio dropped."""
        stream = VocoderStream()
        if lead is not None and len(lead):
            stream.queue = list(lead)
            stream.drop = stream.lead = len(lead)
        return stream

    def decode(self, parts: Sequence[tuple[VocoderStream, np.ndarray]]) -> list[np.ndarray]:
        """Each stream's audio for its next frames ([n, 16] each), the rows decoded together.
        A stream's states change only once its audio is made: after an error, every stream
        is as it was."""
        audio: list[list[np.ndarray]] = [[] for _ in parts]
        queues = [[*stream.queue, *codes] for stream, codes in parts]
        shadows = [_copy(stream) for stream, _ in parts]
        while any(queues):
            passes: list[tuple[int, _Pass]] = []
            for i, shadow in enumerate(shadows):
                if queues[i]:
                    passes.append((i, self._next_pass(shadow, queues[i])))
            made = self._run([p for _, p in passes])
            for (i, _), wav in zip(passes, made, strict=True):
                audio[i].append(wav)
        for (stream, _), shadow in zip(parts, shadows, strict=True):
            _adopt(stream, shadow)
        return [np.concatenate(parts_) if parts_ else np.zeros(0, np.float32) for parts_ in audio]

    def _next_pass(self, stream: VocoderStream, queue: list[np.ndarray]) -> _Pass:
        """Take from `queue` the frames up to the stream's next 300-frame boundary; at the
        boundary the stream's state starts over, primed by the frames before it."""
        at_boundary = stream.position > 0 and stream.position % CHUNK_FRAMES == 0
        restart = at_boundary and bool(stream.carried)
        if restart:
            stream.cache, stream.carried = None, {}
        room = CHUNK_FRAMES - stream.position % CHUNK_FRAMES
        taken = queue[:room]
        del queue[:room]
        skip = min(stream.drop, len(taken))
        stream.drop -= skip
        lead = stream.history[-CHUNK_CONTEXT:] if restart else []
        stream.position += len(taken)
        stream.history = [*stream.history, *taken][-CHUNK_CONTEXT:]
        return _Pass(stream, np.stack([*lead, *taken]), skip + len(lead))

    def _run(self, passes: list[_Pass]) -> list[np.ndarray]:
        lengths = [len(p.codes) for p in passes]
        longest = max(lengths)
        codes = np.zeros((len(passes), longest, passes[0].codes.shape[1]), np.int32)
        for i, p in enumerate(passes):
            codes[i, : lengths[i]] = p.codes
        run = _Batch([p.stream for p in passes], lengths)
        wavs = run.forward(self.decoder, mx.array(codes).transpose(0, 2, 1))
        mx.eval(*wavs, *run.pending_states())
        run.commit()
        return [
            np.array(wav[0, p.skip * self.upsample :, 0], dtype=np.float32)
            for wav, p in zip(wavs, passes, strict=True)
        ]


class _Batch:
    """One pass of the decoder over right-padded rows, carrying each row's state."""

    def __init__(self, streams: list[VocoderStream], lengths: list[int]) -> None:
        self.streams = streams
        self.lengths = lengths  # frames per row
        self.scale = 1  # samples per frame at the current stage
        self.new_states: list[dict[str, mx.array]] = [{} for _ in streams]
        self.new_caches: list[list[Any]] = []

    def valid(self) -> list[int]:
        return [n * self.scale for n in self.lengths]

    def forward(self, dec: Any, codes: mx.array) -> list[mx.array]:
        """Each row's audio [1, samples, 1] (its own length). The stages run on the whole
        batch while a row's activations are small (the wide early stages read more weights
        than activations: one pass for all rows reads them once); from the first stage whose
        input passes ROW_SPLIT_BYTES a row, each row goes on alone, unpadded, evaluated before
        the next (the narrow late stages are bound by their activations: one row's stay in
        the cache; 8 rows at once ran 1.4-3.4x slower here)."""
        stages = _stages(dec)
        x = codes
        for n, stage in enumerate(stages):
            if n and len(self.streams) > 1 and x.nbytes // x.shape[0] > ROW_SPLIT_BYTES:
                return self._row_by_row(stages[n:], x)
            x = stage(self, x)
        return [x[i : i + 1, :n] for i, n in enumerate(self.valid())]

    def _row_by_row(self, stages: list[_Stage], x: mx.array) -> list[mx.array]:
        mx.eval(x)
        out = []
        for i, length in enumerate(self.valid()):
            row = _Batch([self.streams[i]], [self.lengths[i]])
            row.scale, row.new_states = self.scale, [self.new_states[i]]
            h = x[i : i + 1, :length]
            for stage in stages:
                h = stage(row, h)
            mx.eval(h, *row.pending_states())
            out.append(h)
        return out

    # --- stages ----------------------------------------------------------------------------
    def transformer(self, transformer: Any, hidden: mx.array) -> mx.array:
        rows = []
        for i, (stream, n) in enumerate(zip(self.streams, self.lengths, strict=True)):
            cache = _copy_cache(stream.cache) if stream.cache else transformer.make_cache()
            rows.append(transformer(hidden[i : i + 1, :n], cache=cache))
            self.new_caches.append(cache)
        longest = max(self.lengths)
        return mx.concatenate([_right_pad(r, longest) for r in rows])

    def padded(
        self, key: str, conv: Callable[[mx.array], mx.array], pad: int, x: mx.array
    ) -> mx.array:
        """A causal convolution: each row's input after its carried last `pad` inputs."""
        if pad <= 0:
            return conv(x)
        heads = [s.carried.get(key, mx.zeros((1, pad, x.shape[2]), x.dtype)) for s in self.streams]
        full = mx.concatenate([mx.concatenate(heads), x], axis=1)
        self._keep(key, [full[i : i + 1, n : n + pad] for i, n in enumerate(self.valid())])
        return conv(full)

    def _keep(self, key: str, tails: list[mx.array]) -> None:
        """Each row's carried state, copied out and evaluated now: a view (or a copy not yet
        evaluated) would hold its whole source (tens of MB at the last stages) until the
        pass is committed, and every later buffer of the pass would then take fresh pages
        (12 % of a one-shot decode of the tiny vocoder)."""
        copies = [tail * 1.0 for tail in tails]  # x * 1 is x, bit for bit
        mx.eval(copies)
        for i, state in enumerate(copies):
            self.new_states[i][key] = state

    def transposed(self, key: str, conv: Any, trim: int, x: mx.array) -> mx.array:
        """A transposed convolution trimmed by `trim` on the right: each row's head gets the
        overlap its previous chunk left (without bias: the head has it)."""
        stride = int(conv.stride)
        valid = self.valid()
        longest = x.shape[1]
        if any(n < longest for n in valid):  # padded inputs add nothing to a row's overlap
            mask = (mx.arange(longest)[None, :] < mx.array(valid)[:, None])[..., None]
            x = x * mask.astype(x.dtype)
        y = conv(x)
        self.scale *= stride
        if trim <= 0:
            return y[:, : longest * stride]
        carried = [s.carried.get(key) for s in self.streams]
        if any(c is not None for c in carried):  # a first chunk has no overlap to add
            zeros = mx.zeros((1, trim, y.shape[2]), y.dtype)
            heads = mx.concatenate([c if c is not None else zeros for c in carried])
            y[:, :trim] = y[:, :trim] + heads  # in place: y is this pass's own temporary
        bias = conv.bias if "bias" in conv else None
        tails = [y[i : i + 1, n : n + trim] for i, n in enumerate(self.valid())]
        self._keep(key, [tail - bias if bias is not None else tail for tail in tails])
        return y[:, : longest * stride]

    def convnext(self, key: str, block: Any, x: mx.array) -> mx.array:
        h = self.padded(key, block.dwconv.conv, block.dwconv.padding, x)
        h = block.pwconv2(nn.gelu(block.pwconv1(block.norm(h))))
        return x + block.gamma * h

    def residual(self, key: str, unit: Any, x: mx.array) -> mx.array:
        h = self.padded(key + ".c1", unit.conv1.conv, unit.conv1.padding, unit.act1(x))
        h = self.padded(key + ".c2", unit.conv2.conv, unit.conv2.padding, unit.act2(h))
        return x + h

    # --- state ------------------------------------------------------------------------------
    def pending_states(self) -> list[mx.array]:
        arrays = [a for states in self.new_states for a in states.values()]
        for cache in self.new_caches:
            arrays += [c.keys for c in cache if c.keys is not None]
            arrays += [c.values for c in cache if c.values is not None]
        return arrays

    def commit(self) -> None:
        for stream, states, cache in zip(
            self.streams, self.new_states, self.new_caches, strict=True
        ):
            stream.carried.update(states)
            stream.cache = cache


_Stage = Callable[["_Batch", mx.array], mx.array]


def _stages(dec: Any) -> list[_Stage]:
    """The decoder's stages in order, each (batch, input) -> output."""

    def front(b: _Batch, codes: mx.array) -> mx.array:
        hidden = dec.quantizer.decode(codes).transpose(0, 2, 1)  # [B, T, codebook_dim]
        hidden = b.padded("pre_conv", dec.pre_conv.conv, dec.pre_conv.padding, hidden)
        return b.transformer(dec.pre_transformer, hidden)

    def upsample(i: int, transpose: Any, block: Any) -> _Stage:
        def stage(b: _Batch, x: mx.array) -> mx.array:
            x = b.transposed(f"up{i}", transpose.conv, transpose.trim_right, x)
            return b.convnext(f"up{i}.block", block, x)

        return stage

    def first(b: _Batch, x: mx.array) -> mx.array:
        conv = dec.decoder[0]
        return b.padded("dec0", conv.conv, conv.kernel_size - 1, x)

    def block(i: int, modules: Any) -> _Stage:
        snake, up, *units = modules.block

        def stage(b: _Batch, x: mx.array) -> mx.array:
            x = b.transposed(f"dec{i}.up", up.conv, up.trim_right, snake(x))
            for u, unit in enumerate(units):
                x = b.residual(f"dec{i}.res{u}", unit, x)
            return x

        return stage

    def last(b: _Batch, x: mx.array) -> mx.array:
        conv = dec.decoder[-1]
        x = b.padded("out", conv.conv, conv.kernel_size - 1, dec.decoder[-2](x))
        return mx.clip(x, -1.0, 1.0)

    return [
        front,
        *(upsample(i, t, c) for i, (t, c) in enumerate(dec.upsample)),
        first,
        *(block(i, m) for i, m in enumerate(dec.decoder[1:-2])),
        last,
    ]


def _right_pad(x: mx.array, length: int) -> mx.array:
    missing = length - x.shape[1]
    if missing <= 0:
        return x
    return mx.concatenate([x, mx.zeros((x.shape[0], missing, x.shape[2]), x.dtype)], axis=1)


def _copy_cache(cache: list[Any]) -> list[Any]:
    """A KV cache that can grow without touching `cache` (MLX arrays are immutable; the
    cache object's fields are what `update_and_fetch` replaces)."""
    copies = []
    for layer in cache:
        twin = type(layer)()
        twin.keys, twin.values, twin.offset = layer.keys, layer.values, layer.offset
        copies.append(twin)
    return copies


def _copy(stream: VocoderStream) -> VocoderStream:
    return VocoderStream(
        queue=[],
        drop=stream.drop,
        lead=stream.lead,
        position=stream.position,
        history=list(stream.history),
        cache=stream.cache,
        carried=dict(stream.carried),
    )


def _adopt(stream: VocoderStream, shadow: VocoderStream) -> None:
    stream.queue = []
    stream.drop, stream.position, stream.history = shadow.drop, shadow.position, shadow.history
    stream.cache, stream.carried = shadow.cache, shadow.carried
