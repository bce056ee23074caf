"""MLX runtime set-up: the optimised BLAS, the fast conv paths, fp32 on CPU.

`early_preload()` must run before `mlx.core` is first imported; `finetune/__init__.py` calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from finetune.runtime import blas
from finetune.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    import mlx.nn as nn


def settings() -> RuntimeSettings:
    return RuntimeSettings.from_env()


def early_preload() -> None:
    current = settings()
    if current.wants_fast_cpu():
        blas.preload(current.blas_path, current.decode_gemm)


def fast_cpu_active() -> bool:
    """True where the CPU fast paths apply: wanted by the settings and MLX runs on its CPU."""
    from finetune.runtime.accelerate import is_cpu_backend

    return settings().wants_fast_cpu() and is_cpu_backend()


@dataclass
class PreparedModel:
    fast_cpu: bool
    swapped: dict[str, int] = field(default_factory=dict)


def prepare_model(
    model: nn.Module, *, bf16_layers: Sequence[nn.Linear] = (), fp32_everywhere: bool = False
) -> PreparedModel:
    """Apply the CPU fast paths to a freshly loaded model, when they are on: every floating
    weight cast to fp32, the fast modules, quantised layers on the packed product
    (runtime/quantized.py), and `bf16_layers` (serving only: `half.bf16_linears` of the
    frame-by-frame decode path) kept in bf16 (runtime/half.py), never copied to fp32.
    `fp32_everywhere`: cast to fp32 where the fast paths are off too (Metal, CUDA, turned off),
    for families whose lower-precision numerics are only checked on the CPU path."""
    from finetune.runtime.accelerate import to_float32

    import mlx.core as mx

    if not fast_cpu_active():
        if fp32_everywhere:
            to_float32(model)
            mx.eval(model.parameters())
        return PreparedModel(fast_cpu=False)
    from finetune.runtime import fused
    from finetune.runtime.accelerate import install_fast_modules
    from finetune.runtime.half import keep_bf16
    from finetune.runtime.quantized import install_cpu_quantized

    kept = keep_bf16(list(bf16_layers))  # before the cast, which passes their weights by
    to_float32(model)
    mx.eval(model.parameters())  # the stored-dtype arrays go now, not at the first forward
    keep_freed_buffers(settings().cache_mib)
    swapped = install_fast_modules(model)
    fused.prepare()  # the norms' primitive is built now, not in the first request
    swapped.update(install_cpu_quantized(model))  # after the cast: the fp32 scales
    swapped.update(kept)
    return PreparedModel(fast_cpu=True, swapped=dict(swapped))


def keep_freed_buffers(mib: int) -> None:
    """Let MLX keep up to `mib` MiB of freed buffers for reuse (never lowers a larger limit).
    On its CPU backend MLX keeps 32 MiB, so a vocoder pass's big activations came back as fresh
    pages every pass, zeroed by the kernel: ~12 % of the real 0.6B vocoder's time."""
    import mlx.core as mx

    wanted = mib * 2**20
    current = mx.set_cache_limit(wanted)
    if current > wanted:
        mx.set_cache_limit(current)
