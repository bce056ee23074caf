"""The speech service, both engine schedulers side by side in one run.

Two servers run at once, one per `engine_scheduler` ("continuous": iteration-level, a request
joins the running batch at the next decode step; "rounds": the round-based engine kept to
measure against), each serving the same two random checkpoints with the same 8 voices per
checkpoint (trained LoRA adapter + baked speaker row, imported 8 times: 8 adapters in the bank).
Measurements alternate between the servers (and the direct reference) so the machine's load
falls on both alike. Printed, with the goal and the ratio beside each figure:

- server overhead: a /speak request vs mlx-audio's own generate in-process on the same voice
  exported with its adapter fused (goal <= 1.10), on the tiny model and on the wide preset;
- time to first streamed byte, p50 / p95, with 1 and with 8 concurrent streaming clients (tiny);
- 8 requests over 8 adapters, concurrently vs one after another, on the wide preset (real 0.6B
  widths, fewer layers: see service_models.py; the talker's share of a request is printed),
  goal >= 4x;
- `--requests` requests at random times over `--window` s (uniform arrival times for a fixed
  count: a Poisson process given its count; fixed seed; lengths 0.5x / 1x / 2x `--poisson-frames`):
  p50 / p95 latency, and the rows per decode step from /metrics before and after;
- the server's RSS after 200 streamed requests vs after 20 (goal: flat).

    python tests/bench/bench_service.py [--frames 25] [--wide-frames 8] [--requests 16]
        [--preset wide] [--poisson-model tiny|wide] [--poisson-frames 12]
        [--ttfb-rounds 1] [--repeats 3] [--cache DIR] [--fresh]
    python tests/bench/bench_service.py --adapters-only --preset real-0.6b [--wide-frames 8]
        [--scheduler continuous|rounds]     (block 3 alone, one server: a real-size preset)

Checkpoints, voice packages and fused exports are built once into `--cache` and reused (their
build time is printed when they are built). The machine is shared: the load average is printed
at the start and the end; read the figures with it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_models import TEXT, Built, DirectChild, build  # noqa: E402

SCHEDULERS = ("continuous", "rounds")
VOICES = [f"voice{i}" for i in range(8)]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 16 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def samples(wav: bytes) -> int:
    import soundfile as sf

    return int(sf.info(io.BytesIO(wav)).frames)


class Server:
    def __init__(self, scheduler: str, url: str, pid: int) -> None:
        self.scheduler, self.url, self.pid = scheduler, url, pid

    def body(self, model: str, voice: str, frames: int, seed: int, **extra: Any) -> dict:
        return {
            "speaker": f"{model}-{voice}",
            "text": TEXT,
            "max_tokens": frames,
            "seed": seed,
            **extra,
        }

    async def speak(self, client: Any, body: dict) -> tuple[float, int]:
        start = time.perf_counter()
        r = await client.post(f"{self.url}/speak", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, samples(r.content)

    async def first_byte(self, client: Any, body: dict) -> float:
        start = time.perf_counter()
        ttfb = math.nan
        async with client.stream(
            "POST", f"{self.url}/speak", json={**body, "stream": True, "format": "pcm"}
        ) as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes():
                if chunk and math.isnan(ttfb):
                    ttfb = time.perf_counter() - start
        return ttfb

    async def metrics(self, client: Any) -> dict[str, dict[int, float]]:
        text = (await client.get(f"{self.url}/metrics")).text
        out: dict[str, dict[int, float]] = {"step": {}, "round": {}}
        for kind, pattern in (
            ("step", r'voicefoundry_engine_step_rows_total\{rows="(\d+)"\} (\S+)'),
            ("round", r'voicefoundry_batch_size_total\{size="(\d+)"\} (\S+)'),
        ):
            for rows, n in re.findall(pattern, text):
                out[kind][int(rows)] = float(n)
        return out


def occupancy(before: dict[int, float], after: dict[int, float]) -> tuple[float, int]:
    """Mean rows per counted event (decode step / round) between two snapshots, and events."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    events = sum(delta.values())
    if events <= 0:
        return math.nan, 0
    return sum(k * n for k, n in delta.items()) / events, int(events)


async def import_voices(servers: list[Server], models: dict[str, Built]) -> None:
    import httpx

    from server.voices import pack_directory

    async with httpx.AsyncClient(timeout=600) as client:
        for model, built in models.items():
            package = pack_directory(built.package)
            for server in servers:
                for voice in VOICES:
                    files = {
                        "package": ("p.tar.gz", package, "application/gzip"),
                        "ref_clip": ("ref.wav", built.ref.read_bytes(), "audio/wav"),
                    }
                    r = await client.post(
                        f"{server.url}/voices/import",
                        files=files,
                        data={"name": f"{model}-{voice}", "base_model": model},
                    )
                    r.raise_for_status()
        # Every adapter loaded into its bank before anything is timed.
        for model in models:
            for server in servers:
                await asyncio.gather(
                    *(server.speak(client, server.body(model, v, 2, 0)) for v in VOICES)
                )


