"""The ELU activation (alpha 1), x > 0 ? x : expm1(x), of float32 arrays on the host.

The compiled kernel (csrc/elu.c: expm1 in double, rounded once, vectorised, over threads) gives
float32's rounding of the exact value and is ~8x faster than numpy's `expm1`, which is scalar
libm code on CPUs without AVX-512 (~14 ns an element on the AVX2 machines here). numpy does it
wherever the kernel cannot be built; its values are within an ulp of the kernel's.
"""

from __future__ import annotations

import ctypes
from typing import Any

from finetune.runtime.native import Lazy, LazyLibrary, Unavailable

import numpy as np

_FLOATS = ctypes.POINTER(ctypes.c_float)


def _declare(lib: ctypes.CDLL) -> None:
    lib.vf_elu.restype = ctypes.c_int


KERNEL = LazyLibrary("elu", _declare, link=("-lpthread",), flags=("-fno-trapping-math",))


def kernel_problem() -> str | None:
    """Why the compiled kernel is not in use, or None when it is."""
    KERNEL.load()
    return KERNEL.problem


def describe() -> str:
    """What computes the ELU here, for `voicefoundry doctor`."""
    return KERNEL.describe()


def elu(values: np.ndarray) -> np.ndarray:
    """ELU of float32 `values`, a new C-contiguous array of their shape."""
    if values.dtype != np.float32:
        raise TypeError(f"host ELU takes float32, not {values.dtype}")
    lib = KERNEL.load() if values.size else None
    if lib is None:
        return _numpy_elu(values)
    from finetune.runtime.blas import thread_count

    values = np.ascontiguousarray(values)
    out = np.empty_like(values)
    lib.vf_elu(
        values.ctypes.data_as(_FLOATS),
        out.ctypes.data_as(_FLOATS),
        ctypes.c_long(values.size),
        ctypes.c_int(thread_count()),
    )
    return out


def _bound_elu() -> Any:
    from finetune.runtime import primitives
    from finetune.runtime.blas import thread_count

    lib = KERNEL.load()
    if lib is None:
        raise Unavailable(str(KERNEL.problem))
    extension = primitives.load()
    if extension is None:
        raise Unavailable(str(primitives.problem()))
    extension.bind_elu(ctypes.cast(lib.vf_elu, ctypes.c_void_p).value, thread_count())
    return extension.elu


_GRAPH_ELU = Lazy(_bound_elu)


def graph_elu() -> Any:
    """The ELU as one lazy MLX node running the compiled kernel (`elu(x)` of the C++ extension,
    csrc/cpu_primitives.cpp, bound to this kernel): no sync point, and no copy of a dense input.
    None off MLX's CPU backend (the node runs on the CPU stream) and where the kernel or the
    extension cannot be built; callers then take `elu` on the host. The first call builds."""
    from finetune.runtime.accelerate import is_cpu_backend

    return _GRAPH_ELU.load() if is_cpu_backend() else None


def _numpy_elu(values: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float32, order="C")
    # x > 0: max(x, expm1(0)) = x; x <= 0: expm1(x) >= x.
    np.maximum(out, np.expm1(np.minimum(out, np.float32(0.0))), out=out)
    return out
