"""Put an optimised BLAS under MLX on Linux.

The `mlx[cpu]` wheel links the reference BLAS it bundles (a few GFLOP/s). Loading a BLAS that
exports the standard `cblas_*` symbols into the global scope BEFORE `mlx.core` is imported makes
MLX's own calls resolve to it, because the dynamic linker searches the global scope before a
library's private dependencies.

MLX computes every fp32 matmul with `cblas_sgemm`, decode's few-row products included, where
OpenBLAS's sgemm reads the weights at a third of its sgemv's speed whatever the row count. A small
library built from csrc/decode_gemm.c goes into the global scope first and computes products of
up to 64 rows (AVX2; 16 on AVX-512) in one pass over the weights, a short prompt's prefill
included (one-row products of other layouts go to `cblas_sgemv`). VOICEFOUNDRY_DECODE_GEMM:
auto (default), avx512, avx2, gemv (no kernel: one row to sgemv only), off. Without a C
compiler plain OpenBLAS runs, and the doctor says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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
    decode_gemm: str | None = None
    decode_gemm_problem: str | None = None


_state: BlasState | None = None
_decode: ctypes.CDLL | None = None
KERNELS = {"auto": -1, "gemv": 0, "avx2": 1, "avx512": 2}
KERNEL_NAMES = {0: "no few-row kernel (one row to sgemv)", 1: "AVX2", 2: "AVX-512"}
DECODE_GEMM_LINK = ("-ldl", "-lpthread")


def find_blas(explicit: str | None = None) -> str | None:
    """The first usable optimised BLAS library on this machine, or None."""
    if explicit:
        return explicit
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def preload(explicit: str | None = None, decode_gemm: str = "auto") -> BlasState:
    """Load the optimised BLAS globally, once. Safe to call many times.

    `decode_gemm`: one of KERNELS, or "off".
    """
    global _state, _decode
    if _state is not None:
        return _state
    mlx_first = "mlx.core" in sys.modules
    path = find_blas(explicit)
    if path is None:
        _state = BlasState(None, "no optimised BLAS found (run deploy/install.sh)", mlx_first)
        return _state
    decode: str | None = None
    decode_problem: str | None = "off (VOICEFOUNDRY_DECODE_GEMM=off)"
    if decode_gemm not in KERNELS and decode_gemm != "off":
        decode_problem = (
            f"off: VOICEFOUNDRY_DECODE_GEMM={decode_gemm!r} is not one of "
            f"{', '.join([*KERNELS, 'off'])}"
        )
    if decode_gemm in KERNELS:
        _decode, decode, decode_problem = _load_decode_gemm(path, KERNELS[decode_gemm])
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _state = BlasState(None, f"could not load {path}: {exc}", mlx_first)
        return _state
    _set_threads(path)
    _state = BlasState(path, None, mlx_first, decode, decode_problem)
    return _state


def _load_decode_gemm(
    blas_path: str, kernel: int
) -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """Build, bind and put the decode GEMM library in the global scope, ahead of the BLAS.

    Returns (the library, what it runs, None) or (None, None, why not).
    """
    from finetune.runtime.native import NativeBuildError, library

    threads = thread_count()
    try:
        built = str(library("decode_gemm", link=DECODE_GEMM_LINK))
        decode = ctypes.CDLL(built)
        # Bound privately first: only a library that found the real BLAS may shadow it.
        picked = decode.vf_bind(blas_path.encode(), threads, kernel)
        if picked < 0:
            return None, None, f"{built} could not bind cblas_sgemm / cblas_sgemv in {blas_path}"
        ctypes.CDLL(built, mode=ctypes.RTLD_GLOBAL)
    except (NativeBuildError, OSError, AttributeError, RuntimeError, ValueError) as exc:
        # Never fatal: this runs while `finetune` is imported; plain OpenBLAS does the products.
        return None, None, str(exc)
    decode.vf_count.restype = ctypes.c_ulong
    return decode, f"{KERNEL_NAMES[picked]}, {threads} threads ({built})", None


def decode_gemm_counts() -> dict[str, int] | None:
    """How this process's sgemm calls went; None when the decode GEMM is not active."""
    if _decode is None:
        return None
    names = ("few_rows", "sgemv", "sgemm", "packed", "bf16")
    return {name: int(_decode.vf_count(i)) for i, name in enumerate(names)}


def few_rows_max() -> int:
    """The most rows the bound few-row kernel takes in one product (0: none bound)."""
    return int(_decode.vf_few_rows_max()) if _decode is not None else 0


def stored_weight_kernels() -> tuple[int, int] | None:
    """The addresses of the decode GEMM's products with a weight as stored (`vf_qgemm`: packed
    4/8-bit, `vf_bgemm`: bf16), for the MLX extension that calls them
    (finetune/runtime/packed.py); None when the library is not active."""
    if _decode is None:
        return None
    packed = ctypes.cast(_decode.vf_qgemm, ctypes.c_void_p).value
    half = ctypes.cast(_decode.vf_bgemm, ctypes.c_void_p).value
    return None if packed is None or half is None else (packed, half)


def thread_count() -> int:
    """The threads the BLAS and our native kernels run on."""
    try:
        return max(1, int(os.environ.get("OPENBLAS_NUM_THREADS") or _cpus()))
    except ValueError:
        return _cpus()


@functools.cache
def _cpus() -> int:
    # os.cpu_count reads /sys each call (~20 us): the host kernels ask per call
    return os.cpu_count() or 1


def _set_threads(path: str) -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        ctypes.CDLL(path).openblas_set_num_threads(thread_count())


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
