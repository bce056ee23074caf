"""Every CPU fast path gives MLX's own result."""

from __future__ import annotations

import itertools

from finetune.runtime.accelerate import (
    FastConv1d,
    FastConvTranspose1d,
    conv1d_plan,
    install_fast_modules,
    swap_table,
)
from finetune.runtime.conv import conv1d_im2col, conv1d_taps, conv_transpose1d_taps
from finetune.runtime.elementwise import sin_squared

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

ATOL = 1e-4


def _max_diff(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(mx.abs(a - b).max().item()) if a.size else 0.0


@pytest.mark.parametrize(
    ("length", "kernel", "stride", "padding", "dilation"),
    [
        (n, k, s, p, d)
        for n, k, s, p, d in itertools.product((9, 40), (1, 3, 7), (1, 2, 3), (0, 3), (1, 2, 9))
        if n + 2 * p >= d * (k - 1) + 1
    ],
)
@pytest.mark.parametrize("form", [conv1d_taps, conv1d_im2col])
def test_conv1d_gemm_forms_match_mlx(form, length, kernel, stride, padding, dilation):
    mx.random.seed(length * 1000 + kernel * 100 + stride * 10 + dilation)
    x = mx.random.normal((2, length, 12))
    w = mx.random.normal((5, kernel, 12))
    bias = mx.random.normal((5,))
    ref = mx.conv1d(x, w, stride, padding, dilation)
    assert _max_diff(form(x, w, stride, padding, dilation), ref) < ATOL
    assert _max_diff(form(x, w, stride, padding, dilation, bias), ref + bias) < ATOL


@pytest.mark.parametrize(
    ("length", "kernel", "stride", "padding", "dilation", "output_padding"),
    [
        c
        for c in itertools.product(
            (1, 7, 30), (1, 2, 4, 7, 16), (1, 2, 5, 8), (0, 1, 3), (1, 2), (0, 1)
        )
        if c[3] <= c[4] * (c[1] - 1)
        and c[5] < max(c[2], c[4])
        # MLX refuses inputs shorter than the kernel after its internal padding
        and (c[0] - 1) * c[2] + 1 + 2 * (c[4] * (c[1] - 1) - c[3]) >= c[4] * (c[1] - 1) + 1
    ],
)
def test_conv_transpose1d_taps_matches_mlx(
    length, kernel, stride, padding, dilation, output_padding
):
    mx.random.seed(7)
    x = mx.random.normal((2, length, 6))
    w = mx.random.normal((4, kernel, 6))
    ref = mx.conv_transpose1d(x, w, stride, padding, dilation, output_padding)
    out = conv_transpose1d_taps(x, w, stride, padding, dilation, output_padding)
    assert _max_diff(out, ref) < ATOL


def test_sin_squared_matches_mlx_over_a_wide_range():
    y = mx.array(np.linspace(-300.0, 300.0, 200_001, dtype=np.float32))
    assert _max_diff(sin_squared(y), mx.sin(y) ** 2) < 5e-5


def test_fast_modules_match_the_modules_they_replace():
    mx.random.seed(3)
    x = mx.random.normal((1, 50, 16))
    modules = [
        nn.Conv1d(16, 8, kernel_size=7, dilation=3, padding=9),
        nn.Conv1d(16, 8, kernel_size=1),
        nn.ConvTranspose1d(16, 8, kernel_size=10, stride=5),
        nn.ConvTranspose1d(16, 8, kernel_size=4, stride=2, padding=1),
    ]
    for module in modules:
        ref = module(x)
        tree = nn.Sequential(module)
        swapped = install_fast_modules(tree)
        assert sum(swapped.values()) == 1
        assert isinstance(module, (FastConv1d, FastConvTranspose1d))
        assert _max_diff(module(x), ref) < ATOL


def test_mimi_conv_modules_match():
    from mlx_audio.codec.models.mimi.modules.conv import Conv1d, ConvTranspose1d

    mx.random.seed(4)
    x = mx.random.normal((2, 16, 40))  # Mimi convs take NCL
    for module in (Conv1d(16, 8, 3, dilation=2), ConvTranspose1d(16, 8, 8, stride=4)):
        ref = module(x)
        install_fast_modules(nn.Sequential(module))
        assert type(module) in swap_table().values()
        assert _max_diff(module(x), ref) < ATOL


def test_fast_vocoder_matches_stock_vocoder(loaded_qwen3_base):
    """The whole tiny vocoder with every module swapped back to mlx-audio's own classes."""
    decoder = loaded_qwen3_base.model.speech_tokenizer.decoder
    codes = mx.array(np.random.default_rng(0).integers(1, 2048, (1, 16, 6)))
    fast = decoder(codes)
    fast_classes = set(swap_table().values())
    restored = []
    for _, module in decoder.named_modules():
        if type(module) in fast_classes:
            restored.append((module, type(module)))
            module.__class__ = type(module).__mro__[1]
    assert restored, "the loaded tiny model runs no fast module"
    try:
        stock = decoder(codes)
    finally:
        for module, cls in restored:
            module.__class__ = cls
    assert _max_diff(fast, stock) < 1e-3


@pytest.mark.parametrize(
    ("shape", "plan"),
    [
        # (kernel, groups, c_in, c_out, out_len)
        ((1, 1, 1024, 1024, 25), "taps"),  # kernel 1 is one matmul either way
        ((7, 1, 64, 1, 24_000), "taps"),  # narrow output over a long input
        ((7, 1, 96, 96, 48_000), "taps"),  # modest channels, long input
        ((7, 1, 768, 768, 3_000), "im2col"),  # wide channels: each tap's GEMM too short
        ((7, 1, 1536, 1536, 50), "im2col"),
        ((8, 1, 64, 128, 239), "im2col"),  # a streaming codec step: short input
        ((7, 1, 1, 64, 24_000), "im2col"),  # one input channel: taps would be K = 1 GEMMs
        ((7, 2, 64, 64, 100), "mlx"),  # grouped: MLX's op
    ],
)
def test_conv_form_is_chosen_by_shape(shape, plan):
    kernel, groups, c_in, c_out, out_len = shape
    chosen = conv1d_plan(kernel=kernel, groups=groups, c_in=c_in, c_out=c_out, out_len=out_len)
    assert chosen == plan


@pytest.mark.parametrize(
    ("c_in", "c_out", "length", "dilation", "groups"),
    [(320, 320, 30, 1, 1), (16, 16, 300, 3, 1), (12, 4, 50, 1, 1), (16, 16, 40, 1, 2)],
)
def test_fast_module_matches_mlx_on_every_plan(c_in, c_out, length, dilation, groups):
    mx.random.seed(5)
    module = nn.Conv1d(c_in, c_out, kernel_size=7, padding=3, dilation=dilation, groups=groups)
    x = mx.random.normal((2, length, c_in))
    ref = module(x)
    install_fast_modules(nn.Sequential(module))
    assert isinstance(module, FastConv1d)
    assert _max_diff(module(x), ref) < ATOL


def test_the_snake_runs_on_the_host_and_matches_mlx_also_under_grad():
    from finetune.runtime.accelerate import _square_snake

    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((2, 300, 16)).astype(np.float32) * 4)
    alpha = mx.array(rng.standard_normal(16).astype(np.float32) * 0.3)
    beta = mx.array(rng.standard_normal(16).astype(np.float32) * 0.3)

    def snake(v: mx.array) -> mx.array:
        return v + (1.0 / (mx.exp(beta) + 1e-9)) * mx.sin(v * mx.exp(alpha)) ** 2

    assert _max_diff(_square_snake(x, alpha, beta, 1e-9), snake(x)) < 1e-5
    grad = mx.grad(lambda v: _square_snake(v, alpha, beta, 1e-9).sum())(x)
    assert _max_diff(grad, mx.grad(lambda v: snake(v).sum())(x)) < 1e-4


