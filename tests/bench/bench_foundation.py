"""Stock MLX vs voicefoundry's Linux-CPU fast paths, and the real 0.6B shape per format against
its memory-bound floor and the official qwen-tts, measured side by side in one run.

Each side runs in its own process (the BLAS choice is process-wide): the stock side with
VOICEFOUNDRY_FAST_CPU=0, the optimised side with the default. Printed: fp32 matmul GFLOP/s and
tiny-model generation of 2 s of audio (speaker-embedding clone), stock vs optimised.

--real builds the real 0.6B shape (random weights, official layout, bf16 as released) and from it
fp32, 8-bit and 4-bit (mlx-audio's converter), loads each as the server does (`load_qwen3_tts`)
in its own process and prints, per format: talker + code predictor time per 80 ms frame (the
time of a run of 2 + N frames less a run of 2, the vocoder's time taken out of both: prefill
cancels), the vocoder on 25 frames (2 s of audio), end to end (2 + N frames and their audio,
real-time factor), the memory-bound floor per frame (weight bytes one frame reads, over the read
bandwidth measured in this run) for the weights as stored and as run, and the ratio of the
frame time to each. Beside them, the official `qwen-tts` (PyTorch CPU, fp32, in .venv-parity:
`make parity`) on the same bf16 checkpoint, the same text, greedy, and the ratios to it. --real
also prints the per-shape quantised-matmul table (`--shapes` alone runs just that): MLX's
`quantized_matmul` and our packed product (finetune/runtime/packed.py) vs an fp32 and a bf16
product, per (bits, output, input, rows) of the 0.6B decode shapes, interleaved, and what
`finetune/runtime/quantized.py` picks.

    python tests/bench/bench_foundation.py [--real [--frames N] [--stock-real] [--no-peer]]
                                           [--shapes] [--formats-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FRAMES = 25  # 2 s of audio at 12.5 frames a second
SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5
VOCODER_RUNS = 3  # the vocoder figures (ours and the peer's) are the best of this many
TEXT = "The quick brown fox jumps over the lazy dog, twice."
PARITY_PYTHON = ROOT / ".venv-parity" / "bin" / "python"
# The fp32 run again with every product left to OpenBLAS's sgemm, side by side.
SGEMM_ONLY = {"VOICEFOUNDRY_DECODE_GEMM": "off"}
# The quantised runs again without their fp32 copies: quantized_matmul for every product.
PACKED_ONLY = {"VOICEFOUNDRY_CPU_DENSE_QUANTIZED": "0"}
FORMATS = ("fp32", "bf16", "8-bit", "4-bit")
# The 0.6B talker / code predictor decode shapes (output, input) and the rows of a decode step.
SHAPES = ((2048, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (1024, 3072))
SHAPE_ROWS = (1, 2, 4, 8)


# --- our side: one process per model ----------------------------------------------------------
def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reference_audio() -> Any:
    import mlx.core as mx
    import numpy as np

    return mx.array((0.3 * np.sin(np.linspace(0, 3000, 48_000))).astype(np.float32))


def measure_generation(model: Any, frames: int, *, served: bool = False) -> dict[str, float]:
    """Per-frame decode (difference of two runs, vocoder time out), vocoder, end to end; with
    `served`, the vocoder also as the server runs it."""
    import mlx.core as mx
    import numpy as np

    tokenizer = model.speech_tokenizer
    decode = tokenizer.decode
    spent = [0.0]

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        mx.eval(out[0])
        spent[0] += time.perf_counter() - start
        return out

    ref = _reference_audio()

    def run(n: int) -> tuple[float, float, int]:
        mx.random.seed(0)
        spent[0] = 0.0
        start = time.perf_counter()
        results = list(model.generate(TEXT, ref_audio=ref, max_tokens=n))
        total = time.perf_counter() - start
        return total, spent[0], sum(int(r.audio.shape[0]) for r in results)

    tokenizer.decode = timed_decode
    try:
        run(2)  # warm-up: the first frames of a process
        short, short_voc, short_samples = run(2)
        long, long_voc, samples = run(2 + frames)
    finally:
        del tokenizer.decode
    made = (samples - short_samples) // SAMPLES_PER_FRAME
    codes = mx.array(np.random.default_rng(0).integers(1, 2048, (1, FRAMES, 16)))
    vocoder = math.inf
    for _ in range(VOCODER_RUNS):
        start = time.perf_counter()
        wav, _ = tokenizer.decode(codes)
        mx.eval(wav)
        vocoder = min(vocoder, time.perf_counter() - start)
    out = {
        "per_frame_s": ((long - long_voc) - (short - short_voc)) / max(made, 1),
        "frames": float(made),
        "vocoder_s": vocoder,
        "e2e_s": long,
        "audio_s": samples / 24_000,
    }
    if served:
        out["served_vocoder_s"] = _served_vocoder_s(tokenizer, np.array(codes[0]))
        out["served_per_frame_s"], out["served_frames"] = _served_per_frame_s(model, frames)
    return out


def _served_per_frame_s(model: Any, frames: int) -> tuple[float, int]:
    """Talker + code predictor per frame through the server's decode loop (one row of
    `Qwen3DecodeBatch`, no vocoder): a 2 + N frame run less a 2 frame run, as above; and the
    frames the long run made beyond the short one."""
    from finetune.families.qwen3_tts.conditioning import VoiceConditioning
    from finetune.families.qwen3_tts.serving import Qwen3BatchGenerator, Qwen3Prompter, Row
    from finetune.sampling import Sampling

    generator = Qwen3BatchGenerator(model, set_rows=lambda _: None)
    cond = VoiceConditioning(speaker="none").utterance("english", None, None)
    prompt = Qwen3Prompter(model).prompt(TEXT, cond, None)

    def run(n: int) -> tuple[float, int]:
        row = Row(prompt=prompt, sampling=Sampling(max_tokens=n), seed=0)
        start = time.perf_counter()
        generator.run([row])
        return time.perf_counter() - start, len(row.frames)

    run(2)  # warm-up
    short, short_made = run(2)
    long, long_made = run(2 + frames)
    made = long_made - short_made
    return (long - short) / max(made, 1), made


def _served_vocoder_s(tokenizer: Any, codes: Any) -> float:
    """The same frames through the server's vocoder (one stream, one pass), best of a few."""
    from finetune.families.qwen3_tts.vocoder_stream import StreamingVocoder

    vocoder = StreamingVocoder(tokenizer.decoder, tokenizer.decode_upsample_rate)
    best = math.inf
    for _ in range(VOCODER_RUNS):
        start = time.perf_counter()
        vocoder.decode([(vocoder.open(), codes)])
        best = min(best, time.perf_counter() - start)
    return best


