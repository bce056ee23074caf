"""Swap slow MLX conv modules of a loaded model for GEMM-based ones, and run it in fp32.

Modules keep their parameters and their place in the tree; only their class changes to a
subclass whose `__call__` takes the per-tap matmul path when it gives the same result as MLX's
op (the conditions below), and MLX's own op otherwise.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from finetune.runtime.conv import conv1d_taps, conv_transpose1d_taps
from finetune.runtime.elementwise import sin_squared

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Per-tap matmuls beat MLX's CPU conv by 10-50x for dilated kernels, by ~7x for narrow outputs
# and ~4x for kernel-1 convs over long inputs; but MLX's own undilated conv (im2col + one GEMM)
# wins by ~5-10x for wide channels and for short inputs (a streaming codec step, a vocoder's
# first frames). Measured on 2-core x86-64 with OpenBLAS; tests/bench/bench_foundation.py.
TAPS_MAX_CHANNELS = 256
TAPS_MIN_LENGTH = 4096


def conv1d_fast_ok(
    *, kernel: int, dilation: int, groups: int, c_in: int, c_out: int, out_len: int
) -> bool:
    if groups != 1:
        return False
    if dilation > 1 or kernel == 1:
        return True
    if c_out < 32:
        return c_in >= 8
    return 8 <= c_in <= TAPS_MAX_CHANNELS and out_len >= TAPS_MIN_LENGTH


def _out_len(length: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose1d_fast_ok(kernel: int, padding: int, dilation: int, groups: int) -> bool:
    # MLX clamps padding larger than dilation * (kernel - 1); keep its op for that corner.
    return groups == 1 and padding <= dilation * (kernel - 1)


class FastConv1d(nn.Conv1d):
    def __call__(self, x: mx.array) -> mx.array:
        c_out, k, c_in = self.weight.shape
        out_len = _out_len(x.shape[1], k, self.stride, self.padding, self.dilation)
        if not conv1d_fast_ok(
            kernel=k,
            dilation=self.dilation,
            groups=self.groups,
            c_in=c_in,
            c_out=c_out,
            out_len=out_len,
        ):
            return super().__call__(x)
        y = conv1d_taps(x, self.weight, self.stride, self.padding, self.dilation)
        return y + self.bias if "bias" in self else y


class FastConvTranspose1d(nn.ConvTranspose1d):
    def __call__(self, x: mx.array) -> mx.array:
        k = self.weight.shape[1]
        if not conv_transpose1d_fast_ok(k, self.padding, self.dilation, 1):
            return super().__call__(x)
        y = conv_transpose1d_taps(
            x, self.weight, self.stride, self.padding, self.dilation, self.output_padding
        )
        return y + self.bias if "bias" in self else y


def _square_snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: float) -> mx.array:
    """x + sin(x e^alpha)^2 / (e^beta + eps). In float32 on the host: numpy's vectorised sin
    in four in-place passes, where MLX's CPU backend makes one pass over memory per op of the
    polynomial (3.8x faster on the vocoder's last stage, [48000, 96], here); its gradient is
    the polynomial's (`_host_snake`'s vjp)."""
    if x.dtype == mx.float32:
        try:
            return cast(mx.array, _host_snake(x, alpha, beta, mx.array(eps, mx.float32)))
        except ValueError:  # traced (compile, vmap): no values to take to the host
            pass
    return _snake(x, alpha, beta, mx.array(eps, x.dtype))


def _snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    return x + (1.0 / (mx.exp(beta) + eps)) * sin_squared(x * mx.exp(alpha))


@mx.custom_function
def _host_snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    values = np.asarray(x)
    scale = np.exp(np.asarray(alpha, dtype=np.float32))
    gain = (1.0 / (np.exp(np.asarray(beta, dtype=np.float32)) + eps.item())).astype(np.float32)
    out = np.multiply(values, scale, dtype=np.float32)
    np.sin(out, out=out)
    out *= out
    out *= gain
    out += values
    return mx.array(out)


@_host_snake.vjp
def _host_snake_vjp(
    primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array
) -> tuple[mx.array, ...]:
    _, vjps = mx.vjp(_snake, list(primals), [cotangent])
    return tuple(vjps)


def _mimi_classes() -> dict[type, type]:
    from mlx_audio.codec.models.mimi.modules import conv as mimi_conv

    class FastMimiConv1d(mimi_conv.Conv1d):
        def __call__(self, xs: mx.array) -> mx.array:
            c_out, k, c_in = self.weight.shape
            out_len = _out_len(xs.shape[-1], k, self._stride, self._padding, self._dilation)
            if not conv1d_fast_ok(
                kernel=k,
                dilation=self._dilation,
                groups=self._groups,
                c_in=c_in,
                c_out=c_out,
                out_len=out_len,
            ):
                return super().__call__(xs)
            y = conv1d_taps(
                xs.swapaxes(-1, -2), self.weight, self._stride, self._padding, self._dilation
            )
            if self.bias is not None:
                y = y + self.bias
            return y.swapaxes(-1, -2)

    class FastMimiConvTranspose1d(mimi_conv.ConvTranspose1d):
        def __call__(self, xs: mx.array) -> mx.array:
            k = self._expanded_weight.shape[1]
            if not conv_transpose1d_fast_ok(k, self._padding, 1, self._expanded_groups):
                return super().__call__(xs)
            y = conv_transpose1d_taps(
                xs.swapaxes(-1, -2), self._expanded_weight, self._stride, self._padding
            )
            if self.bias is not None:
                y = y + self.bias
            return y.swapaxes(-1, -2)

    return {
        mimi_conv.Conv1d: FastMimiConv1d,
        mimi_conv.ConvTranspose1d: FastMimiConvTranspose1d,
    }


def _qwen3_snake_classes() -> dict[type, type]:
    from mlx_audio.tts.models.qwen3_tts import speech_tokenizer as st

    class FastSnakeBeta(st.SnakeBeta):
        def __call__(self, x: mx.array) -> mx.array:
            return _square_snake(x, self.alpha, self.beta, self.eps)

    class FastOutputSnake(st.DecoderOutputSnake):
        def __call__(self, x: mx.array) -> mx.array:
            return _square_snake(x, self.alpha, self.beta, self.eps)

    return {st.SnakeBeta: FastSnakeBeta, st.DecoderOutputSnake: FastOutputSnake}


_swaps: dict[type, type] | None = None


def swap_table() -> dict[type, type]:
    global _swaps
    if _swaps is None:
        _swaps = {nn.Conv1d: FastConv1d, nn.ConvTranspose1d: FastConvTranspose1d}
        _swaps.update(_mimi_classes())
        _swaps.update(_qwen3_snake_classes())
    return _swaps


def install_fast_modules(model: nn.Module) -> Counter[str]:
    """Re-class every conv / snake module with a fast twin; returns counts by class name."""
    table = swap_table()
    swapped: Counter[str] = Counter()
    for _, module in model.named_modules():
        fast = table.get(type(module))
        if fast is not None:
            module.__class__ = fast
            swapped[fast.__name__] += 1
    return swapped


def to_float32(model: nn.Module) -> None:
    """On CPU only fp32 matmuls go through BLAS: cast every floating parameter up."""
    model.set_dtype(mx.float32, predicate=lambda dt: mx.issubdtype(dt, mx.floating))


def is_cpu_backend() -> bool:
    device: Any = mx.default_device()
    return device.type == mx.cpu
