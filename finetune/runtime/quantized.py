"""Quantised Linear layers on MLX's CPU backend: the packed product or an fp32 copy, each where
it wins.

On the CPU backend of mlx 0.32.4 (mlx-audio 0.6.2) `mx.quantized_matmul` runs on one thread and
is compute bound: 4.2-5.6x the fp32 time at one row, 13-25x at 4-8 rows (the 0.6B decode shapes,
`tests/bench/bench_foundation.py --shapes`). Two faster paths replace it:

- the packed product (finetune/runtime/packed.py: our kernel reads the 4/8-bit weight as stored,
  on every core), for calls of up to `PACKED_MAX_ROWS` rows: decoding one or a few rows reads a
  quarter (8-bit) or an eighth (4-bit) of the fp32 bytes;
- a dequantised fp32 copy through the decode GEMM or the optimised BLAS for larger calls (a
  prompt's prefill, a big batch), where the packed kernel's widening of each value costs more
  than the bytes it saves.

The fp32 copies are on by default (`VOICEFOUNDRY_CPU_DENSE_QUANTIZED=0` turns them off): 4 bytes
a weight on top of the packed 0.53 (4-bit) or 1.03 (8-bit; scales and biases are fp32 after the
CPU cast), 2.1 GiB for the 0.6B. Turned off, a quantised checkpoint keeps its small memory and
runs every call through the packed product (or, where it is not available, MLX's kernel). The
packed weight, scales and biases stay the layer's parameters, unchanged, so training (QLoRA),
baking, fusing, saving and the weights' identity see the same QuantizedLinear as before; the copy
is a private attribute (`_dense`: no parameter, never saved; a later in-place update of the packed
weight would leave it stale, and nothing does that to a loaded model).

All three paths multiply by the same values (`mx.dequantize` of the packed weight with the same
fp32 scales): they differ only in the order of float sums (tests/test_quantized_decode.py: same
greedy codes). Metal and CUDA keep MLX's quantised kernels: `install_cpu_quantized` does nothing
off the CPU backend.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from finetune.runtime import packed
from finetune.runtime.settings import on_unless_turned_off

import mlx.core as mx
import mlx.nn as nn

# The most rows a call may have and still take the packed product while an fp32 copy exists.
# Measured by `tests/bench/bench_foundation.py --shapes` on the 0.6B's decode shapes (weights
# cycled past the caches, 2-core AVX2 EPYC): against the fp32 copy, 4-bit 0.41-0.87x of its time
# at 1-4 rows and 0.65-0.88x at 8, 8-bit 0.54-0.96x and 0.80-1.02x; more rows (a prefill) widen
# each value for too few rows' worth of reuse.
PACKED_MAX_ROWS = 8
UNLIMITED = 1 << 30


class CpuQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its packed weight through our kernel up to
    `_packed_max_rows` rows, by its fp32 copy above, and through MLX's kernel where neither is
    there."""

    _packed_max_rows: int = 0

    def __call__(self, x: mx.array) -> mx.array:
        dense = self.get("_dense")
        if packed.rows(x) <= self._packed_max_rows:
            y = packed.matmul(x, self)
        elif dense is not None:
            y = mx.matmul(x, dense.T)
        else:
            return super().__call__(x)
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
    return on_unless_turned_off(DENSE_ENV)


def install_cpu_quantized(model: nn.Module) -> Counter[str]:
    """Re-class every fp32-scaled QuantizedLinear of `model` to take the packed product where our
    kernel takes its layout and an fp32 copy where the setting wants one; returns how many layers
    it re-classed. Call after the model is cast to fp32."""
    from finetune.runtime.accelerate import is_cpu_backend

    installed: Counter[str] = Counter()
    if not is_cpu_backend():
        return installed
    dense_copies = dense_copies_wanted()
    kernel = packed.load() is not None
    for _, layer in model.named_modules():
        if type(layer) is not nn.QuantizedLinear or layer["scales"].dtype != mx.float32:
            continue
        takes_packed = kernel and packed.supports(layer)
        if not takes_packed and not dense_copies:
            continue
        layer.__class__ = CpuQuantizedLinear
        if takes_packed:
            layer._packed_max_rows = PACKED_MAX_ROWS if dense_copies else UNLIMITED
            installed[f"{CpuQuantizedLinear.__name__}.packed"] += 1
        if dense_copies:
            dense = dequantised_weight(layer)
            layer["_dense"] = dense
            mx.eval(dense)
            installed[f"{CpuQuantizedLinear.__name__}.dense"] += 1
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
