"""Quantised Linear layers on MLX's CPU backend: the quantised matmul only where it wins.

On the CPU backend of mlx 0.32.4 (mlx-audio 0.6.2) `mx.quantized_matmul` runs on one thread and
is compute bound (about 1.5 G multiply-adds a second on this 2-core x86-64, 4- and 8-bit alike),
and its cost grows with the rows almost linearly; an fp32 product goes to the optimised BLAS
(finetune/runtime/blas.py) on every core, bound by memory reads, and extra rows are nearly free.
Measured per (bits, output, input, rows) for the 0.6B decode shapes by
`tests/bench/bench_foundation.py --shapes`, interleaved in one run on a loaded machine: from two
rows up (a batched decode step, the code predictor's first step, any prefill) BLAS wins by up
to 7x (at two rows 0.9-2x: near ties);
for one row the quantised kernel was as fast or faster (4-bit 0.44-0.74x of the fp32 time,
8-bit 0.51-1.04x) and reads 4-8x fewer bytes, so one-row calls keep it. MLX's CPU bf16 matmul
beat fp32 at one row for some shapes but never the quantised kernel, and lost or tied from two
rows; fp16 was 2-4x slower than fp32 throughout: no half-precision copy is kept.

Off by default, on with `VOICEFOUNDRY_CPU_DENSE_QUANTIZED=1`: the copy quadruples a quantised
model's resident memory (the reason to quantise on a small machine), and a batched step then
takes another summation order than a row alone, so a quantised row in a batch is no longer
bit-exact to it alone (equal greedy codes here, within float rounding). Turned on, each
quantised layer of a measured shape on the CPU backend gets a dequantised fp32 copy of
its weight and uses it for every call with more rows than `quant_max_rows` (the table below);
other shapes use the copy always. The packed weight, scales and biases stay the layer's
parameters, unchanged, so training (QLoRA), baking, fusing, saving and the weights' identity see
the same QuantizedLinear as before; the copy is a private attribute (`_dense`: no parameter,
never saved; a later in-place update of the packed weight would leave it stale, and nothing
does that to a loaded model). Memory: 4 bytes a weight on top of the packed 0.625 (4-bit) or
1.125 (8-bit; scales and biases are fp32 after the CPU cast), 2.1 GiB for the 0.6B: a quantised
checkpoint costs more resident memory than its fp32 twin on this backend; what it saves is
disk, download and the bytes a one-row step reads.

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
# `quantized_matmul`: the 0.6B talker's and code predictor's decode shapes, measured.
_MEASURED = ((2048, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (1024, 3072))
QUANT_MAX_ROWS: dict[tuple[int, int, int], int] = {
    (bits, out_dims, in_dims): 1 for bits in (4, 8) for out_dims, in_dims in _MEASURED
}


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
    """Whether the fp32 copies are asked for (see the module docstring: off by default)."""
    return os.environ.get(DENSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