def order(servers: list[Server], i: int) -> list[Server]:
    return servers if i % 2 == 0 else servers[::-1]


async def measure(
    servers: list[Server], direct: DirectChild, args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    res: dict[str, Any] = {s.scheduler: {} for s in servers}
    res["direct"] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=1200, limits=limits) as client:
        # 1. overhead on the tiny model: direct, then each server, alternating.
        phase("[1/5] server overhead (tiny)")
        times: dict[str, list[float]] = {s.scheduler: [] for s in servers}
        lengths: dict[str, set[int]] = {s.scheduler: set() for s in servers}
        direct_t, direct_len = [], set()
        for i in range(args.repeats):
            d = direct.run("tiny", args.frames, i)
            direct_t.append(d["s"])
            direct_len.add(d["samples"])
            for s in order(servers, i):
                t, n = await s.speak(client, s.body("tiny", VOICES[0], args.frames, i))
                times[s.scheduler].append(t)
                lengths[s.scheduler].add(n)
        res["direct"]["tiny"] = statistics.median(direct_t)
        res["direct"]["tiny_samples"] = sorted(direct_len)
        for s in servers:
            res[s.scheduler]["tiny"] = statistics.median(times[s.scheduler])
            res[s.scheduler]["tiny_samples"] = sorted(lengths[s.scheduler])

        # 2. time to first byte, 1 and 8 streaming clients (tiny).
        phase("[2/5] time to first streamed byte (tiny)")
        one: dict[str, list[float]] = {s.scheduler: [] for s in servers}
        eight: dict[str, list[float]] = {s.scheduler: [] for s in servers}
        for i in range(max(2 * args.repeats, 6)):
            for s in order(servers, i):
                body = s.body("tiny", VOICES[i % 8], args.frames, 100 + i)
                one[s.scheduler].append(await s.first_byte(client, body))
        for i in range(args.ttfb_rounds):
            for s in order(servers, i):
                bodies = [
                    s.body("tiny", v, args.frames, 200 + 8 * i + k) for k, v in enumerate(VOICES)
                ]
                eight[s.scheduler] += await asyncio.gather(
                    *(s.first_byte(client, b) for b in bodies)
                )
        for s in servers:
            res[s.scheduler]["ttfb1"] = one[s.scheduler]
            res[s.scheduler]["ttfb8"] = eight[s.scheduler]

        # 3. 8 requests over 8 adapters on the wide preset, ABBA around the direct reference.
        phase(f"[3/5] 8 adapters, concurrent vs one after another ({args.preset})")
        await adapter_block(client, servers, direct, args, res)

        # 4. random arrivals: the same schedule against each server in turn.
        model = args.poisson_model
        phase(f"[4/5] {args.requests} requests at random times over {args.window:g} s ({model})")
        rng = random.Random(args.seed)
        base = args.poisson_frames
        arrivals = sorted(rng.uniform(0, args.window) for _ in range(args.requests))
        sizes = [max(2, int(base * rng.choice((0.5, 1.0, 2.0)))) for _ in arrivals]
        res["poisson"] = {"arrivals": arrivals, "sizes": sizes}
        for s in order(servers, 1):
            before = await s.metrics(client)
            start = time.perf_counter()

            async def one_request(k: int, s: Server = s, start: float = start) -> float:
                await asyncio.sleep(max(0.0, start + arrivals[k] - time.perf_counter()))
                sent = time.perf_counter()
                await s.speak(client, s.body(model, VOICES[k % 8], sizes[k], 300 + k))
                return time.perf_counter() - sent

            latency = await asyncio.gather(*(one_request(k) for k in range(len(arrivals))))
            res[s.scheduler]["poisson_wall"] = time.perf_counter() - start
            after = await s.metrics(client)
            res[s.scheduler]["latency"] = list(latency)
            res[s.scheduler]["step_occ"] = occupancy(before["step"], after["step"])
            res[s.scheduler]["round_occ"] = occupancy(before["round"], after["round"])

        # 5. RSS after 20 and after 200 streamed requests (4 clients per server, both at once).
        phase(f"[5/5] RSS after 20 and {args.rss_requests} streamed requests")

        async def stream_many(s: Server, count: int, offset: int) -> None:
            async def client_loop(c: int) -> None:
                for i in range(c, count, 4):
                    body = s.body("tiny", VOICES[i % 8], 3, offset + i, text="Short.")
                    await s.first_byte(client, body)

            await asyncio.gather(*(client_loop(c) for c in range(4)))

        await asyncio.gather(*(stream_many(s, 20, 0) for s in servers))
        for s in servers:
            res[s.scheduler]["rss20"] = rss_kb(s.pid)
        await asyncio.gather(*(stream_many(s, args.rss_requests - 20, 20) for s in servers))
        for s in servers:
            res[s.scheduler]["rss200"] = rss_kb(s.pid)
    phase("done")
    return res


