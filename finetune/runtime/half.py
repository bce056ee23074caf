"""A bf16 checkpoint's Linear layers kept in bf16 on MLX's CPU backend, for serving.

On this backend every floating weight is cast to fp32 (only fp32 matmuls reach the decode GEMM /
BLAS; MLX's CPU bf16 matmul is slower), so a bf16 checkpoint decodes reading 4 bytes a weight.
Kept in bf16, a layer's products of up to as many rows as the fp32 few-row kernel takes (64 on
AVX2, 16 on AVX-512) go to our kernel (`packed.bf16_matmul`: that kernel's ISA and blocks, the
weight widened exactly in registers), reading 2; a larger product (a long prompt's prefill)
casts the weight to fp32 for the call, as the fp32 path would multiply it. So the values are the
fp32 path's bit for bit: the widening of a bf16 value to fp32 is exact and the sums are taken in
the same order (tests/test_half_linear.py). A kept weight is never copied to fp32, not even at
load (`runtime.prepare_model` keeps the layers before its cast, which passes them by).

Serving only (the family loaders' `serving=True`): training keeps fp32 parameters, whose
optimiser updates would lose precision in bf16. On by default where the kernel is available;
`VOICEFOUNDRY_CPU_KEEP_BF16=0` turns it off (fp32 in memory, as before). On Metal and CUDA none of
this runs (Qwen3-TTS keeps its stored dtype there; the CSM and PersonaPlex loaders cast to fp32).
"""

from __future__ import annotations

from collections import Counter

from finetune.runtime import packed
from finetune.runtime.settings import on_unless_turned_off

import mlx.core as mx
import mlx.nn as nn

KEEP_BF16_ENV = "VOICEFOUNDRY_CPU_KEEP_BF16"


class CpuBf16Linear(nn.Linear):
    """A Linear whose weight stays bf16: our kernel up to `_half_max_rows` rows (where the fp32
    path would take the few-row kernel), the weight cast to fp32 for larger products."""

    _half_max_rows: int = 0

    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"]
        if packed.rows(x) <= self._half_max_rows:
            y = packed.bf16_matmul(x, weight)
        else:
            y = mx.matmul(x.astype(mx.float32), weight.astype(mx.float32).T)
        if "bias" in self:
            y = y + self["bias"]
        return y


def keep_bf16_wanted() -> bool:
    return on_unless_turned_off(KEEP_BF16_ENV)


def bf16_linears(module: nn.Module) -> list[nn.Linear]:
    """The plain Linear layers of `module` whose weight is bf16 now: call before the fp32 cast."""
    return [
        layer
        for _, layer in module.named_modules()
        if type(layer) is nn.Linear and layer["weight"].dtype == mx.bfloat16
    ]


def keep_bf16(layers: list[nn.Linear]) -> Counter[str]:
    """Re-class each layer (from `bf16_linears`: its weight is bf16) to keep that weight, where
    the kernel is available and wanted; returns how many it re-classed. Called before the fp32
    cast, which then passes them by (`accelerate.to_float32`)."""
    from finetune.runtime import blas
    from finetune.runtime.accelerate import is_cpu_backend

    done: Counter[str] = Counter()
    if not layers or not keep_bf16_wanted() or not is_cpu_backend() or packed.load() is None:
        return done
    most = blas.few_rows_max()
    for layer in layers:
        layer.__class__ = CpuBf16Linear
        layer._half_max_rows = most
        done[CpuBf16Linear.__name__] += 1
    return done
