"""CSM: 4 rows batched in one forward per frame vs the same 4 one after another.

Measured side by side in one run, interleaved (each repeat runs every variant once, in rotating
order), through the served model (`server.engine.families.csm.CsmModel`, Mimi audio included):

- batched: `run([4 rows])`, one backbone + depth-decoder forward per frame for all 4;
- one by one: `run([row])` four times (the same code with one row);
- before: the engine's previous CSM path, rows one after another through
  `generate.iter_frames` (mlx-audio's `generate_frame`) and the shared Mimi streaming decoder;
- batched fp32 (bf16 checkpoints: `wide`, `real-1b`): batched with every weight cast to fp32,
  beside the served model, whose Linear layers stay bf16 on CPU (finetune/runtime/half.py).

Presets: `tiny` (the test model, fp32), `wide` (defined here: a 1024-wide 8-layer backbone, a
512-wide 4-layer depth decoder, 32 codebooks and the real Mimi's sizes, so the depth decoder
dominates a frame as in the real model; bf16) and `real-1b` (Sesame's real shape: ~6 GB in fp32,
minutes to build). Random weights never say EOS, so every row makes `--frames` frames.

    python tests/bench/bench_csm.py [--presets tiny,wide] [--frames 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

REQUESTS = [  # (text, speaker, seed): prompts of different lengths
    ("The quick brown fox jumps over the lazy dog.", 0, 1),
    ("Hello there.", 1, 2),
    ("A somewhat longer sentence, to give this prompt a few more rows.", 0, 3),
    ("Good morning.", 1, 4),
]


def _wide_preset() -> None:
    from finetune.families.csm.tiny import PRESETS, Dims, Llama

    PRESETS.setdefault(
        "wide",
        Dims(
            backbone=Llama(
                hidden=1024, intermediate=4096, layers=8, heads=16, kv_heads=4, head_dim=64
            ),
            decoder=Llama(
                hidden=512, intermediate=2048, layers=4, heads=8, kv_heads=2, head_dim=64
            ),
            num_codebooks=32,
            mimi={},
            dtype="bfloat16",  # stored as Sesame's checkpoint is
        ),
    )


def _rows(model, frames: int) -> list:
    from finetune.families.csm.generate import prompt_frames
    from finetune.sampling import Sampling

    from server.engine.families.csm import CsmRow

    return [
        CsmRow(
            prompt=prompt_frames(model.loaded, text, speaker),
            sampling=Sampling(temperature=0.9, top_k=50, max_tokens=frames),
            seed=seed,
            slot=0,
            cancel=threading.Event(),
        )
        for text, speaker, seed in REQUESTS
    ]


def _before(model, frames: int) -> list:
    """The previous engine path: each request alone through mlx-audio's frame step."""
    from finetune.families.csm.generate import iter_frames

    import mlx.core as mx
    import numpy as np

    out = []
    decoder = model.loaded.model._streaming_decoder
    for text, speaker, seed in REQUESTS:
        decoder.reset()
        codes = []
        for frame in iter_frames(
            model.loaded, text, speaker=speaker, seed=seed, max_audio_frames=frames
        ):
            pcm = decoder.decode_frames(mx.array(frame[:, None])[None])
            np.asarray(pcm)
            codes.append(frame)
        out.append(np.stack(codes))
    return out


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _parameter_mib(model) -> float:
    from finetune.arrays import flat_items

    return sum(v.nbytes for _, v in flat_items(model.loaded.model.parameters())) / 2**20


def bench_preset(preset: str, frames: int, repeats: int, work: Path) -> None:
    from finetune.families.csm.tiny import make_tiny_csm
    from finetune.runtime.half import KEEP_BF16_ENV, CpuBf16Linear

    import numpy as np

    from server.engine.families.csm import CsmModel

    path = work / f"csm_{preset}"
    if not path.exists():
        start = time.perf_counter()
        make_tiny_csm(path, seed=0, preset=preset)
        print(f"[{preset}] built the random checkpoint in {time.perf_counter() - start:.1f} s")
    model = CsmModel.load(f"csm-{preset}", str(path), slots=4, max_rank=8, max_bytes=1 << 26)
    peak_after_served = _peak_rss_mib()
    # A bf16 checkpoint is served with its Linear layers kept bf16 on CPU; beside it, the same
    # checkpoint with every weight cast to fp32 (the switch that turns keeping off).
    fp32_model = None
    if any(isinstance(m, CpuBf16Linear) for _, m in model.loaded.model.named_modules()):
        os.environ[KEEP_BF16_ENV] = "0"
        try:
            fp32_model = CsmModel.load(
                f"csm-{preset}-fp32", str(path), slots=4, max_rank=8, max_bytes=1 << 26
            )
        finally:
            del os.environ[KEEP_BF16_ENV]
    codes: dict[str, list] = {}

    def batched() -> None:
        rows = _rows(model, frames)
        model.run(rows)
        codes["batched"] = [np.stack(r.frames) for r in rows]

    def one_by_one() -> None:
        rows = _rows(model, frames)
        for row in rows:
            model.run([row])
        codes["one by one"] = [np.stack(r.frames) for r in rows]

    def before() -> None:
        codes["before"] = _before(model, frames)

    def batched_fp32() -> None:
        assert fp32_model is not None
        rows = _rows(fp32_model, frames)
        fp32_model.run(rows)
        codes["batched fp32"] = [np.stack(r.frames) for r in rows]

    variants: dict[str, Callable[[], None]] = {
        "batched": batched,
        "one by one": one_by_one,
        "before": before,
    }
    if fp32_model is not None:
        variants["batched fp32"] = batched_fp32
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    audio_s = len(REQUESTS) * frames / 12.5
    print(f"[{preset}] 4 rows x {frames} frames ({audio_s:.1f} s of audio), {repeats} repeats:")
    for name in names:
        spread = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"  {name:11s} median {median[name]:7.3f} s  (runs: {spread})")
    print(f"  batched vs one by one: {median['one by one'] / median['batched']:.2f}x faster")
    print(f"  batched vs before:     {median['before'] / median['batched']:.2f}x faster")
    same = all(
        np.array_equal(a, b) for a, b in zip(codes["batched"], codes["one by one"], strict=True)
    )
    also = all(np.array_equal(a, b) for a, b in zip(codes["batched"], codes["before"], strict=True))
    print(f"  codes: batched == one by one: {same}; batched == before: {also}")
    if fp32_model is not None:
        half = median["batched fp32"] / median["batched"]
        equal = all(
            np.array_equal(a, b)
            for a, b in zip(codes["batched"], codes["batched fp32"], strict=True)
        )
        print(f"  bf16 layers kept vs every weight fp32 (batched): {half:.2f}x faster")
        sizes = [_parameter_mib(m) for m in (model, fp32_model)]
        print(
            f"  parameters: {sizes[0]:.0f} MiB served vs {sizes[1]:.0f} MiB fp32; peak RSS "
            f"after loading the served model (before the fp32 one) {peak_after_served:.0f} MiB"
        )
        print(f"  codes: bf16 layers kept == every weight fp32: {equal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,wide")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="where checkpoints are built (kept)")
    args = parser.parse_args()
    import finetune  # noqa: F401  (the BLAS preload, before mlx)

    _wide_preset()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} (shared machine)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for preset in args.presets.split(","):
            bench_preset(preset.strip(), args.frames, args.repeats, work)


if __name__ == "__main__":
    main()
