"""Whether the Linux-CPU fast paths are wanted, read from the environment once."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

FAST_CPU_ENV = "VOICEFOUNDRY_FAST_CPU"
BLAS_PATH_ENV = "VOICEFOUNDRY_BLAS"
DECODE_GEMM_ENV = "VOICEFOUNDRY_DECODE_GEMM"

_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class RuntimeSettings:
    """`fast_cpu` None means auto: on where it helps (Linux, no GPU backend in use)."""

    fast_cpu: bool | None
    blas_path: str | None
    decode_gemm: str = "auto"

    @classmethod
    def from_env(cls) -> RuntimeSettings:
        raw = os.environ.get(FAST_CPU_ENV, "").strip().lower()
        fast = None if raw in ("", "auto") else raw not in _FALSE
        decode = os.environ.get(DECODE_GEMM_ENV, "").strip().lower() or "auto"
        return cls(
            fast_cpu=fast,
            blas_path=os.environ.get(BLAS_PATH_ENV) or None,
            decode_gemm="off" if decode in _FALSE else decode,
        )

    def wants_fast_cpu(self) -> bool:
        if self.fast_cpu is not None:
            return self.fast_cpu
        return sys.platform.startswith("linux")
