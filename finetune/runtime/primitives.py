"""The C++ extension of MLX primitives for the CPU backend (csrc/cpu_primitives.cpp): products
with a weight as stored (bound to the decode GEMM library's kernels by `packed`), the RMS norm
(`fused.rms_norm`) and the MLPs' SwiGLU (`fused.swiglu`).

Built once per source and toolchain like the C libraries (finetune/runtime/native.py), where a
C++ compiler and nanobind are at hand; `load()` returns None and `problem()` says why where it
cannot be, and every caller then keeps MLX's own ops.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

from finetune.runtime.native import Lazy, NativeBuildError, mlx_extension

EXTENSION = "cpu_primitives"


def _import() -> ModuleType:
    path = mlx_extension(EXTENSION)
    spec = importlib.util.spec_from_file_location(EXTENSION, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Models may load on several threads: one build, one import.
_EXTENSION = Lazy(_import, (NativeBuildError, ImportError, OSError))


def load() -> ModuleType | None:
    """The imported extension, built on first use; None where it is not available. Never
    raises."""
    return _EXTENSION.load()


def problem() -> str | None:
    return _EXTENSION.problem
