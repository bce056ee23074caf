"""Batched streaming Mimi encoders and decoders over ONE shared mlx-audio Mimi.

mlx-audio keeps Mimi's streaming state on its modules: each streaming conv's buffered input
(`_prev_xs`, `_left_pad_applied`), each transposed conv's overlap (`_prev_ys`) and each residual
add's leftovers (`_lhs`, `_rhs`). A `MimiStreamState` holds one session's copy of all of it plus
its own transformer KV caches. `MimiStreamer` steps many sessions in one call: it stacks their
conv states along the batch axis onto the modules, runs mlx-audio's SEANet / resampling /
quantizer steps once for the whole batch, and writes each row's new state back to its session,
so nothing of a session stays on the modules.

Rows can share one pass when their conv states have the same shapes and flags (all live
sessions past their first step do). A session on its very first step (left padding not yet
applied) goes in a pass of its own with any others in the same phase; that is rare and keeps
mlx-audio's own first-step arithmetic. The Mimi transformers run here rather than through
mlx-audio's `Transformer`, whose attention takes one rotary offset and one cache for the whole
batch: their linears run once for the batch, and attention runs per row over that session's own
`WindowKVCache` (their lengths differ between sessions that started at different times), with a
vector of rotary offsets. SEANet's ELUs take the host ELU kernel (`host_elu`: MLX's CPU exp is
the slowest part of a tick otherwise), as a node of the graph where the C++ extension is built;
the work stays lazy and the caller evaluates it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.families.personaplex.caches import WindowKVCache
from finetune.families.personaplex.layout import FRAME_SIZE
from finetune.runtime.conv import im2col, overlap_add, tap_inputs, transposed_weight
from finetune.runtime.host_elu import elu, graph_elu

import mlx.core as mx
import mlx.nn as nn
import numpy as np

_STATE_ATTRS = ("_prev_xs", "_left_pad_applied", "_prev_ys", "_lhs", "_rhs")

Caches = list[WindowKVCache]


@dataclass
class MimiStreamState:
    values: list[Any]
    caches: Caches
    frames: int = 0

    def arrays(self) -> list[mx.array]:
        out = [v for v in self.values if isinstance(v, mx.array)]
        for cache in self.caches:
            out.extend(cache.arrays())
        return out

    def shape_key(self) -> tuple[Any, ...]:
        """Equal for sessions whose conv states stack along the batch axis."""
        return tuple(
            (tuple(v.shape[1:]), v.dtype) if isinstance(v, mx.array) else v for v in self.values
        )


@dataclass
class _Side:
    slots: list[tuple[Any, str]] = field(default_factory=list)
    transformer: Any = None
    layers: int = 0
    context: int = 0


def streaming_twin(mimi: Any, *, fast: bool = True) -> Any:
    """A Mimi sharing `mimi`'s weight arrays, with row-exact convs and codebooks (see
    `install_row_exact_modules`): a session's codes and PCM do not depend on its batch.
    `fast`: SEANet's ELUs by the host kernel (`install_host_elu`); False keeps MLX's."""
    from mlx_audio.codec.models.mimi.mimi import Mimi
    from mlx_audio.codec.models.mimi.modules import ConvTranspose1d, EuclideanCodebook

    twin = Mimi(mimi.cfg)
    twin.update(mimi.parameters())
    for _, module in twin.named_modules():
        if isinstance(module, (EuclideanCodebook, ConvTranspose1d)):
            module.update_in_place()
    install_row_exact_modules(twin)
    if fast:
        install_host_elu(twin)
        graph_elu()  # built now, not in the first tick
    twin.eval()
    return twin


class MimiStreamer:
    def __init__(self, mimi: Any, *, fast: bool = True) -> None:
        twin = streaming_twin(mimi, fast=fast)
        self.mimi = twin
        context = int(twin.cfg.transformer.context)
        layers = int(twin.cfg.transformer.num_layers)
        self._encoder = _Side(
            _state_slots([twin.encoder, twin.downsample]),
            twin.encoder_transformer,
            layers,
            context,
        )
        self._decoder = _Side(
            _state_slots([twin.decoder, twin.upsample]),
            twin.decoder_transformer,
            layers,
            context,
        )
        self._masks: dict[tuple[int, int, int], mx.array] = {}

    def new_encoder(self) -> MimiStreamState:
        return _fresh(self._encoder)

    def new_decoder(self) -> MimiStreamState:
        return _fresh(self._decoder)

    def encode(self, state: MimiStreamState, pcm: mx.array) -> mx.array:
        """Codes [1, 8, frames] of whole frames of 24 kHz mono PCM [samples], streamed on."""
        if pcm.ndim != 1:
            raise ValueError(f"PCM must be mono and whole {FRAME_SIZE}-sample frames")
        return self.encode_batch([state], pcm[None])

    def encode_batch(self, states: Sequence[MimiStreamState], pcm: mx.array) -> mx.array:
        """Codes [B, 8, frames]: row i streams PCM [B, samples] row i on through states[i]."""
        if pcm.ndim != 2 or pcm.shape[0] != len(states) or pcm.shape[1] % FRAME_SIZE:
            raise ValueError(
                f"PCM must be [sessions, samples] of whole {FRAME_SIZE}-sample frames, "
                f"one row per state"
            )
        mimi, side = self.mimi, self._encoder

        def body(xs: mx.array, caches: list[Caches]) -> mx.array:
            xs = mimi.encoder.step(xs)
            xs = self._transformer(side, xs, caches)
            xs = mimi.downsample.step(xs)
            return mimi.quantizer.encode(xs)

        codes = self._run(side, states, pcm.astype(mx.float32)[:, None, :], body)
        for state in states:
            state.frames += pcm.shape[1] // FRAME_SIZE
        return codes

    def decode(self, state: MimiStreamState, codes: mx.array) -> mx.array:
        """PCM [samples] of agent codes [8, frames], streamed on."""
        return self.decode_batch([state], codes[None])[0]

    def decode_batch(self, states: Sequence[MimiStreamState], codes: mx.array) -> mx.array:
        """PCM [B, samples]: row i decodes agent codes [B, 8, frames] row i through states[i]."""
        if codes.ndim != 3 or codes.shape[0] != len(states):
            raise ValueError("codes must be [sessions, codebooks, frames], one row per state")
        mimi, side = self.mimi, self._decoder

        def body(xs: mx.array, caches: list[Caches]) -> mx.array:
            xs = mimi.quantizer.decode(xs)
            xs = mimi.upsample.step(xs)
            xs = self._transformer(side, xs, caches)
            return mimi.decoder.step(xs)

        pcm = self._run(side, states, codes.astype(mx.int32), body)
        for state in states:
            state.frames += codes.shape[-1]
        return pcm[:, 0]

    def _run(
        self,
        side: _Side,
        states: Sequence[MimiStreamState],
        xs: mx.array,
        body: Callable[[mx.array, list[Caches]], mx.array],
    ) -> mx.array:
        """`body` once per group of rows whose conv states stack, outputs back in row order."""
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a Mimi stream state appears twice in one call")
        groups: dict[tuple[Any, ...], list[int]] = {}
        for row, state in enumerate(states):
            groups.setdefault(state.shape_key(), []).append(row)
        outs, order = [], []
        for rows in groups.values():
            group = [states[r] for r in rows]
            part = xs if len(groups) == 1 else xs[mx.array(rows)]
            with _Swap(side, group):
                outs.append(body(part, [s.caches for s in group]))
            order.extend(rows)
        if len(outs) == 1:
            return outs[0]
        inverse = np.argsort(np.array(order))
        return mx.concatenate(outs, axis=0)[mx.array(inverse)]

    def _transformer(self, side: _Side, xs: mx.array, caches: list[Caches]) -> mx.array:
        """mlx-audio's `ProjectedTransformer` on conv-layout xs [B, C, T], row i on caches[i]."""
        projected = side.transformer
        if projected.conv_layout:
            # Row-major before the first matmul: a transposed [1, T, C] view would take BLAS's
            # transposed-operand path and round differently from the same row in a batch.
            xs = mx.contiguous(xs.swapaxes(1, 2))
        if projected.input_proj is not None:
            xs = linear_rows(projected.input_proj, xs)
        batch, steps, dim = xs.shape
        for index, layer in enumerate(projected.transformer.layers):
            attn = layer.self_attn
            heads, head_dim = attn.cfg.num_heads, attn.cfg.head_dim
            qkv = linear_rows(attn.in_proj, layer.norm1(xs)).reshape(
                batch, steps, 3, heads, head_dim
            )
            q = qkv[:, :, 0].transpose(0, 2, 1, 3)
            k = qkv[:, :, 1].transpose(0, 2, 1, 3)
            v = qkv[:, :, 2].transpose(0, 2, 1, 3)
            if attn.rope is not None:
                offsets = mx.array([rows[index].offset for rows in caches], dtype=mx.int32)
                q = _rope(attn.rope, q, offsets)
                k = _rope(attn.rope, k, offsets)
            outs = []
            for row, rows in enumerate(caches):
                keys, values = rows[index].update_and_fetch(k[row : row + 1], v[row : row + 1])
                mask = self._mask(steps, keys.shape[2], side.context, xs.dtype)
                outs.append(
                    mx.fast.scaled_dot_product_attention(
                        q[row : row + 1], keys, values, scale=attn.scale, mask=mask
                    )
                )
            attended = outs[0] if batch == 1 else mx.concatenate(outs, axis=0)
            attended = attended.transpose(0, 2, 1, 3).reshape(batch, steps, dim)
            xs = xs + layer.layer_scale_1(linear_rows(attn.out_proj, attended))
            xs = xs + layer.layer_scale_2(_mlp(layer.gating, layer.norm2(xs)))
        project = projected.output_projs[0]
        out = xs if project is None else linear_rows(project, xs)
        return out.swapaxes(1, 2) if projected.conv_layout else out

    def _mask(self, steps: int, length: int, context: int, dtype: mx.Dtype) -> mx.array:
        """mlx-audio's additive mask: the newest `steps` of `length` cached positions attend
        causally, at most `context` back. A `WindowKVCache` holds only written positions."""
        key = (steps, length, context)
        if key not in self._masks:
            pos_k = np.arange(length)
            pos_q = np.arange(length - steps, length)
            delta = pos_q[:, None] - pos_k[None, :]
            allowed = delta >= 0
            if context:
                allowed &= delta < context
            self._masks[key] = mx.array(np.where(allowed, 0.0, -1e9)[None, None], mx.float32)
        mask = self._masks[key]
        return mask if mask.dtype == dtype else mask.astype(dtype)


