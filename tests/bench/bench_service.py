"""The speech service on the tiny model, measured side by side in one run.

Printed: server overhead vs direct in-process generation (ratio, goal <= 1.10), time to first
audio byte when streaming, adapter hot-load latency next to the time to read the adapter file,
aggregate throughput of 8 concurrent requests over 8 different adapters vs the same 8 one after
another (goal >= 3x), and the server's RSS after 200 streamed requests vs after 20 (goal: flat).

    python tests/bench/bench_service.py [--frames 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEXT = "The quick brown fox jumps over the lazy dog."


def direct_child(model: str, package: str, ref: str, frames: int, repeats: int) -> None:
    """In-process generation with the same base model, voice and adapter (fused)."""
    import finetune  # noqa: F401
    from finetune.audio import load_audio
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    import mlx.core as mx
    import numpy as np

    from server.engine.bank import AdapterTensors
    from server.engine.models import EngineModel

    engine_model = EngineModel.load("tiny", model, slots=4, max_rank=32, max_bytes=1 << 30)
    start = time.perf_counter()
    tensors = AdapterTensors.read(Path(package) / "adapter")
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    engine_model.bank.ensure(tensors)
    install_s = time.perf_counter() - start

    loaded = load_qwen3_tts(model)
    wav = mx.array(load_audio(Path(ref), 24_000))
    list(loaded.model.generate(TEXT, ref_audio=wav, max_tokens=2))
    times = []
    for i in range(repeats):
        mx.random.seed(i)
        start = time.perf_counter()
        result = list(loaded.model.generate(TEXT, ref_audio=wav, max_tokens=frames))
        np.asarray(result[0].audio)
        times.append(time.perf_counter() - start)
    print(
        json.dumps({"direct_s": statistics.median(times), "read_s": read_s, "install_s": install_s})
    )


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def bench_server(url: str, frames: int, repeats: int, names: list[str]) -> dict:
    import httpx

    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        body = {"speaker": names[0], "text": TEXT, "max_tokens": frames}
        await client.post("/speak", json={**body, "max_tokens": 2})
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            r = await client.post("/speak", json={**body, "seed": i})
            r.raise_for_status()
            times.append(time.perf_counter() - start)
        out["server_s"] = statistics.median(times)

        ttfb = []
        for i in range(repeats):
            start = time.perf_counter()
            async with client.stream(
                "POST", "/speak", json={**body, "seed": i, "stream": True, "format": "pcm"}
            ) as r:
                first = True
                async for chunk in r.aiter_bytes():
                    if chunk and first:
                        ttfb.append(time.perf_counter() - start)
                        first = False
        out["ttfb_s"] = statistics.median(ttfb)

        bodies = [
            {"speaker": n, "text": TEXT, "max_tokens": frames, "seed": i}
            for i, n in enumerate(names)
        ]
        start = time.perf_counter()
        for b in bodies:
            (await client.post("/speak", json=b)).raise_for_status()
        out["sequential_s"] = time.perf_counter() - start
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/speak", json=b) for b in bodies))
        for r in responses:
            r.raise_for_status()
        out["concurrent_s"] = time.perf_counter() - start
    return out


async def stream_many(url: str, name: str, count: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(count):
            async with client.stream(
                "POST",
                "/speak",
                json={
                    "speaker": name,
                    "text": "Short.",
                    "stream": True,
                    "format": "pcm",
                    "max_tokens": 3,
                    "seed": i,
                },
            ) as r:
                async for _ in r.aiter_bytes():
                    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--direct-child", nargs=3)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.direct_child:
        direct_child(*args.direct_child, args.frames, args.repeats)
        return

    import httpx

    from server.voices import pack_directory
    from tests.service_helpers import server_process

    with tempfile.TemporaryDirectory(prefix="vf-bench-svc-") as tmp:
        work = Path(tmp)
        from server.demo import _build_demo_package, ensure_demo_model

        model = ensure_demo_model(work)
        package = _build_demo_package(work / "demo", work)
        ref = package / "ref.wav"
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--direct-child",
                str(model),
                str(package),
                str(ref),
                "--frames",
                str(args.frames),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        direct = json.loads(proc.stdout.strip().splitlines()[-1])

        settings = {
            "data_dir": str(work / "data"),
            "models": {"tiny": {"path": str(model)}},
            "max_batch": 8,
            "adapter_slots": 10,
            "max_queue": 64,
        }
        names = [f"voice{i}" for i in range(8)]
        with server_process(settings) as url:
            for name in names:
                files = {
                    "package": ("p.tar.gz", pack_directory(package), "application/gzip"),
                    "ref_clip": ("ref.wav", ref.read_bytes(), "audio/wav"),
                }
                httpx.post(
                    f"{url}/voices/import", files=files, data={"name": name}, timeout=120
                ).raise_for_status()
            served = asyncio.run(bench_server(url, args.frames, args.repeats, names))
            pid = int(
                subprocess.run(
                    ["pgrep", "-f", f"settings-{url.rsplit(':', 1)[1]}"],
                    capture_output=True,
                    text=True,
                ).stdout.split()[0]
            )
            asyncio.run(stream_many(url, names[0], 20))
            rss_20 = rss_kb(pid)
            asyncio.run(stream_many(url, names[0], 180))
            rss_200 = rss_kb(pid)

    audio_s = args.frames / 12.5
    print(
        f"tiny model, {args.frames} frames ({audio_s:.1f} s of audio) a request, "
        f"median of {args.repeats}"
    )
    print(f"direct in-process generation      {direct['direct_s']:8.3f} s")
    print(
        f"through the server (/speak, wav)  {served['server_s']:8.3f} s   "
        f"overhead ratio {served['server_s'] / direct['direct_s']:.2f} (goal <= 1.10)"
    )
    print(f"time to first audio byte (stream) {served['ttfb_s']:8.3f} s")
    print(f"adapter file read                 {direct['read_s'] * 1000:8.1f} ms")
    print(f"adapter hot-load into the bank    {direct['install_s'] * 1000:8.1f} ms")
    print(f"8 requests / 8 adapters, one after another {served['sequential_s']:8.2f} s")
    print(
        f"8 requests / 8 adapters, concurrently      {served['concurrent_s']:8.2f} s   "
        f"throughput x{served['sequential_s'] / served['concurrent_s']:.2f} (goal >= 3x)"
    )
    print(f"server RSS after 20 streamed requests  {rss_20 / 1024:8.1f} MiB")
    print(
        f"server RSS after 200 streamed requests {rss_200 / 1024:8.1f} MiB   "
        f"ratio {rss_200 / max(rss_20, 1):.3f} (goal: flat)"
    )


if __name__ == "__main__":
    main()
