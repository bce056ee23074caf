"""Products with a weight as stored on MLX's CPU backend: packed 4/8-bit, or bf16.

`matmul(x, layer)` is `x @ dequantise(layer.weight).T` for an affine 4- or 8-bit QuantizedLinear,
`bf16_matmul(x, weight)` is `x @ weight.T` for a bf16 weight: MLX graph nodes (primitives of the
C++ extension csrc/cpu_primitives.cpp) whose CPU work is the decode GEMM library's `vf_qgemm` /
`vf_bgemm` (csrc/decode_gemm.c: AVX2, the library's threads). The weight is never widened in
memory: 0.53 bytes a weight read for 4-bit, 1.03 for 8-bit (fp32 scales and biases), 2 for bf16,
against 4 for the fp32 copies the CPU path used before. Sums are taken in one order whatever the
batch, so a row of a batch equals the row alone bit for bit.

Available where the decode GEMM library is active (an x86-64 CPU with AVX2 and FMA, the fast CPU
paths on), a C++ compiler and nanobind are at hand (the extension is built once per source and
toolchain, like the C libraries: finetune/runtime/native.py), and the layer's layout is one the
kernel takes (`supports`). Anything else keeps the previous paths; `problem()` says why not.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from finetune.runtime.native import Lazy, Unavailable

import mlx.core as mx
import mlx.nn as nn

# Values a 32-byte load of the packed weight holds: a group must be whole loads.
_CHUNK = {4: 64, 8: 32}


def _bound() -> ModuleType:
    from finetune.runtime import blas, primitives

    addresses = blas.stored_weight_kernels()
    if addresses is None:
        raise Unavailable("the decode GEMM library is not active (see blas_decode_gemm)")
    module = primitives.load()
    if module is None:
        raise Unavailable(str(primitives.problem()))
    module.bind(*addresses)
    return module


# Models may load on several threads: one bind.
_BOUND = Lazy(_bound, (AttributeError, TypeError))


def load() -> ModuleType | None:
    """The extension with its products bound to the kernels, built on first use; None (and
    `problem()` says why) where it is not available. Never raises: a model then serves through
    the other paths."""
    return _BOUND.load()


def problem() -> str | None:
    return _BOUND.problem


def describe() -> str:
    """One line for the doctor: what packed products run on, or why they do not."""
    module = load()
    if module is None:
        return f"off ({_BOUND.problem})"
    return f"on: 4- and 8-bit affine and bf16, AVX2 ({module.__file__})"


def supports(layer: nn.QuantizedLinear) -> bool:
    """Whether the kernel takes this layer's layout: affine, 4 or 8 bits, groups of whole loads,
    fp32 scales and biases (the CPU path's cast)."""
    biases: Any = layer.get("biases")
    return (
        getattr(layer, "mode", "affine") == "affine"
        and layer.bits in _CHUNK
        and layer.group_size % _CHUNK[layer.bits] == 0
        and layer["scales"].dtype == mx.float32
        and biases is not None
        and biases.dtype == mx.float32
    )


def rows(x: mx.array) -> int:
    """The rows of a product with `x`: every axis but the last."""
    count = 1
    for dim in x.shape[:-1]:
        count *= int(dim)
    return count


def matmul(x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
    """x @ dequantise(weight).T (no bias added); call only where `load()` and `supports(layer)`."""
    module = _BOUND.value
    assert module is not None, "packed.matmul before packed.load()"
    return module.matmul(
        x, layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits
    )


def bf16_matmul(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T for a bf16 weight [output, input], in fp32; call only where `load()`."""
    module = _BOUND.value
    assert module is not None, "packed.bf16_matmul before packed.load()"
    return module.bf16_matmul(x, weight)