class _Swap:
    """Stacks a group's conv states onto the modules; splits them back to the rows after."""

    def __init__(self, side: _Side, states: list[MimiStreamState]) -> None:
        self.side, self.states = side, states

    def __enter__(self) -> None:
        for slot, (module, attr) in enumerate(self.side.slots):
            values = [state.values[slot] for state in self.states]
            if len(values) > 1 and isinstance(values[0], mx.array):
                setattr(module, attr, mx.concatenate(values, axis=0))
            else:
                setattr(module, attr, values[0])

    def __exit__(self, *exc: object) -> None:
        batch = len(self.states)
        for slot, (module, attr) in enumerate(self.side.slots):
            value = getattr(module, attr)
            for row, state in enumerate(self.states):
                split = batch > 1 and isinstance(value, mx.array)
                state.values[slot] = value[row : row + 1] if split else value
            # leave nothing of the sessions on the modules
            setattr(module, attr, False if attr == "_left_pad_applied" else None)


def _mlp(mlp: Any, xs: mx.array) -> mx.array:
    """mlx-audio's Mimi `MlpGating` / `MlpNoGating` over `_linear`."""
    if hasattr(mlp, "linear_in"):
        hidden = linear_rows(mlp.linear_in, xs)
        hidden = hidden.reshape(*hidden.shape[:2], 2, -1)
        return linear_rows(mlp.linear_out, nn.silu(hidden[:, :, 0]) * hidden[:, :, 1])
    return linear_rows(mlp.linear2, mlp.activation(linear_rows(mlp.linear1, xs)))