def child(args: argparse.Namespace) -> None:
    """The stock-vs-optimised side: matmul GFLOP/s, the tiny model, optionally the real one."""
    import finetune  # noqa: F401  (BLAS before mlx)
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.runtime.doctor import matmul_gflops

    out: dict[str, float] = {"matmul_gflops": matmul_gflops(n=1024, repeats=5)}
    for label, path in (("tiny", args.tiny), ("real", args.real_model)):
        if path is None:
            continue
        start = time.perf_counter()
        model = load_qwen3_tts(path, serving=True).model
        out[f"{label}_load_s"] = time.perf_counter() - start
        frames = FRAMES if label == "tiny" else args.frames
        for key, value in measure_generation(model, frames).items():
            out[f"{label}_{key}"] = value
        del model
    print(json.dumps(out))


def run_side(fast: bool, tiny: Path, real: Path | None, frames: int) -> dict[str, float]:
    env = {**os.environ, "VOICEFOUNDRY_FAST_CPU": "1" if fast else "0"}
    cmd = [sys.executable, __file__, "--child", "--tiny", str(tiny), "--frames", str(frames)]
    if real is not None:
        cmd += ["--real-model", str(real)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _frame_weight(key: str, steps: int) -> int:
    """How many times one frame reads the weight `key` (0: not per frame, e.g. embeddings)."""
    if key.startswith(("talker.code_predictor.model.layers.", "talker.code_predictor.small_to")):
        return steps
    if key.startswith(("talker.code_predictor.lm_head.", "talker.model.layers.")):
        return 1
    return 1 if key.startswith("talker.codec_head.") else 0


def stored_frame_bytes(path: Path, steps: int = 15) -> int:
    """Weight bytes a frame reads, in the dtypes the checkpoint stores (safetensors headers)."""
    total = 0
    for file in sorted(path.glob("model*.safetensors")):
        with file.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                total += _frame_weight(key, steps) * (end - start)
    return total


def run_frame_bytes(model: Any) -> int:
    """Weight bytes a one-row frame reads as loaded: a quantised layer's packed weight where one
    row takes the packed product (or MLX's kernel), its fp32 copy where it does not."""
    from finetune.arrays import flat_items
    from finetune.runtime.quantized import CpuQuantizedLinear

    steps = int(model.talker.code_predictor.num_code_groups) - 1
    dense: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, CpuQuantizedLinear) and module._packed_max_rows < 1:
            dense[path] = int(module["_dense"].nbytes)
    total = 0
    for key, value in flat_items(model.parameters()):
        owner, name = key.rsplit(".", 1)
        nbytes = int(value.nbytes)
        if owner in dense and name != "bias":  # the fp32 copy instead of weight/scales/biases
            nbytes = dense[owner] if name == "weight" else 0
        total += _frame_weight(key, steps) * nbytes
    return total


