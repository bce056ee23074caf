"""The RMS norm, the SwiGLU and Qwen3-TTS's attention on MLX's CPU backend, a graph node each
where the extension is built.

A decode step of the real 0.6B Qwen3-TTS is thousands of graph nodes, and each costs MLX's own
dispatch on this CPU: that overhead, not the weights, is much of what keeps a frame above its
memory floor. `mx.fast.rms_norm` has no CPU kernel; its fallback is seven ops a call (square,
mean, add, rsqrt, two multiplies, two casts), ~430 calls a frame. For float32 x and weight the
extension's `rms_norm` (csrc/cpu_primitives.cpp) is one node with the fallback's values bit for
bit on x86-64 Linux; other dtypes or platforms, or no extension, take the fallback's ops
compiled with `mx.compile` (the elementwise ones become one kernel: three nodes, the same
values; `tests/test_runtime_conv.py`). Without a compiler MLX runs the same ops unfused.

`swiglu` (silu(gate) * up, the Qwen3-TTS MLPs'): mlx-audio compiles it into one elementwise
kernel, which MLX's x86 CPU build runs one value at a time with a libm call per fused
multiply-add (~20 ns a value: 0.7 ms a call at 8 rows, 7 ms for a 120-token prefill). The
extension's `swiglu` takes eight values at a time with the same roundings: the compiled
kernel's values bit for bit.

`norm_rope` (an attention's query or key: the projection as heads, each RMS-normed, laid out
[B, heads, L, D] and rotated by the position embeddings): ~10 nodes in mlx-audio's Qwen3-TTS
attention, one in the extension, with the same values bit for bit. `attention` (MLX's
`scaled_dot_product_attention`, whose CPU form is ~15 nodes): one node in the extension, each
query row summed alone in a fixed order, so within float rounding of MLX's, not its bits.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from functools import cache, partial

from finetune.runtime import primitives

import mlx.core as mx
import mlx.nn as nn


def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    """What mx.fast.rms_norm computes on CPU (its fallback), op for op."""
    xf = x.astype(mx.float32)
    normed = xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


@cache
def _compiled() -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    return mx.compile(_rms_norm)


# Where MLX's CPU build computes one value at a time (its x86-64 wheels: sums left to right,
# elementwise kernels on Simd<float, 1>), which the primitives reproduce; elsewhere (e.g.
# Accelerate's vectorised sums, NEON's simd exp on macOS) MLX's own ops stay.
_SCALAR_MLX_CPU = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def primitive_wanted(x: mx.array, weight: mx.array) -> bool:
    """Whether `rms_norm` takes the extension's primitive for these arrays."""
    return (
        _SCALAR_MLX_CPU
        and x.dtype == mx.float32
        and weight.dtype == mx.float32
        and weight.ndim == 1
        and x.ndim >= 1
        and weight.shape[0] == x.shape[-1]
    )


def prepare() -> None:
    """Build the extension now (a model's load), not in its first forward."""
    if _SCALAR_MLX_CPU:
        primitives.load()


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if primitive_wanted(x, weight):
        extension = primitives.load()
        if extension is not None:
            return extension.rms_norm(x, weight, eps)
    return _compiled()(x, weight, mx.array(eps, mx.float32))


@partial(mx.compile, shapeless=True)
def _swiglu_ops(gate: mx.array, up: mx.array) -> mx.array:
    """mlx-audio's Qwen3-TTS `swiglu`, op for op."""
    return nn.silu(gate) * up


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    if (
        _SCALAR_MLX_CPU
        and gate.dtype == mx.float32
        and up.dtype == mx.float32
        and gate.shape == up.shape
    ):
        extension = primitives.load()
        if extension is not None:
            return extension.swiglu(gate, up)
    return _swiglu_ops(gate, up)


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@mx.compile
def _rope_ops(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """mlx-audio's Qwen3-TTS rotation (`apply_rotary_pos_emb`) of one of q, k, op for op."""
    return x * mx.expand_dims(cos, 1) + _rotate_half(x) * mx.expand_dims(sin, 1)


def norm_rope(
    x: mx.array, weight: mx.array, cos: mx.array, sin: mx.array, heads: int, eps: float
) -> mx.array:
    """x [B, L, heads * D] -> [B, heads, L, D]: each head RMS-normed over D (times `weight`),
    then rotated by cos, sin [B, L, D] (or broadcast to it)."""
    if _SCALAR_MLX_CPU and all(a.dtype == mx.float32 for a in (x, weight, cos, sin)):
        extension = primitives.load()
        if extension is not None:
            return extension.norm_rope(x, weight, cos, sin, heads, eps)
    batch, length, _ = x.shape
    normed = rms_norm(x.reshape(batch, length, heads, -1), weight, eps)
    return _rope_ops(normed.transpose(0, 2, 1, 3), cos, sin)


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """MLX's `scaled_dot_product_attention` of q [B, Hq, L, D] and k, v [B, Hkv, T, D], laid out
    [B, L, Hq * D] for the output projection. One node on the CPU path (each query row alone, the
    last bits not MLX's); MLX's op elsewhere."""
    wanted = mask is None or isinstance(mask, str) or mask.dtype in (mx.bool_, mx.float32)
    if _SCALAR_MLX_CPU and wanted and all(a.dtype == mx.float32 for a in (q, k, v)):
        extension = primitives.load()
        if extension is not None:
            if isinstance(mask, mx.array):
                return extension.attention(q, k, v, scale, "array", mask)
            return extension.attention(q, k, v, scale, mask or "")
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)