async def adapter_block(
    client: Any,
    servers: list[Server],
    direct: DirectChild,
    args: argparse.Namespace,
    res: dict[str, Any],
) -> None:
    """8 requests over 8 adapters, one after another and concurrently, on each server (the
    second server in the opposite order; one server: twice, ABBA), around runs of the direct
    reference."""
    wide_direct = [direct.run("wide", args.wide_frames, 0, profile=True)]
    first, second = servers[0], servers[-1]
    for step, s in enumerate([first, second]):
        bodies = [s.body("wide", v, args.wide_frames, k) for k, v in enumerate(VOICES)]

        async def sequential(s: Server = s, bodies: list = bodies) -> None:
            start = time.perf_counter()
            each = [await s.speak(client, b) for b in bodies]
            res[s.scheduler]["seq_s"] = time.perf_counter() - start
            res[s.scheduler].setdefault("seq_runs", []).append(res[s.scheduler]["seq_s"])
            res[s.scheduler]["seq_each"] = [t for t, _ in each]
            res[s.scheduler]["seq_samples"] = sorted({n for _, n in each})

        async def concurrent(s: Server = s, bodies: list = bodies) -> None:
            start = time.perf_counter()
            each = await asyncio.gather(*(s.speak(client, b) for b in bodies))
            res[s.scheduler]["conc_s"] = time.perf_counter() - start
            res[s.scheduler].setdefault("conc_runs", []).append(res[s.scheduler]["conc_s"])
            res[s.scheduler]["conc_samples"] = sorted({n for _, n in each})

        if step == 0:
            await sequential()
            await concurrent()
        else:
            await concurrent()
            await sequential()
        wide_direct.append(direct.run("wide", args.wide_frames, 1 + step))
    res["direct"]["wide"] = statistics.median(d["s"] for d in wide_direct)
    res["direct"]["wide_vocoder_share"] = wide_direct[0]["vocoder_s"] / wide_direct[0]["s"]
    res["direct"]["wide_samples"] = sorted({d["samples"] for d in wide_direct})


def adapters_only(args: argparse.Namespace, start_load: str) -> None:
    """Only block 3, on one server (`--scheduler`) serving only `--preset`: a real-size preset
    with the direct reference beside it fits in memory where two servers of it do not."""
    from tests.service_helpers import SERVER_PIDS, server_process

    built, took = build(args.preset, Path(args.cache) / args.preset)
    print(f"{args.preset}: " + (f"built in {took:.0f} s" if took else "reused"), flush=True)
    with tempfile.TemporaryDirectory(prefix="vf-bench-svc-") as tmp:
        settings = {
            "data_dir": str(Path(tmp) / "data"),
            "models": {"wide": {"path": str(built.model)}},
            "max_batch": 8,
            "adapter_slots": 10,
            "max_queue": 64,
            "engine_scheduler": args.scheduler,
        }
        with server_process(settings, timeout=900) as url:
            server = Server(args.scheduler, url, SERVER_PIDS[url])
            asyncio.run(import_voices([server], {"wide": built}))
            direct = DirectChild({"wide": (str(built.export), built.language)})

            async def run() -> dict[str, Any]:
                import httpx

                res: dict[str, Any] = {args.scheduler: {}, "direct": {}}
                async with httpx.AsyncClient(timeout=3600) as client:
                    await adapter_block(client, [server], direct, args, res)
                res[args.scheduler]["rss_kb"] = rss_kb(server.pid)
                return res

            try:
                res = asyncio.run(run())
            finally:
                direct.close()
    mine, d = res[args.scheduler], res["direct"]
    print(f"\nat start: {start_load}\nat end:   {load()}")
    print(
        f"8 requests over 8 adapters ({args.preset}, {args.wide_frames} frames, "
        f"{args.wide_frames / 12.5:.2f} s of audio each; {args.scheduler} engine)"
    )
    seq, conc = mine["seq_runs"], mine["conc_runs"]
    print(f"  one after another   {', '.join(f'{t:.2f} s' for t in seq)}")
    print(f"  concurrently        {', '.join(f'{t:.2f} s' for t in conc)}")
    ratios = [a / b for a, b in zip(seq, conc, strict=True)]  # ABBA: neighbours paired
    print(f"  throughput ratio    {', '.join(f'x{r:.2f}' for r in ratios)}   goal >= 4x")
    each = statistics.median(mine["seq_each"])
    print(
        f"  server overhead     {each:.2f} s a request alone vs direct {d['wide']:.2f} s: "
        f"{each / d['wide']:.2f}   goal <= 1.10"
    )
    print(
        f"  vocoder share of a direct request {100 * d['wide_vocoder_share']:.0f} %; samples "
        f"direct {d['wide_samples']}, server {mine['seq_samples']} / {mine['conc_samples']}; "
        f"server RSS {mine['rss_kb'] / 1024:.0f} MiB"
    )


