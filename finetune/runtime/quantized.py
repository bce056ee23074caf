"""Quantised Linear layers on MLX's CPU backend: the quantised matmul only where it wins.

On the CPU backend of mlx 0.32.4 (mlx-audio 0.6.2) `mx.quantized_matmul` runs on one thread and
is compute bound, its cost growing with the rows almost linearly; an fp32 product goes to the
decode GEMM (finetune/runtime/csrc/decode_gemm.c: up to 64 rows in one pass over the weight, 16
on AVX-512, on every core) or the optimised BLAS, bound by memory reads. Measured per (bits,
output, input, rows) for the 0.6B decode shapes by `tests/bench/bench_foundation.py --shapes`,
interleaved in one run: fp32 is faster at every row count, one row included (the quantised
kernel took 4.2-5.6x the fp32 time at one row, 13-25x at 4-8 rows), so no decode shape keeps
`quantized_matmul` (`QUANT_MAX_ROWS` is empty; before the decode GEMM one-row calls kept it).
MLX's CPU bf16 and fp16 matmuls lose to fp32 throughout: no half-precision copy is kept.

On by default (`VOICEFOUNDRY_CPU_DENSE_QUANTIZED=0` turns it off): each quantised layer on the
CPU backend gets a dequantised fp32 copy of its weight and uses it for every call with more rows
than `quant_max_rows`. The cost is memory: 4 bytes a weight on top of the packed 0.625 (4-bit) or
1.125 (8-bit; scales and biases are fp32 after the CPU cast), 2.1 GiB for the 0.6B, so a
quantised checkpoint takes about its fp32 twin's resident memory on this backend and saves disk
and download; turned off, it keeps its small memory and decodes ~3.9x slower a frame (the
real-0.6B per-format table of bench_foundation.py --real). The packed weight, scales and biases
stay the layer's parameters, unchanged, so training (QLoRA), baking, fusing, saving and the
weights' identity see the same QuantizedLinear as before; the copy is a private attribute
(`_dense`: no parameter, never saved; a later in-place update of the packed weight would leave
it stale, and nothing does that to a loaded model).

The copy holds exactly the values `quantized_matmul` multiplies by (`mx.dequantize` of the same
packed weight with the same fp32 scales): the paths differ only in the order of float sums
(tests/test_quantized_decode.py: same greedy codes). Metal and CUDA keep MLX's quantised
kernels: `install_cpu_quantized` does nothing off the CPU backend.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# (bits, output dims, input dims) -> the most rows a call may have and still take
# `quantized_matmul`. Measured for the 0.6B talker's and code predictor's decode shapes: none
# (fp32 wins at every row count); shapes not listed never take it either.
QUANT_MAX_ROWS: dict[tuple[int, int, int], int] = {}


def quant_max_rows(bits: int, output_dims: int, input_dims: int) -> int:
    return QUANT_MAX_ROWS.get((bits, output_dims, input_dims), 0)


def _rows(x: mx.array) -> int:
    rows = 1
    for dim in x.shape[:-1]:
        rows *= int(dim)
    return rows


class CpuQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its fp32 copy above `_quant_max_rows` rows."""

    _quant_max_rows: int = 0

    def __call__(self, x: mx.array) -> mx.array:
        dense = self.get("_dense")
        if dense is None or _rows(x) <= self._quant_max_rows:
            return super().__call__(x)
        y = mx.matmul(x, dense.T)
        if "bias" in self:
            y = y + self["bias"]
        return y


def dequantised_weight(layer: nn.QuantizedLinear) -> mx.array:
    return mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        dtype=mx.float32,
    )


DENSE_ENV = "VOICEFOUNDRY_CPU_DENSE_QUANTIZED"


def dense_copies_wanted() -> bool:
    """Whether the fp32 copies are wanted (see the module docstring: on unless turned off)."""
    return os.environ.get(DENSE_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def install_cpu_quantized(model: nn.Module) -> Counter[str]:
    """Give every fp32-scaled QuantizedLinear of `model` its fp32 copy where the table says BLAS
    wins; returns how many layers it re-classed. Call after the model is cast to fp32."""
    from finetune.runtime.accelerate import is_cpu_backend

    installed: Counter[str] = Counter()
    if not is_cpu_backend():
        return installed
    for _, layer in model.named_modules():
        if type(layer) is not nn.QuantizedLinear or layer["scales"].dtype != mx.float32:
            continue
        dense = dequantised_weight(layer)
        output_dims, input_dims = dense.shape
        limit = quant_max_rows(layer.bits, output_dims, input_dims)
        layer.__class__ = CpuQuantizedLinear
        layer._quant_max_rows = limit
        layer["_dense"] = dense
        mx.eval(dense)
        installed[CpuQuantizedLinear.__name__] += 1
    return installed


def dense_bytes(model: nn.Module) -> int:
    """Bytes held by the fp32 copies (the memory this costs)."""
    total = 0
    for _, layer in model.named_modules():
        dense: Any = layer.get("_dense") if isinstance(layer, CpuQuantizedLinear) else None
        if dense is not None:
            total += int(dense.nbytes)
    return total
