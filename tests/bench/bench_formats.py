"""The real 0.6B shape in fp32, bf16, 8-bit and 4-bit, side by side (bench_foundation.py --real).

The bf16 checkpoint is make-tiny's `real-0.6b` (official layout, as released); fp32, 8-bit and
4-bit are made from it by mlx-audio's own converter (`mlx_audio.convert --dtype float32`, and
finetune/families/qwen3_tts/quantize.py for `-q --q-bits 8|4`). Each is loaded by
`load_qwen3_tts` (the server's loader) in a fresh process, so resident memory is its own:

- load time, RSS after loading (less the process's RSS before), peak RSS;
- the weights' bytes on disk (model*.safetensors; speech_tokenizer/ apart);
- bytes read per frame: the talker's decoder layers and codec head once, the code predictor's
  layers 15 times (once per codebook 1..15) and each of its 15 heads once, as loaded (the
  CPU fast path keeps fp32 in memory, so bf16 is read as fp32 there; "bf16 stock" loads with
  VOICEFOUNDRY_FAST_CPU=0 and keeps the stored dtype);
- the memory-bandwidth floor per frame: those bytes over the read bandwidth measured in the
  same run (the faster of numpy's sum and OpenBLAS's fp32 matrix-vector product over a 256 MiB
  matrix, best of 10; MLX's own mat-vec is printed beside it: it reads slower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve()


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _nbytes(module: Any) -> int:
    from finetune.arrays import flat_items

    if isinstance(module, list):  # a list of layers
        return sum(_nbytes(m) for m in module)
    return sum(int(v.nbytes) for _, v in flat_items(module.parameters()))


def frame_bytes(model: Any) -> int:
    """Weight bytes one talker + code predictor frame reads (embedding rows not counted)."""
    talker = model.talker
    predictor = talker.code_predictor
    steps = int(predictor.num_code_groups) - 1
    total = _nbytes(talker.model.layers) + _nbytes(talker.codec_head)
    per_step = _nbytes(predictor.model.layers)
    if getattr(predictor, "small_to_mtp_projection", None) is not None:
        per_step += _nbytes(predictor.small_to_mtp_projection)
    return total + steps * per_step + sum(_nbytes(head) for head in predictor.lm_head)


def child_load(path: str) -> None:
    import finetune  # noqa: F401  (BLAS before mlx)
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    import mlx.core as mx

    base = _rss_mib("VmRSS")
    start = time.perf_counter()
    loaded = load_qwen3_tts(path, serving=True)
    mx.eval(loaded.model.parameters())
    load_s = time.perf_counter() - start
    dtypes = sorted({str(v.dtype) for v in _params(loaded.model.talker)})
    out = {
        "load_s": load_s,
        "rss_mib": _rss_mib("VmRSS") - base,
        "peak_mib": _rss_mib("VmHWM"),
        "frame_bytes": frame_bytes(loaded.model),
        "talker_dtypes": dtypes,
    }
    print(json.dumps(out))


def _params(module: Any) -> list[Any]:
    from finetune.arrays import flat_items

    return [v for _, v in flat_items(module.parameters())]


def child_bandwidth() -> None:
    import finetune  # noqa: F401

    import mlx.core as mx
    import numpy as np

    n = 8192  # 256 MiB of fp32: far past every cache
    weights = np.random.default_rng(0).random((n, n), dtype=np.float32)
    x = np.ones(n, np.float32)
    w_mx, x_mx = mx.array(weights), mx.ones((n, 1))
    mx.eval(w_mx, x_mx)

    def best(step: Any) -> float:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return weights.nbytes / min(times) / 1e9

    out = {
        "numpy_sum": best(weights.sum),
        "numpy_matvec": best(lambda: weights @ x),  # OpenBLAS sgemv, all threads
        "mlx_matvec": best(lambda: mx.eval(w_mx @ x_mx)),
    }
    out["read_gb_s"] = max(out["numpy_sum"], out["numpy_matvec"])
    print(json.dumps(out))


def _child(args: list[str], fast: bool = True, env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, "VOICEFOUNDRY_FAST_CPU": "1" if fast else "0", **(env or {})}
    cmd = [sys.executable, str(BENCH), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _convert_fp32(src: Path, dst: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mlx_audio.convert", "--hf-path", str(src)]
    cmd += ["--mlx-path", str(dst), "--model-domain", "tts", "--dtype", "float32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"mlx_audio.convert --dtype float32 failed:\n{proc.stderr[-4000:]}")
    return dst


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("model*.safetensors"))


def run(preset: str = "real-0.6b") -> None:
    import finetune  # noqa: F401
    from finetune.families.qwen3_tts.quantize import quantize_checkpoint
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    with tempfile.TemporaryDirectory(prefix="vf-formats-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        bf16 = make_tiny_qwen3_tts(root / "bf16", seed=0, preset=preset)
        formats = {
            "fp32": _convert_fp32(bf16, root / "fp32"),
            "bf16": bf16,
            "8-bit": quantize_checkpoint(bf16, root / "q8", 8),
            "4-bit": quantize_checkpoint(bf16, root / "q4", 4),
        }
        took = time.perf_counter() - start
        print(f"\nbuilt {preset} in fp32 / bf16 / 8-bit / 4-bit in {took:.0f} s")
        reads = _child(["--child-bandwidth"])
        bandwidth = reads["read_gb_s"]
        rows = [(name, path, True) for name, path in formats.items()]
        rows.insert(2, ("bf16 stock", bf16, False))
        results = [
            (name, _weights_bytes(path), _child(["--child-load", str(path)], fast))
            for name, path, fast in rows
        ]

    print(
        f"read bandwidth over 256 MiB, best of 10: {bandwidth:.1f} GB/s (numpy sum "
        f"{reads['numpy_sum']:.1f}, numpy fp32 mat-vec {reads['numpy_matvec']:.1f}; "
        f"MLX fp32 mat-vec reaches {reads['mlx_matvec']:.1f})"
    )
    head = (
        f"{preset:12s} {'on disk':>10s} {'load':>7s} {'RSS':>9s} {'peak RSS':>9s} "
        f"{'read/frame':>11s} {'floor/frame':>12s}  in memory"
    )
    print(head)
    for name, disk, r in results:
        floor = r["frame_bytes"] / (bandwidth * 1e9)
        print(
            f"{name:12s} {disk / 2**20:7.0f} MiB {r['load_s']:6.2f}s "
            f"{r['rss_mib']:5.0f} MiB {r['peak_mib']:5.0f} MiB "
            f"{r['frame_bytes'] / 2**20:7.0f} MiB {floor * 1000:9.1f} ms  "
            f"{', '.join(r['talker_dtypes'])}"
        )


def main() -> None:
    if sys.argv[1:2] == ["--child-load"]:
        child_load(sys.argv[2])
    elif sys.argv[1:2] == ["--child-bandwidth"]:
        child_bandwidth()
    else:
        run(sys.argv[1] if len(sys.argv) > 1 else "real-0.6b")


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH.parents[2]))
    main()
