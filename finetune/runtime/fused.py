"""Composites MLX's CPU backend runs op by op, fused with `mx.compile`.

A decode step of the real 0.6B Qwen3-TTS is ~16k graph nodes, and each op that computes costs
~10 us of MLX's own dispatch on this CPU: that overhead, not the weights, is what keeps a frame
above its memory floor. `mx.fast.rms_norm` has no CPU kernel; its fallback is seven such ops a
call (square, mean, add, rsqrt, two multiplies, two casts), 428 calls a frame. Compiled, the
elementwise ones become one kernel, and the values stay the fallback's bit for bit (same ops,
same order; `tests/test_runtime_conv.py`). Without a compiler MLX runs the same ops unfused.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx


def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    """What mx.fast.rms_norm computes on CPU (its fallback), op for op."""
    xf = x.astype(mx.float32)
    normed = xf * mx.rsqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


@cache
def _compiled() -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    return mx.compile(_rms_norm)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return _compiled()(x, weight, mx.array(eps, mx.float32))