def _rope(rope: Any, x: mx.array, offsets: mx.array) -> mx.array:
    return mx.fast.rope(
        x,
        rope.dims,
        traditional=rope.traditional,
        base=rope.base,
        scale=rope.scale,
        offset=offsets,
    )


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


# ---------------------------------------------------------------------------------------------
# Row-exact GEMMs
# ---------------------------------------------------------------------------------------------
# A plain [B, T, C] @ W folds the batch into the GEMM's rows, and OpenBLAS picks its small-matrix
# kernels by size, so a row's result can depend on how many rows ran with it (measured: a
# 128 -> 384 linear on 2 vs 4 rows differs in the last bit). Multiplying by a broadcast weight
# keeps one GEMM per batch row, shaped exactly like a batch of one, so every session's codes and
# PCM are the same alone or batched. It re-reads the weights per row (as stepping the sessions
# one by one did); what batching saves is the per-op overhead, which dominates small tensors.


def linear_rows(linear: Any, xs: mx.array) -> mx.array:
    """`linear(xs)` for xs [B, T, C], one GEMM per batch row."""
    out = _matmul_rows(xs, linear.weight.T)
    return out + linear.bias if "bias" in linear else out


def _matmul_rows(xs: mx.array, weight: mx.array) -> mx.array:
    return mx.contiguous(xs) @ mx.broadcast_to(weight, (xs.shape[0], *weight.shape))


