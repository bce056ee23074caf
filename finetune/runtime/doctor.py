"""What the MLX runtime looks like in this process: platform, device, BLAS, fast paths."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import Any

from finetune.runtime import blas, fast_cpu_active, host_elu, host_snake, packed, settings


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def report(measure: bool = True) -> dict[str, Any]:
    import mlx.core as mx

    current = settings()
    state = blas.state()
    info: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "python": sys.version.split()[0],
        "mlx": _version("mlx"),
        "mlx_audio": _version("mlx-audio"),
        "mlx_device": str(mx.default_device()),
        "metal_available": bool(mx.metal.is_available()),
        "blas_library": blas.active_blas_library(),
        "blas_preloaded": state.loaded_path if state else None,
        "blas_problem": (state.error if state else "not attempted (fast CPU paths off)"),
        "blas_decode_gemm": (state.decode_gemm or state.decode_gemm_problem) if state else None,
        "host_snake": host_snake.describe(),
        "host_elu": host_elu.describe(),
        "packed_quantized": packed.describe() if fast_cpu_active() else "off (fast CPU paths off)",
        "fast_cpu_setting": {None: "auto", True: "on", False: "off"}[current.fast_cpu],
        "fast_cpu_paths": "on" if fast_cpu_active() else "off",
        "mlx_cache_limit_mib": current.cache_mib if fast_cpu_active() else "MLX's default",
    }
    if state is not None and state.mlx_imported_first:
        info["blas_problem"] = "mlx.core was imported before voicefoundry: BLAS preload too late"
    if measure:
        info["matmul_gflops_fp32"] = round(matmul_gflops(), 1)
    return info


def format_report(info: dict[str, Any]) -> str:
    width = max(len(k) for k in info)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in info.items())
