"""Whether the Linux-CPU fast paths are wanted, read from the environment once."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

FAST_CPU_ENV = "VOICEFOUNDRY_FAST_CPU"
BLAS_PATH_ENV = "VOICEFOUNDRY_BLAS"

_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class RuntimeSettings:
    """`fast_cpu` None means auto: on where it helps (Linux, no GPU backend in use)."""

    fast_cpu: bool | None
    blas_path: str | None

    @classmethod
    def from_env(cls) -> RuntimeSettings:
        raw = os.environ.get(FAST_CPU_ENV, "").strip().lower()
        fast = None if raw in ("", "auto") else raw not in _FALSE
        return cls(fast_cpu=fast, blas_path=os.environ.get(BLAS_PATH_ENV) or None)

    def wants_fast_cpu(self) -> bool:
        if self.fast_cpu is not None:
            return self.fast_cpu
        return sys.platform.startswith("linux")