def _conv1d_rows(xs: mx.array, weight: mx.array, stride: int, dilation: int) -> mx.array:
    """Unpadded, ungrouped `mx.conv1d` of xs [B, L, C_in] by weight [C_out, K, C_in]:
    im2col by K strided slices, then one GEMM per batch row."""
    c_out, k, c_in = weight.shape
    taps = tap_inputs(xs, k, stride, 0, dilation)
    if not taps:
        return mx.zeros((xs.shape[0], 0, c_out), dtype=xs.dtype)
    return _matmul_rows(im2col(taps), weight.reshape(c_out, k * c_in).T)


def _conv_transpose1d_rows(xs: mx.array, weight: mx.array, stride: int) -> mx.array:
    """Unpadded, ungrouped `mx.conv_transpose1d` of xs [B, L, C_in] by weight [C_out, K, C_in]:
    one GEMM per batch row for all taps, then the taps' shifted sums (`overlap_add`)."""
    batch, length, _ = xs.shape
    c_out, k, _ = weight.shape
    per_tap = _matmul_rows(xs, transposed_weight(weight))
    return overlap_add(per_tap.reshape(batch, length, k, c_out), stride)


def _row_exact_classes() -> dict[type, type]:
    from mlx_audio.codec.models.mimi.modules import conv as mimi_conv
    from mlx_audio.codec.models.mimi.modules.quantization import EuclideanCodebook

    class RowExactConv1d(mimi_conv.Conv1d):
        def __call__(self, xs: mx.array) -> mx.array:
            if self._groups != 1 or self._padding:
                return super().__call__(xs)
            ys = _conv1d_rows(xs.swapaxes(-1, -2), self.weight, self._stride, self._dilation)
            if self.bias is not None:
                ys = ys + self.bias
            return ys.swapaxes(-1, -2)

    class RowExactConvTranspose1d(mimi_conv.ConvTranspose1d):
        def __call__(self, xs: mx.array) -> mx.array:
            if self._expanded_groups != 1 or self._padding:
                return super().__call__(xs)  # depthwise: no GEMM
            ys = _conv_transpose1d_rows(xs.swapaxes(-1, -2), self._expanded_weight, self._stride)
            if self.bias is not None:
                ys = ys + self.bias
            return ys.swapaxes(-1, -2)

    class RowExactCodebook(EuclideanCodebook):
        def encode(self, xs: mx.array) -> mx.array:  # xs [B, T, D] -> codes [B, T]
            dot = _matmul_rows(xs.astype(mx.float32), self._embedding.astype(mx.float32).T)
            return (self._c2.astype(mx.float32) - dot).argmin(axis=-1)

    return {
        mimi_conv.Conv1d: RowExactConv1d,
        mimi_conv.ConvTranspose1d: RowExactConvTranspose1d,
        EuclideanCodebook: RowExactCodebook,
    }