def child_format(path: Path, frames: int) -> None:
    """One format of the real shape, loaded as the server does: memory, bytes, timings."""
    import finetune  # noqa: F401  (BLAS before mlx)
    from finetune.arrays import flat_items
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.runtime.quantized import dense_bytes

    import mlx.core as mx

    base = _rss_mib("VmRSS")
    start = time.perf_counter()
    loaded = load_qwen3_tts(path, serving=True)
    mx.eval(loaded.model.parameters())
    out: dict[str, Any] = {
        "load_s": time.perf_counter() - start,
        "rss_mib": _rss_mib("VmRSS") - base,
        "dense_copy_mib": dense_bytes(loaded.model) / 2**20,
        "run_frame_bytes": run_frame_bytes(loaded.model),
        "talker_dtypes": sorted(
            {str(v.dtype) for _, v in flat_items(loaded.model.talker.parameters())}
        ),
    }
    out.update(measure_generation(loaded.model, frames, served=True))
    out["peak_mib"] = _rss_mib("VmHWM")
    print(json.dumps(out))


# --- the official qwen-tts, in .venv-parity (torch; no MLX, no project imports) ---------------
def child_peer(path: Path, frames: int) -> None:
    import contextlib
    import io

    sys.path.insert(0, str(ROOT / "tests" / "parity"))
    from torchaudio_stand_in import stand_in_torchaudio

    stand_in_torchaudio()
    import numpy as np
    import soundfile as sf
    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        from qwen_tts import Qwen3TTSModel

        start = time.perf_counter()
        tts = Qwen3TTSModel.from_pretrained(str(path), dtype=torch.float32)
        tts.model.eval()
        load_s = time.perf_counter() - start
    ref_dir = tempfile.TemporaryDirectory(prefix="vf-peer-")  # removed at exit, if not before
    ref = Path(ref_dir.name) / "ref.wav"
    sf.write(ref, (0.3 * np.sin(np.linspace(0, 3000, 48_000))).astype(np.float32), 24_000)
    model, tokenizer = tts.model, tts.model.speech_tokenizer
    generate, decode = model.generate, tokenizer.decode
    spent = {"generate": 0.0, "decode": 0.0}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            return out

        return wrapper

    model.generate, tokenizer.decode = timed("generate", generate), timed("decode", decode)

    def run(n: int) -> tuple[float, float, int]:
        spent.update(generate=0.0, decode=0.0)
        torch.manual_seed(0)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            wavs, _ = tts.generate_voice_clone(
                TEXT, language="Auto", ref_audio=str(ref), x_vector_only_mode=True,
                non_streaming_mode=True, do_sample=False, subtalker_dosample=False,
                repetition_penalty=1.0, max_new_tokens=n,
            )  # fmt: skip
        return time.perf_counter() - start, spent["generate"], len(wavs[0])

    # qwen_tts predicts a frame's codebooks 1-15 in the step after its codebook 0: n + 1 tokens
    # make n frames.
    run(3)  # warm-up
    _, short_gen, short_samples = run(3)
    total, long_gen, samples = run(3 + frames)
    del model.generate, tokenizer.decode
    made = (samples - short_samples) // SAMPLES_PER_FRAME
    codes = torch.from_numpy(np.random.default_rng(0).integers(1, 2048, (FRAMES, 16)))
    vocoder = math.inf
    for _ in range(VOCODER_RUNS):
        start = time.perf_counter()
        with torch.inference_mode():
            tokenizer.decode([{"audio_codes": codes}])
        vocoder = min(vocoder, time.perf_counter() - start)
    ref_dir.cleanup()
    out = {
        "load_s": load_s,
        "per_frame_s": (long_gen - short_gen) / max(made, 1),
        "frames": float(made),
        "vocoder_s": vocoder,
        "e2e_s": total,
        "audio_s": samples / 24_000,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out))


