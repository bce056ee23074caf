"""Put an optimised BLAS under MLX on Linux.

The `mlx[cpu]` wheel links the reference BLAS it bundles (a few GFLOP/s). Loading a BLAS that
exports the standard `cblas_*` symbols into the global scope BEFORE `mlx.core` is imported makes
MLX's own calls resolve to it, because the dynamic linker searches the global scope before a
library's private dependencies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Debian / Ubuntu `libopenblas0-pthread` (what deploy/install.sh installs), then other common spots.
CANDIDATES: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasState:
    loaded_path: str | None
    error: str | None
    mlx_imported_first: bool


_state: BlasState | None = None


def find_blas(explicit: str | None = None) -> str | None:
    """The first usable optimised BLAS library on this machine, or None."""
    if explicit:
        return explicit
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def preload(explicit: str | None = None) -> BlasState:
    """Load the optimised BLAS globally, once. Safe to call many times."""
    global _state
    if _state is not None:
        return _state
    mlx_first = "mlx.core" in sys.modules
    path = find_blas(explicit)
    if path is None:
        _state = BlasState(None, "no optimised BLAS found (run deploy/install.sh)", mlx_first)
        return _state
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _state = BlasState(None, f"could not load {path}: {exc}", mlx_first)
        return _state
    _set_threads(path)
    _state = BlasState(path, None, mlx_first)
    return _state


def _set_threads(path: str) -> None:
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or str(os.cpu_count() or 1)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        ctypes.CDLL(path).openblas_set_num_threads(int(threads))


def state() -> BlasState | None:
    return _state


def active_blas_library() -> str:
    """The shared library that `cblas_sgemm` resolves to for MLX, by reading this process's maps.

    MLX binds `cblas_sgemm` through the global scope first; a globally loaded OpenBLAS wins,
    otherwise the reference BLAS bundled in `mlx_cpu.libs` is used.
    """
    libs = _mapped_libraries()
    st = _state
    if st is not None and st.mlx_imported_first:
        libs = [lib for lib in libs if "openblas" not in Path(lib).name] or libs
    if st is not None and st.loaded_path is not None:
        real = os.path.realpath(st.loaded_path)
        if real in libs or st.loaded_path in libs:
            return real
    for lib in libs:
        name = Path(lib).name
        if re.match(r"libblas.*\.so", name) or "openblas" in name or "mkl" in name:
            return lib
    return "unknown"


def _mapped_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)
