"""1-D convolutions as GEMMs.

MLX's CPU kernels for dilated `conv1d` and for `conv_transpose1d` do not use GEMM and are one to
three orders of magnitude slower than the same maths written as matmuls, which go through BLAS.
Two ways: K matmuls, one per kernel tap, each accumulated into the last by `addmm` (BLAS's
beta = 1, no separate add over the output), for long inputs; or the K shifted inputs side by side
(im2col) and one matmul with K * C_in inner products, for short ones. Layouts follow MLX: x is
[N, L, C_in], weight is [C_out, K, C_in / groups].
"""

from __future__ import annotations

import mlx.core as mx


def tap_inputs(
    x: mx.array, k: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> list[mx.array]:
    """What each of a K-tap kernel's taps multiplies: x [N, L, C_in], padded, sliced at the
    tap's offset with the stride, [N, L', C_in] each; none when the output would be empty."""
    if padding:
        x = mx.pad(x, [(0, 0), (padding, padding), (0, 0)])
    span = dilation * (k - 1) + 1
    out_len = (x.shape[1] - span) // stride + 1
    if out_len <= 0:
        return []
    last = (out_len - 1) * stride + 1
    return [x[:, t * dilation : t * dilation + last : stride, :] for t in range(k)]


def im2col(taps: list[mx.array]) -> mx.array:
    """The taps' inputs side by side, [N, L', K * C_in] (tap-major, as `[C_out, K, C_in]`
    weights flatten)."""
    return taps[0] if len(taps) == 1 else mx.concatenate(taps, axis=-1)


def conv1d_taps(
    x: mx.array,
    weight: mx.array,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: mx.array | None = None,
) -> mx.array:
    """Same result as `mx.conv1d(x, weight, stride, padding, dilation) + bias`, groups == 1."""
    c_out, k, _ = weight.shape
    taps = tap_inputs(x, k, stride, padding, dilation)
    if not taps:
        return mx.zeros((x.shape[0], 0, c_out), dtype=x.dtype)
    w_t = weight.transpose(1, 2, 0)  # [K, C_in, C_out]
    out = taps[0] @ w_t[0] if bias is None else mx.addmm(bias, taps[0], w_t[0])
    for tap in range(1, k):
        out = mx.addmm(out, taps[tap], w_t[tap])
    return out


def conv1d_im2col(
    x: mx.array,
    weight: mx.array,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    bias: mx.array | None = None,
) -> mx.array:
    """Same result as `mx.conv1d(x, weight, stride, padding, dilation) + bias`, groups == 1."""
    c_out, k, c_in = weight.shape
    taps = tap_inputs(x, k, stride, padding, dilation)
    if not taps:
        return mx.zeros((x.shape[0], 0, c_out), dtype=x.dtype)
    w_flat = weight.transpose(1, 2, 0).reshape(k * c_in, c_out)
    columns = im2col(taps)
    return columns @ w_flat if bias is None else mx.addmm(bias, columns, w_flat)


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
    on a [N, L', stride, C_out] view of the output: no scatter, no zero-stuffed input. The
    usual upsampler (kernel a multiple of the stride) needs no phases at all.
    """
    n, length, _ = x.shape
    c_out, k, _ = weight.shape
    per_tap = x @ transposed_weight(weight)
    full = overlap_add(per_tap.reshape(n, length, k, c_out), stride, dilation)
    if output_padding:
        full = mx.pad(full, [(0, 0), (0, output_padding), (0, 0)])
    end = full.shape[1] - padding
    return full[:, padding:end, :]


def transposed_weight(weight: mx.array) -> mx.array:
    """A transposed conv's weight [C_out, K, C_in] as one matmul's [C_in, K * C_out] (tap-major
    columns): x @ it gives every tap's product of every input step."""
    c_out, k, c_in = weight.shape
    return weight.transpose(2, 1, 0).reshape(c_in, k * c_out)


def overlap_add(per_tap: mx.array, stride: int, dilation: int = 1) -> mx.array:
    """The unpadded transposed conv [N, (L - 1) * stride + dilation * (K - 1) + 1, C_out] from
    each input step's per-tap products per_tap [N, L, K, C_out]."""
    n, length, k, c_out = per_tap.shape
    if dilation == 1 and k % stride == 0:
        return _whole_phases(per_tap.reshape(n, length, k // stride, stride * c_out), c_out)
    full_len = (length - 1) * stride + dilation * (k - 1) + 1
    return _phase_by_phase(per_tap, stride, dilation, full_len)


def _whole_phases(per_tap: mx.array, c_out: int) -> mx.array:
    """Kernel a multiple of the stride, undilated: taps q * stride + r, r < stride, land on
    output step (i + q) * stride + r, so the q-th group of taps of input step i fills output
    row i + q whole, and the output is a sum of `k / stride` shifted copies: no phases."""
    n, length, groups, width = per_tap.shape
    rows = length + groups - 1
    acc = None
    for q in range(groups):
        term = mx.pad(per_tap[:, :, q], [(0, 0), (q, rows - length - q), (0, 0)])
        acc = term if acc is None else acc + term
    assert acc is not None  # k >= stride
    return acc.reshape(n, rows * (width // c_out), c_out)


def _phase_by_phase(per_tap: mx.array, stride: int, dilation: int, full_len: int) -> mx.array:
    n, length, k, c_out = per_tap.shape
    rows = -(-full_len // stride)  # ceil
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
    return mx.stack(phases, axis=2).reshape(n, rows * stride, c_out)[:, :full_len, :]