def _child(
    args: list[str], python: Path | str = sys.executable, env: dict[str, str] | None = None
) -> Any:
    cmd = [str(python), __file__, *args]
    proc = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- per-shape quantised matmul vs fp32 / bf16 ------------------------------------------------
def _time_shape(out_dims: int, in_dims: int, rows: int, n: int) -> dict[str, float]:
    """Seconds per call of each product, best of 5 interleaved rounds over `n` weights."""
    import mlx.core as mx

    weights = [mx.random.normal((out_dims, in_dims)) * 0.02 for _ in range(n)]
    halves = [w.astype(mx.bfloat16) for w in weights]
    packed = {b: [mx.quantize(w, group_size=64, bits=b) for w in weights] for b in (8, 4)}
    x = mx.random.normal((rows, in_dims))
    xh = x.astype(mx.bfloat16)
    mx.eval(weights, halves, packed, x, xh)

    def qmm(bits: int) -> None:
        mx.eval(
            [
                mx.quantized_matmul(x, *p, transpose=True, group_size=64, bits=bits)
                for p in packed[bits]
            ]
        )

    def packed_product(bits: int) -> None:
        mx.eval([kernel.matmul(x, *p, 64, bits) for p in packed[bits]])

    from finetune.runtime import packed as packed_runtime

    kernel = packed_runtime.load()
    variants: dict[str, Callable[[], None]] = {
        "fp32": lambda: mx.eval([x @ w.T for w in weights]),
        "bf16": lambda: mx.eval([xh @ w.T for w in halves]),
        "q8": lambda: qmm(8),
        "q4": lambda: qmm(4),
    }
    if kernel is not None:  # not in the run without the decode GEMM (it holds the kernel)
        variants.update(p8=lambda: packed_product(8), p4=lambda: packed_product(4))
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(5):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t / n for name, t in best.items()}


