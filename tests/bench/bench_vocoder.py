"""Qwen3-TTS vocoder, streamed: the ways to turn 8 rows' frames into audio, side by side.

Each row makes `--chunks` chunks of `--chunk` frames (the server's stream_chunk_frames is 6),
as 8 concurrent requests do. Measured in one run, interleaved (each repeat runs every variant
once), through the real loader on a checkpoint of the preset's shape (random weights):

- streamed, batched: `StreamingVocoder.decode` with the 8 rows' chunks in one pass (the
  server's default);
- streamed, one by one: the same streams, one pass per row (VOICEFOUNDRY_VOCODER_BATCH=0);
- re-decode (the engine before streaming-first): each chunk decoded again with up to 25 frames
  of left context, no state carried, one row at a time;
- one-shot: each row's whole segment decoded once at its end (no streaming at all: the lower
  bound on the decoder's work, but no audio before the segment ends).

Also printed: the largest difference between a streamed row and its one-shot decode (full
scale is 1.0). Presets: `tiny` (the test model: its decoder is 1152 wide at 128 latent) and
`real-0.6b` (the released decoder's shape; minutes to build, ~2.5 GB).

    python tests/bench/bench_vocoder.py [--presets tiny,real-0.6b] [--chunk 6] [--chunks 4]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ROWS = 8
CONTEXT = 25  # the re-decode path's left context, as the engine had it


def _checkpoint(preset: str, folder: Path) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    return make_tiny_qwen3_tts(folder / preset, seed=0, preset=preset)


def run_preset(preset: str, args: argparse.Namespace, folder: Path) -> None:
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.vocoder_stream import StreamingVocoder

    import mlx.core as mx
    import numpy as np

    started = time.perf_counter()
    loaded = load_qwen3_tts(_checkpoint(preset, folder))
    tokenizer = loaded.model.speech_tokenizer
    decoder = tokenizer.decoder
    vocoder = StreamingVocoder(decoder, tokenizer.decode_upsample_rate)
    print(f"\n{preset}: built and loaded in {time.perf_counter() - started:.0f} s")
    size = args.chunk
    frames = args.chunk * args.chunks
    rng = np.random.default_rng(0)
    codes = [rng.integers(1, 2048, (frames, 16)).astype(np.int32) for _ in range(ROWS)]

    def one_shot(c: np.ndarray) -> np.ndarray:
        wav = decoder(mx.array(c)[None].transpose(0, 2, 1))
        return np.array(wav[0, 0], dtype=np.float32)

    def batched() -> list[np.ndarray]:
        streams = [vocoder.open() for _ in codes]
        parts: list[list[np.ndarray]] = [[] for _ in codes]
        for k in range(args.chunks):
            chunk = [(s, c[k * size : (k + 1) * size]) for s, c in zip(streams, codes, strict=True)]
            for out, audio in zip(parts, vocoder.decode(chunk), strict=True):
                out.append(audio)
        return [np.concatenate(p) for p in parts]

    def one_by_one() -> list[np.ndarray]:
        streams = [vocoder.open() for _ in codes]
        parts: list[list[np.ndarray]] = [[] for _ in codes]
        for k in range(args.chunks):
            for s, c, out in zip(streams, codes, parts, strict=True):
                out.append(vocoder.decode([(s, c[k * size : (k + 1) * size])])[0])
        return [np.concatenate(p) for p in parts]

    def re_decode() -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in codes]
        for k in range(args.chunks):
            for c, out in zip(codes, parts, strict=True):
                context = min(k * size, CONTEXT)
                audio = one_shot(c[k * size - context : (k + 1) * size])
                out.append(audio[context * vocoder.upsample :])
        return [np.concatenate(p) for p in parts]

    def whole() -> list[np.ndarray]:
        return [one_shot(c) for c in codes]

    variants: dict[str, Callable[[], list[np.ndarray]]] = {
        "streamed, batched": batched,
        "streamed, one by one": one_by_one,
        "re-decode with context": re_decode,
        "one-shot at the end": whole,
    }
    outputs = {label: fn() for label, fn in variants.items()}  # warm-up, and the audio
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    audio_s = ROWS * frames / 12.5
    best = {label: min(t) for label, t in times.items()}
    print(
        f"{ROWS} rows x {args.chunks} chunks of {size} frames ({audio_s:.1f} s of audio), "
        f"best of {args.repeats}:"
    )
    for label, seconds in best.items():
        ratio = seconds / best["streamed, batched"]
        print(
            f"  {label:24s} {seconds:7.3f} s  RTF {seconds / audio_s:.3f}  x{ratio:.2f} of batched"
        )
    reference = outputs["one-shot at the end"]
    for label in ("streamed, batched", "streamed, one by one", "re-decode with context"):
        diff = max(
            float(np.abs(a - b).max()) for a, b in zip(outputs[label], reference, strict=True)
        )
        print(f"  {label:24s} largest difference to one-shot: {diff:.2e}")


def main() -> None:
    import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,real-0.6b")
    parser.add_argument("--chunk", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with open("/proc/loadavg") as handle:
        print("load average at start:", handle.read().split()[:3])
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            run_preset(preset, args, Path(tmp))
    with open("/proc/loadavg") as handle:
        print("load average at end:", handle.read().split()[:3])


if __name__ == "__main__":
    main()