_PHASE: list[float] = []


def phase(label: str) -> None:
    """Print `label`, and the seconds the previous phase took (with the load now)."""
    now = time.perf_counter()
    took = f" (previous phase {now - _PHASE[-1]:.0f} s; {load()})" if _PHASE else ""
    _PHASE.append(now)
    print(f"{label}{took}", flush=True)


def report(res: dict[str, Any], args: argparse.Namespace, start_load: str) -> None:
    c, r, d = res["continuous"], res["rounds"], res["direct"]
    tiny_audio = args.frames / 12.5
    wide_audio = args.wide_frames / 12.5

    def row(label: str, cv: str, rv: str, goal: str = "") -> None:
        print(f"{label:46s} {cv:>16s} {rv:>16s}   {goal}")

    def overhead_rows(direct: float, continuous: float, rounds: float) -> None:
        row("  direct in-process", f"{direct:.3f} s", f"{direct:.3f} s")
        row("  /speak (wav)", f"{continuous:.3f} s", f"{rounds:.3f} s")
        ratios = f"{continuous / direct:.2f}", f"{rounds / direct:.2f}"
        row("  server / direct", *ratios, "goal <= 1.10")

    print()
    print(f"at start: {start_load}")
    print(f"at end:   {load()}")
    print(
        "(shared 2-core machine with other people's processes: absolute seconds move with "
        "the load; ratios are of runs interleaved in this one run)"
    )
    print()
    row("", "continuous", "rounds", "goal / ratio")
    print("-" * 110)
    print(
        f"server overhead, median of {args.repeats} (tiny, {args.frames} frames, "
        f"{tiny_audio:.1f} s of audio); direct = mlx-audio generate, adapter fused, in-process"
    )
    overhead_rows(d["tiny"], c["tiny"], r["tiny"])
    print(
        f"  samples made: direct {d['tiny_samples']}, continuous {c['tiny_samples']}, "
        f"rounds {r['tiny_samples']}"
    )
    print(
        f"server overhead ({args.preset}, {args.wide_frames} frames); server = median of the "
        "8 one-after-another requests of the next block, direct = median of 3"
    )
    c_w, r_w = statistics.median(c["seq_each"]), statistics.median(r["seq_each"])
    overhead_rows(d["wide"], c_w, r_w)
    print(
        f"  samples made: direct {d['wide_samples']}, continuous {c['seq_samples']}, "
        f"rounds {r['seq_samples']}; vocoder share of a direct request "
        f"{100 * d['wide_vocoder_share']:.0f} % (the rest: talker + code predictor, prompt)"
    )
    print(f"time to first streamed byte (tiny, {args.frames} frames, pcm)")
    for key, label in (("ttfb1", "1 client"), ("ttfb8", "8 concurrent clients")):
        for q, name in ((0.5, "p50"), (0.95, "p95")):
            cv, rv = pct(c[key], q), pct(r[key], q)
            row(
                f"  {label} {name} (n={len(c[key])})",
                f"{cv:.3f} s",
                f"{rv:.3f} s",
                f"continuous / rounds {cv / rv:.2f}",
            )
    print(
        f"8 requests over 8 adapters ({args.preset}, {args.wide_frames} frames, "
        f"{wide_audio:.2f} s of audio each)"
    )
    row("  one after another", f"{c['seq_s']:.2f} s", f"{r['seq_s']:.2f} s")
    row("  concurrently", f"{c['conc_s']:.2f} s", f"{r['conc_s']:.2f} s")
    row(
        "  throughput ratio",
        f"x{c['seq_s'] / c['conc_s']:.2f}",
        f"x{r['seq_s'] / r['conc_s']:.2f}",
        "goal >= 4x",
    )
    print(
        f"  samples made (concurrent): continuous {c['conc_samples']}, rounds {r['conc_samples']}"
    )
    p = res["poisson"]
    print(
        f"{args.requests} requests at random times over {args.window:g} s "
        f"(seed {args.seed}, {args.poisson_model}, frames {sorted(set(p['sizes']))})"
    )
    for q, name in ((0.5, "p50"), (0.95, "p95")):
        cv, rv = pct(c["latency"], q), pct(r["latency"], q)
        row(f"  latency {name}", f"{cv:.2f} s", f"{rv:.2f} s", f"continuous / rounds {cv / rv:.2f}")
    row("  wall time of the schedule", f"{c['poisson_wall']:.2f} s", f"{r['poisson_wall']:.2f} s")
    occ, steps = c["step_occ"]
    row("  rows per decode step (continuous)", f"{occ:.2f} ({steps} steps)", "-")
    occ_c, rounds_c = c["round_occ"]
    occ_r, rounds_r = r["round_occ"]
    row(
        "  rows per batch (admission / round)",
        f"{occ_c:.2f} ({rounds_c})",
        f"{occ_r:.2f} ({rounds_r})",
        "rounds: every step of a round runs its rows",
    )
    print("server RSS (tiny, short streamed requests, 4 clients per server)")
    row("  after 20", f"{c['rss20'] / 1024:.1f} MiB", f"{r['rss20'] / 1024:.1f} MiB")
    row(
        f"  after {args.rss_requests}",
        f"{c['rss200'] / 1024:.1f} MiB",
        f"{r['rss200'] / 1024:.1f} MiB",
    )
    row(
        f"  {args.rss_requests} / 20",
        f"{c['rss200'] / max(c['rss20'], 1):.3f}",
        f"{r['rss200'] / max(r['rss20'], 1):.3f}",
        "goal: flat (1.00)",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=25, help="tiny-model frames a request")
    parser.add_argument("--wide-frames", type=int, default=8, help="wide-preset frames a request")
    parser.add_argument("--preset", default="wide", help="the preset of the 8-adapter block")
    parser.add_argument("--requests", type=int, default=16, help="random-arrival requests")
    parser.add_argument("--window", type=float, default=10.0, help="their arrival window, s")
    parser.add_argument("--poisson-model", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--poisson-frames", type=int, default=12, help="their middle length")
    parser.add_argument("--ttfb-rounds", type=int, default=1, help="rounds of 8 streaming clients")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-requests", type=int, default=200)
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "vf-bench-service"),
        help="built checkpoints and voice packages, reused between runs",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild what --cache holds")
    parser.add_argument(
        "--adapters-only",
        action="store_true",
        help="only the 8-adapter block, one server (e.g. --preset real-0.6b --wide-frames 8)",
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="continuous")
    args = parser.parse_args()

    start_load = load()
    print(f"{start_load} (shared machine: other people's processes run too)", flush=True)
    if args.adapters_only:
        adapters_only(args, start_load)
        return
    cache = Path(args.cache)
    if args.fresh:
        shutil.rmtree(cache, ignore_errors=True)
    models: dict[str, Built] = {}
    for name, preset in (("tiny", "tiny"), ("wide", args.preset)):
        built, took = build(preset, cache / preset)
        models[name] = built
        print(
            f"{name} ({preset}): "
            + (f"built in {took:.0f} s" if took is not None else f"reused from {cache / preset}"),
            flush=True,
        )

    from tests.service_helpers import SERVER_PIDS, server_process

    with tempfile.TemporaryDirectory(prefix="vf-bench-svc-") as tmp:
        settings = {
            scheduler: {
                "data_dir": str(Path(tmp) / scheduler),
                "models": {n: {"path": str(b.model)} for n, b in models.items()},
                "max_batch": 8,
                "adapter_slots": 10,
                "max_queue": 64,
                "engine_scheduler": scheduler,
            }
            for scheduler in SCHEDULERS
        }
        with (
            server_process(settings["continuous"], timeout=600) as url_c,
            server_process(settings["rounds"], timeout=600) as url_r,
        ):
            servers = [
                Server("continuous", url_c, SERVER_PIDS[url_c]),
                Server("rounds", url_r, SERVER_PIDS[url_r]),
            ]
            start = time.perf_counter()
            asyncio.run(import_voices(servers, models))
            print(
                f"imported 8 voices per model into each server in "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            direct = DirectChild({n: (str(b.export), b.language) for n, b in models.items()})
            try:
                res = asyncio.run(measure(servers, direct, args))
            finally:
                direct.close()
    report(res, args, start_load)


if __name__ == "__main__":
    main()