# ---------------------------------------------------------------------------------------------
# SEANet's ELUs by the host kernel
# ---------------------------------------------------------------------------------------------
# MLX's CPU `exp` is a scalar polynomial with a libm `fmaf` call per term (~25 ns an element
# here), and a streamed tick runs ~270k ELU elements per session through SEANet: the largest
# single cost of a duplex tick. The runtime's host ELU (finetune/runtime/host_elu: compiled,
# ~1.5 ns an element, else numpy's `expm1`) computes each element alone, the same way whatever
# the array's length, so a row's result does not depend on its batch. Its values are `expm1`'s,
# as PyTorch's ELU (Kyutai's Mimi) computes them, rather than MLX's `exp(x) - 1`.


def host_elu(xs: mx.array) -> mx.array:
    """ELU (alpha 1) of float32 `xs` by the host kernel: a lazy node of the graph where the C++
    extension is built (`graph_elu`), else computed on the host (evaluates `xs`).

    SEANet's activations are transposed views ([B, C, T] of a conv's [B, T, C] output): the ELU
    runs over the buffer in its own order and the result is the same view of a new buffer, so
    neither side copies across the transpose."""
    if xs.dtype != mx.float32:
        return nn.elu(xs, alpha=1.0)
    node = graph_elu()
    if node is not None:
        return node(xs)
    values = np.asarray(xs)
    order = sorted(range(values.ndim), key=lambda axis: -values.strides[axis])
    stored = values.transpose(order)
    if not stored.flags.c_contiguous:
        return mx.array(elu(values))
    return mx.array(elu(stored)).transpose(np.argsort(order).tolist())


def _host_elu_classes() -> dict[type, type]:
    from mlx_audio.codec.models.mimi.modules import seanet

    class HostEluResnetBlock(seanet.SeanetResnetBlock):
        def step(self, xs: mx.array) -> mx.array:
            residual = xs
            for block in self.block:
                xs = block.step(host_elu(xs))
            shortcut = residual if self.shortcut is None else self.shortcut.step(residual)
            return self.streaming_add.step(xs, shortcut)

    class HostEluEncoderLayer(seanet.EncoderLayer):
        def step(self, xs: mx.array) -> mx.array:
            for residual in self.residuals:
                xs = residual.step(xs)
            return self.downsample.step(host_elu(xs))

    class HostEluDecoderLayer(seanet.DecoderLayer):
        def step(self, xs: mx.array) -> mx.array:
            xs = self.upsample.step(host_elu(xs))
            for residual in self.residuals:
                xs = residual.step(xs)
            return xs

    class HostEluEncoder(seanet.SeanetEncoder):
        def step(self, xs: mx.array) -> mx.array:
            xs = self.init_conv1d.step(xs)
            for layer in self.layers:
                xs = layer.step(xs)
            return self.final_conv1d.step(host_elu(xs))

    class HostEluDecoder(seanet.SeanetDecoder):
        def step(self, xs: mx.array) -> mx.array:
            xs = self.init_conv1d.step(xs)
            for layer in self.layers:
                xs = layer.step(xs)
            return self.final_conv1d.step(host_elu(xs))

    return {
        seanet.SeanetResnetBlock: HostEluResnetBlock,
        seanet.EncoderLayer: HostEluEncoderLayer,
        seanet.DecoderLayer: HostEluDecoderLayer,
        seanet.SeanetEncoder: HostEluEncoder,
        seanet.SeanetDecoder: HostEluDecoder,
    }


def install_host_elu(mimi: Any) -> int:
    """Re-class `mimi`'s SEANet blocks so their streaming steps take `host_elu`; returns how
    many (their one-shot `__call__` is untouched)."""
    table = _host_elu_classes()
    swapped = 0
    for _, module in mimi.named_modules():
        for base, twin in table.items():
            if type(module) is base:
                module.__class__ = twin
                swapped += 1
                break
    return swapped


def install_row_exact_modules(mimi: Any) -> int:
    """Re-class `mimi`'s convs and codebooks with row-exact twins; returns how many."""
    table = _row_exact_classes()
    swapped = 0
    for _, module in mimi.named_modules():
        for base, row_exact in table.items():
            if isinstance(module, base) and not isinstance(module, row_exact):
                module.__class__ = row_exact
                swapped += 1
                break
    return swapped
