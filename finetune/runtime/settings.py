"""Whether the Linux-CPU fast paths are wanted, read from the environment once."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

FAST_CPU_ENV = "VOICEFOUNDRY_FAST_CPU"
BLAS_PATH_ENV = "VOICEFOUNDRY_BLAS"
DECODE_GEMM_ENV = "VOICEFOUNDRY_DECODE_GEMM"
CACHE_ENV = "VOICEFOUNDRY_MLX_CACHE_MIB"
# MLX's CPU backend keeps 32 MiB of freed buffers for reuse; every larger buffer comes back as
# fresh pages the kernel must zero (the real 0.6B vocoder's pass frees ~470 MiB).
DEFAULT_CACHE_MIB = 1024

_FALSE = {"0", "false", "no", "off"}


def on_unless_turned_off(name: str) -> bool:
    """A switch that is on by default: off only where the environment sets `name` to 0, false,
    no or off (any case)."""
    return os.environ.get(name, "").strip().lower() not in _FALSE


@dataclass(frozen=True)
class RuntimeSettings:
    """`fast_cpu` None means auto: on where it helps (Linux, no GPU backend in use)."""

    fast_cpu: bool | None
    blas_path: str | None
    decode_gemm: str = "auto"
    cache_mib: int = DEFAULT_CACHE_MIB

    @classmethod
    def from_env(cls) -> RuntimeSettings:
        raw = os.environ.get(FAST_CPU_ENV, "").strip().lower()
        fast = None if raw in ("", "auto") else raw not in _FALSE
        decode = os.environ.get(DECODE_GEMM_ENV, "").strip().lower() or "auto"
        return cls(
            fast_cpu=fast,
            blas_path=os.environ.get(BLAS_PATH_ENV) or None,
            decode_gemm="off" if decode in _FALSE else decode,
            cache_mib=_mib(os.environ.get(CACHE_ENV, "")),
        )

    def wants_fast_cpu(self) -> bool:
        if self.fast_cpu is not None:
            return self.fast_cpu
        return sys.platform.startswith("linux")


def _mib(raw: str) -> int:
    raw = raw.strip()
    if not raw:
        return DEFAULT_CACHE_MIB
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be a whole number of MiB, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{CACHE_ENV} must be 0 or more, not {value}")
    return value