def child_shapes() -> None:
    import finetune  # noqa: F401  (BLAS before mlx)
    from finetune.runtime.quantized import PACKED_MAX_ROWS

    target = 192 * 2**20  # each variant cycles through this many fp32 bytes: past the caches
    table = []
    for out_dims, in_dims in SHAPES:
        n = max(4, target // (out_dims * in_dims * 4))
        for rows in SHAPE_ROWS:
            row: dict[str, Any] = {"shape": [out_dims, in_dims], "rows": rows}
            row.update(_time_shape(out_dims, in_dims, rows, n))
            row["packed_picked"] = rows <= PACKED_MAX_ROWS
            table.append(row)
    print(json.dumps(table))


def shapes_table() -> None:
    """The per-shape table, with the fp32 products measured again without the decode GEMM."""
    table = _child(["--child-shapes"])
    sgemm = _child(["--child-shapes"], env=SGEMM_ONLY)
    for row, plain in zip(table, sgemm, strict=True):
        row["fp32_sgemm"] = plain["fp32"]
    print(
        "\nper call, best of 5 interleaved rounds (us); fp32: MLX with the decode GEMM "
        "(finetune/runtime/csrc/decode_gemm.c), sgemm: the same product in a process without it "
        "(VOICEFOUNDRY_DECODE_GEMM=off); GB/s: the fp32 weight's bytes over the fp32 time; "
        "q8 / q4: MLX's quantized_matmul; p8 / p4: our packed product "
        "(finetune/runtime/packed.py); "
        "'uses' is what finetune/runtime/quantized.py runs for that call with dense copies on"
    )
    print(
        f"{'(out, in)':>12s} {'rows':>4s} {'fp32':>8s} {'GB/s':>5s} {'sgemm':>8s} "
        f"{'sgemm/fp32':>10s} {'bf16':>8s} {'q8':>8s} {'q4':>8s} {'p8':>8s} {'p4':>8s}  "
        f"{'p8/fp32':>7s} {'p4/fp32':>7s}  uses"
    )
    for r in table:
        out_dims, in_dims = r["shape"]
        print(
            f"{f'({out_dims}, {in_dims})':>12s} {r['rows']:4d} {r['fp32'] * 1e6:8.0f} "
            f"{out_dims * in_dims * 4 / r['fp32'] / 1e9:5.1f} {r['fp32_sgemm'] * 1e6:8.0f} "
            f"{r['fp32_sgemm'] / r['fp32']:9.2f}x {r['bf16'] * 1e6:8.0f} "
            f"{r['q8'] * 1e6:8.0f} {r['q4'] * 1e6:8.0f} {r['p8'] * 1e6:8.0f} "
            f"{r['p4'] * 1e6:8.0f}  {r['p8'] / r['fp32']:6.2f}x {r['p4'] / r['fp32']:6.2f}x  "
            f"{'packed' if r['packed_picked'] else 'fp32 copy'}"
        )


# --- the real 0.6B shape per format -----------------------------------------------------------
def build_formats(root: Path) -> dict[str, Path]:
    """The four formats under `root`, each built unless a previous run left it there."""
    import finetune  # noqa: F401
    from finetune.families.qwen3_tts.quantize import quantize_checkpoint
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    import bench_formats

    def made(path: Path, build: Callable[[], Path]) -> Path:
        return path if (path / "config.json").is_file() else build()

    bf16 = made(
        root / "bf16", lambda: make_tiny_qwen3_tts(root / "bf16", seed=0, preset="real-0.6b")
    )
    return {
        "fp32": made(root / "fp32", lambda: bench_formats._convert_fp32(bf16, root / "fp32")),
        "bf16": bf16,
        "8-bit": made(root / "q8", lambda: quantize_checkpoint(bf16, root / "q8", 8)),
        "4-bit": made(root / "q4", lambda: quantize_checkpoint(bf16, root / "q4", 4)),
    }


def _steady_rtf(r: dict[str, Any]) -> float:
    """2 s of audio without the prefill: 25 frames' decode and the vocoder, over 2 s."""
    return (FRAMES * r["per_frame_s"] + r["vocoder_s"]) / (FRAMES * SAMPLES_PER_FRAME / 24_000)


def run_real(args: argparse.Namespace, stock_real: dict[str, float] | None) -> None:
    import bench_formats

    with tempfile.TemporaryDirectory(prefix="vf-bench-real-") as tmp:
        start = time.perf_counter()
        paths = build_formats(args.work or Path(tmp))
        took = time.perf_counter() - start
        print(f"\nbuilt the real 0.6B shape in {', '.join(paths)} in {took:.0f} s")
        reads = bench_formats._child(["--child-bandwidth"])
        sgemm_reads = bench_formats._child(["--child-bandwidth"], env=SGEMM_ONLY)
        bandwidth = float(reads["read_gb_s"]) * 1e9
        frames = str(args.frames)
        results: dict[str, dict[str, Any]] = {}
        runs = [(name, path, {}) for name, path in paths.items()]
        runs.insert(1, ("fp32 sgemm", paths["fp32"], SGEMM_ONLY))
        runs += [(f"{name} packed", paths[name], PACKED_ONLY) for name in ("8-bit", "4-bit")]
        for name, path, env in runs:
            try:
                results[name] = _child(["--child-format", str(path), "--frames", frames], env=env)
            except SystemExit as exc:  # e.g. killed for memory on a shared machine: say so
                print(f"  {name}: FAILED, left out of the table: {exc}", flush=True)
                continue
            results[name]["stored_frame_bytes"] = stored_frame_bytes(path)
            results[name]["disk_mib"] = bench_formats._weights_bytes(path) / 2**20
            print(f"  measured {name}: {json.dumps(results[name])}", flush=True)
        peer: dict[str, Any] | None = None
        if args.no_peer:
            print("official qwen-tts: not run (--no-peer)")
        elif not PARITY_PYTHON.exists():
            print(f"official qwen-tts: NOT RUN, {PARITY_PYTHON} is missing (`make parity`)")
        else:
            peer = _child(["--child-peer", str(paths["bf16"]), "--frames", frames], PARITY_PYTHON)

    print(
        f"\nread bandwidth over 256 MiB, best of 10: {bandwidth / 1e9:.1f} GB/s (numpy sum "
        f"{reads['numpy_sum']:.1f}, numpy fp32 mat-vec {reads['numpy_matvec']:.1f}; MLX fp32 "
        f"mat-vec {reads['mlx_matvec']:.1f}, without the decode GEMM "
        f"{sgemm_reads['mlx_matvec']:.1f})"
    )
    print(
        "fp32 sgemm: fp32 with VOICEFOUNDRY_DECODE_GEMM=off (every product through OpenBLAS's "
        "sgemm, as before finetune/runtime/csrc/decode_gemm.c); 8-bit / 4-bit: the packed "
        "product up to 8 rows, fp32 copies above (the default); 'packed': "
        "VOICEFOUNDRY_CPU_DENSE_QUANTIZED=0, the packed product for every product"
    )
    print(
        f"real 0.6B shape, random weights, {args.frames} frames after 2, same text; per frame: "
        "talker + code predictor; vocoder: 25 frames (2 s), best of 3, mlx-audio's decode; "
        "served: the same through the server's streaming vocoder, one pass; e2e / RTF: the 2 + N "
        "frame run (prefill, decode, vocoder); RTF 2s: 25 frames' decode + the 2 s vocoder, no "
        "prefill; floor: weight bytes read per frame / read bandwidth, as stored and as run "
        "(one row)"
    )
    head = (
        f"{'format':12s} {'per frame':>9s} {'vocoder':>8s} {'served':>7s} {'e2e':>7s} {'RTF':>6s} "
        f"{'RTF 2s':>6s} "
        f"{'floor st.':>9s} {'x st.':>6s} {'floor run':>9s} {'x run':>6s} {'disk':>9s} "
        f"{'RSS':>9s} {'fp32 copy':>10s} {'load':>6s}  in memory"
    )
    print(head)
    for name, r in results.items():
        stored = r["stored_frame_bytes"] / bandwidth
        run = r["run_frame_bytes"] / bandwidth
        print(
            f"{name:12s} {r['per_frame_s']:8.3f}s {r['vocoder_s']:7.2f}s "
            f"{r['served_vocoder_s']:6.2f}s {r['e2e_s']:6.1f}s "
            f"{r['e2e_s'] / r['audio_s']:6.2f} {_steady_rtf(r):6.2f} "
            f"{stored:8.3f}s {r['per_frame_s'] / stored:5.2f}x "
            f"{run:8.3f}s {r['per_frame_s'] / run:5.2f}x {r['disk_mib']:5.0f} MiB "
            f"{r['rss_mib']:5.0f} MiB {r['dense_copy_mib']:6.0f} MiB {r['load_s']:5.1f}s  "
            f"{', '.join(r['talker_dtypes'])}"
        )
    print(
        "\nthe server's decode loop (finetune/families/qwen3_tts/serving.py, one row of "
        "Qwen3DecodeBatch: what /speak runs), talker + code predictor per frame, same text, "
        "the same difference of runs; beside the floor as run and as stored"
    )
    for name, r in results.items():
        run = r["run_frame_bytes"] / bandwidth
        stored = r["stored_frame_bytes"] / bandwidth
        served = r["served_per_frame_s"]
        print(
            f"{name:12s} served {served:6.3f}s a frame ({r['served_frames']} frames)  "
            f"{served / run:5.2f}x the floor as run  {served / stored:5.2f}x as stored"
        )
    if stock_real is not None:
        print(
            f"{'bf16 stock':12s} {stock_real['real_per_frame_s']:8.3f}s "
            f"{stock_real['real_vocoder_s']:7.2f}s {'-':>7s} {stock_real['real_e2e_s']:6.1f}s "
            f"{stock_real['real_e2e_s'] / stock_real['real_audio_s']:6.2f}  "
            "(VOICEFOUNDRY_FAST_CPU=0: reference BLAS, stored dtype)"
        )
    if peer is not None:
        print(
            f"{'qwen-tts':12s} {peer['per_frame_s']:8.3f}s {peer['vocoder_s']:7.2f}s {'-':>7s} "
            f"{peer['e2e_s']:6.1f}s {peer['e2e_s'] / peer['audio_s']:6.2f} "
            f"{_steady_rtf(peer):6.2f}  (official, torch "
            f"{peer['torch']} CPU fp32, {peer['threads']} threads, greedy, bf16 checkpoint; "
            f"{peer['frames']:.0f} frames; load {peer['load_s']:.1f}s)"
        )
        print("\nratio to the official qwen-tts (theirs / ours: > 1 means voicefoundry is faster)")
        peer_rtf = peer["e2e_s"] / peer["audio_s"]
        for name, r in results.items():
            print(
                f"{name:12s} per frame {peer['per_frame_s'] / r['per_frame_s']:5.2f}x  "
                f"served {peer['per_frame_s'] / r['served_per_frame_s']:5.2f}x  "
                f"vocoder {peer['vocoder_s'] / r['vocoder_s']:5.2f}x  "
                f"end to end (RTF) {peer_rtf / (r['e2e_s'] / r['audio_s']):5.2f}x"
            )
    frames_made = {name: int(r["frames"]) for name, r in results.items()}
    print(f"frames made per format (after the 2 of the short run): {frames_made}")
    if not args.no_shapes:
        shapes_table()


ROWS = [
    ("matmul_gflops", "fp32 matmul 1024^3 (GFLOP/s, higher is better)", True),
    ("tiny_e2e_s", "tiny model: 2 s of audio + 2 frames, end to end (s)", False),
    ("tiny_vocoder_s", "tiny model: vocoder for 2 s (s)", False),
    ("tiny_per_frame_s", "tiny model: talker + code predictor per frame (s)", False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-format", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-peer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-shapes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--real-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--real", action="store_true", help="the real 0.6B shape per format")
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per real-shape run")
    parser.add_argument(
        "--stock-real",
        action="store_true",
        help="also the real shape (bf16) with the fast paths off (reference BLAS: minutes)",
    )
    parser.add_argument("--work", type=Path, help="keep / reuse the real-shape checkpoints here")
    parser.add_argument("--no-peer", action="store_true", help="skip the official qwen-tts")
    parser.add_argument("--no-shapes", action="store_true", help="skip the per-shape table")
    parser.add_argument("--shapes", action="store_true", help="only the per-shape table")
    parser.add_argument(
        "--no-tiny", action="store_true", help="with --real: skip the tiny stock-vs-optimised table"
    )
    parser.add_argument(
        "--formats-only", action="store_true", help="only the real shape's load / memory table"
    )
    parser.add_argument("--preset", default="real-0.6b", help=argparse.SUPPRESS)  # smoke runs
    parser.add_argument("--skip-stock-real", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.child_format is not None:
        child_format(args.child_format, args.frames)
        return
    if args.child_peer is not None:
        child_peer(args.child_peer, args.frames)
        return
    if args.child_shapes:
        child_shapes()
        return
    if args.shapes:
        shapes_table()
        return
    if args.formats_only:
        import bench_formats

        bench_formats.run(args.preset)
        return

    if args.real and args.no_tiny:
        run_real(args, None)
        return

    import finetune  # noqa: F401
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        tiny = make_tiny_qwen3_tts(Path(tmp) / "tiny", seed=0)
        real = None
        if args.real and args.stock_real:
            real = make_tiny_qwen3_tts(Path(tmp) / "real", seed=0, preset="real-0.6b")
        stock = run_side(False, tiny, real, args.frames)
        fast = run_side(True, tiny, None, args.frames)

    print(f"\n{'metric':58s} {'stock':>10s} {'optimised':>10s} {'ratio':>8s}")
    for key, label, higher_better in ROWS:
        s, f = stock[key], fast[key]
        ratio = f / s if higher_better else s / f
        print(f"{label:58s} {s:10.3f} {f:10.3f} {ratio:7.1f}x")
    for side, data in (("stock", stock), ("optimised", fast)):
        print(f"RTF tiny ({side}): {data['tiny_e2e_s'] / data['tiny_audio_s']:.2f}")
    if args.real:
        run_real(args, stock if real is not None else None)


if __name__ == "__main__":
    main()
