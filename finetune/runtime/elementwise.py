"""Elementwise maths that MLX's CPU backend computes slowly.

MLX evaluates `sin` on CPU one scalar libm call at a time (~35 ns an element here, 6x numpy),
while multiply-adds are vectorised. The vocoder's Snake activations need sin^2 on every sample
of every channel, so it is computed here from a polynomial in multiply-adds instead.
"""

from __future__ import annotations

import math

import mlx.core as mx

_TWO_PI = 2.0 * math.pi
# Taylor coefficients of cos(r) in r^2, enough for |error| < 1e-6 on r in [-pi, pi].
_COS_COEFFS = tuple((-1) ** n / math.factorial(2 * n) for n in range(10))


def cos_reduced(t: mx.array) -> mx.array:
    """cos(t) via reduction to [-pi, pi] and a degree-18 even polynomial."""
    r = t - mx.round(t * (1.0 / _TWO_PI)) * _TWO_PI
    z = r * r
    acc = mx.array(_COS_COEFFS[-1], dtype=t.dtype)
    for coeff in reversed(_COS_COEFFS[:-1]):
        acc = acc * z + coeff
    return acc


def sin_squared(y: mx.array) -> mx.array:
    """sin(y)^2 = (1 - cos(2y)) / 2, same values as `mx.sin(y) ** 2` to ~1e-6 for |y| < 1e3."""
    return 0.5 - 0.5 * cos_reduced(2.0 * y)
