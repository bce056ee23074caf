"""1-D convolutions as sums of per-tap matmuls.

MLX's CPU kernels for dilated `conv1d` and for `conv_transpose1d` do not use GEMM and are one to
two orders of magnitude slower than the same maths written as K matmuls (one per kernel tap),
which go through BLAS. Layouts follow MLX: x is [N, L, C_in], weight is [C_out, K, C_in / groups].
"""

from __future__ import annotations

import mlx.core as mx


def conv1d_taps(
    x: mx.array,
    weight: mx.array,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> mx.array:
    """Same result as `mx.conv1d(x, weight, stride, padding, dilation)` for groups == 1."""
    c_out, k, _ = weight.shape
    if padding:
        x = mx.pad(x, [(0, 0), (padding, padding), (0, 0)])
    length = x.shape[1]
    span = dilation * (k - 1) + 1
    out_len = (length - span) // stride + 1
    if out_len <= 0:
        return mx.zeros((x.shape[0], 0, c_out), dtype=x.dtype)
    last = (out_len - 1) * stride + 1
    w_t = weight.transpose(1, 2, 0)  # [K, C_in, C_out]
    out = None
    for tap in range(k):
        start = tap * dilation
        term = x[:, start : start + last : stride, :] @ w_t[tap]
        out = term if out is None else out + term
    assert out is not None  # k >= 1 taps
    return out


def conv_transpose1d_taps(
    x: mx.array,
    weight: mx.array,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    output_padding: int = 0,
) -> mx.array:
    """Same result as `mx.conv_transpose1d(x, weight, stride, padding, dilation, output_padding)`.

    Input step i, tap k lands on output position i * stride + k * dilation. Taps are grouped by
    the residue of k * dilation modulo stride, so every group is one matmul, a shift and an add
    on a [N, L', stride, C_out] view of the output: no scatter, no zero-stuffed input.
    """
    n, length, _ = x.shape
    c_out, k, _ = weight.shape
    full_len = (length - 1) * stride + dilation * (k - 1) + 1
    rows = -(-full_len // stride)  # ceil
    per_tap = x @ weight.transpose(2, 1, 0).reshape(weight.shape[2], k * c_out)
    per_tap = per_tap.reshape(n, length, k, c_out)

    phases: list[mx.array] = []
    for residue in range(stride):
        acc = None
        for tap in range(k):
            offset = tap * dilation
            if offset % stride != residue:
                continue
            shift = offset // stride
            term = mx.pad(per_tap[:, :, tap, :], [(0, 0), (shift, rows - length - shift), (0, 0)])
            acc = term if acc is None else acc + term
        phases.append(acc if acc is not None else mx.zeros((n, rows, c_out), dtype=per_tap.dtype))
    full = mx.stack(phases, axis=2).reshape(n, rows * stride, c_out)[:, :full_len, :]

    if output_padding:
        full = mx.pad(full, [(0, 0), (0, output_padding), (0, 0)])
    end = full.shape[1] - padding
    return full[:, padding:end, :]
