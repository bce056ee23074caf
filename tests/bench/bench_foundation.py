"""Stock MLX vs voicefoundry's Linux-CPU fast paths, measured side by side in one run.

Each side runs in its own process (the BLAS choice is process-wide): the stock side with
VOICEFOUNDRY_FAST_CPU=0, the optimised side with the default. Printed: fp32 matmul GFLOP/s,
tiny-model generation of 2 s of audio (speaker-embedding clone), and with --real the real 0.6B
shape (random weights): talker + code predictor per 80 ms frame, vocoder and end to end.

--real also loads the 0.6B shape in fp32, bf16, 8-bit and 4-bit (bench_formats.py: made by
mlx-audio's converter) side by side, each in its own process: load time, resident memory, the
weights' bytes on disk and the memory-bandwidth floor per frame (weights read per frame over the
read bandwidth measured in the same run). --formats-only runs just that table.

    python tests/bench/bench_foundation.py [--real] [--skip-stock-real] [--formats-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FRAMES = 25  # 2 s of audio at 12.5 frames a second
TEXT = "The quick brown fox jumps over the lazy dog, twice."


def child(args: argparse.Namespace) -> None:
    import finetune  # noqa: F401  (BLAS before mlx)
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.runtime.doctor import matmul_gflops

    import mlx.core as mx
    import numpy as np

    out: dict[str, float] = {"matmul_gflops": matmul_gflops(n=1024, repeats=5)}
    ref = mx.array((0.3 * np.sin(np.linspace(0, 3000, 48_000))).astype(np.float32))
    for label, path in (("tiny", args.tiny), ("real", args.real_model)):
        if path is None:
            continue
        start = time.perf_counter()
        model = load_qwen3_tts(path).model
        out[f"{label}_load_s"] = time.perf_counter() - start
        mx.random.seed(0)
        list(model.generate(TEXT, ref_audio=ref, max_tokens=2))  # warm-up: first frame of a process
        mx.random.seed(0)
        start = time.perf_counter()
        results = list(model.generate(TEXT, ref_audio=ref, max_tokens=FRAMES))
        total = time.perf_counter() - start
        samples = sum(int(r.audio.shape[0]) for r in results)
        codes = mx.array(np.random.default_rng(0).integers(1, 2048, (1, FRAMES, 16)))
        start = time.perf_counter()
        wav, _ = model.speech_tokenizer.decode(codes)
        mx.eval(wav)
        vocoder = time.perf_counter() - start
        out[f"{label}_e2e_s"] = total
        out[f"{label}_audio_s"] = samples / 24_000
        out[f"{label}_vocoder_s"] = vocoder
        out[f"{label}_per_frame_s"] = max(total - vocoder, 0.0) / FRAMES
        del model
    print(json.dumps(out))


def run_side(fast: bool, tiny: Path, real: Path | None) -> dict[str, float]:
    env = {**os.environ, "VOICEFOUNDRY_FAST_CPU": "1" if fast else "0"}
    cmd = [sys.executable, __file__, "--child", "--tiny", str(tiny)]
    if real is not None:
        cmd += ["--real-model", str(real)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROWS = [
    ("matmul_gflops", "fp32 matmul 1024^3 (GFLOP/s, higher is better)", True),
    ("tiny_e2e_s", "tiny model: 2 s of audio, end to end (s)", False),
    ("tiny_vocoder_s", "tiny model: vocoder for 2 s (s)", False),
    ("tiny_per_frame_s", "tiny model: talker + code predictor per frame (s)", False),
    ("real_per_frame_s", "real 0.6B shape: talker + code predictor per frame (s)", False),
    ("real_vocoder_s", "real 0.6B shape: vocoder for 2 s (s)", False),
    ("real_e2e_s", "real 0.6B shape: 2 s of audio, end to end (s)", False),
    ("real_load_s", "real 0.6B shape: load (s)", False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", type=Path)
    parser.add_argument("--real-model", type=Path)
    parser.add_argument("--real", action="store_true", help="also the real 0.6B shape")
    parser.add_argument(
        "--skip-stock-real",
        action="store_true",
        help="run the real shape on the optimised side only (stock takes minutes)",
    )
    parser.add_argument(
        "--formats-only", action="store_true", help="only the real shape's per-format table"
    )
    parser.add_argument("--preset", default="real-0.6b", help=argparse.SUPPRESS)  # smoke runs
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.formats_only:
        import bench_formats

        bench_formats.run(args.preset)
        return

    import finetune  # noqa: F401
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        tiny = make_tiny_qwen3_tts(Path(tmp) / "tiny", seed=0)
        real = None
        if args.real:
            start = time.perf_counter()
            real = make_tiny_qwen3_tts(Path(tmp) / "real", seed=0, preset="real-0.6b")
            print(f"built the real 0.6B shape in {time.perf_counter() - start:.1f} s")
        stock = run_side(False, tiny, None if args.skip_stock_real else real)
        fast = run_side(True, tiny, real)

    print(f"\n{'metric':58s} {'stock':>10s} {'optimised':>10s} {'ratio':>8s}")
    for key, label, higher_better in ROWS:
        if key not in fast:
            continue
        s, f = stock.get(key), fast[key]
        if s is None:
            print(f"{label:58s} {'-':>10s} {f:10.3f} {'-':>8s}")
            continue
        ratio = f / s if higher_better else s / f
        print(f"{label:58s} {s:10.3f} {f:10.3f} {ratio:7.1f}x")
    for side, data in (("stock", stock), ("optimised", fast)):
        if "tiny_e2e_s" in data:
            print(f"RTF tiny ({side}): {data['tiny_e2e_s'] / data['tiny_audio_s']:.2f}")
        if "real_e2e_s" in data:
            print(f"RTF real 0.6B ({side}): {data['real_e2e_s'] / data['real_audio_s']:.2f}")
    if args.real:
        import bench_formats

        bench_formats.run(args.preset)


if __name__ == "__main__":
    main()