def test_install_lays_weights_out_for_the_gemm_without_changing_them():
    from finetune.runtime.accelerate import _stored_as

    mx.random.seed(9)
    conv = nn.Conv1d(16, 24, kernel_size=5, padding=2)
    up = nn.ConvTranspose1d(16, 8, kernel_size=4, stride=2)
    # As a checkpoint loader leaves them: PyTorch's [C_out, C_in, K] transposed lazily.
    conv.weight = mx.random.normal((24, 16, 5)).transpose(0, 2, 1)
    up.weight = mx.random.normal((8, 16, 4)).transpose(0, 2, 1)
    x = mx.random.normal((2, 40, 16))
    before = {"conv": conv.weight, "up": up.weight}
    refs = conv(x), up(x)
    install_fast_modules(nn.Sequential(conv, up))
    for name, module in (("conv", conv), ("up", up)):
        assert module.weight.shape == before[name].shape
        assert mx.array_equal(module.weight, before[name])
    assert _max_diff(conv(x), refs[0]) < ATOL
    assert _max_diff(up(x), refs[1]) < ATOL
    w = mx.arange(24).reshape(2, 3, 4)
    for order in ((1, 2, 0), (2, 1, 0), (0, 1, 2)):
        stored = _stored_as(w, order)
        assert stored.shape == w.shape and mx.array_equal(stored, w)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (8, 1, 16, 128), (3, 37, 64), (5,)])
def test_fused_rms_norm_is_mx_fast_rms_norm_bit_for_bit(shape, dtype):
    from finetune.runtime import fused
    from finetune.runtime.accelerate import FastRMSNorm

    mx.random.seed(len(shape))
    x = (mx.random.normal(shape) * 3).astype(dtype)
    norm = nn.RMSNorm(shape[-1], eps=1e-6)
    norm.weight = mx.random.normal((shape[-1],)).astype(dtype)
    expected = mx.fast.rms_norm(x, norm.weight, 1e-6)
    assert mx.array_equal(fused.rms_norm(x, norm.weight, 1e-6), expected)
    install_fast_modules(nn.Sequential(norm))
    assert isinstance(norm, FastRMSNorm)
    got = norm(x)
    assert got.dtype == expected.dtype and mx.array_equal(got, expected)
    if dtype == mx.float32:
        grad = mx.grad(lambda v: (fused.rms_norm(v, norm.weight, 1e-6) ** 2).sum())(x)
        want = mx.grad(lambda v: (mx.fast.rms_norm(v, norm.weight, 1e-6) ** 2).sum())(x)
        assert _max_diff(grad, want) < 1e-4
