"""Duplex serving: per-tick step time at 1, 4 and 8 concurrent sessions (budget: 80 ms a tick),
batched (one forward for all sessions) vs one session at a time, on the tiny PersonaPlex and on
a PersonaPlex-width slice (real widths: temporal 4096 / depformer 1024, few layers); then the
time from connect to handshake through a real server and a real websockets client.

    python tests/bench/bench_duplex.py [--ticks 20] [--skip-width] [--skip-server]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import finetune  # noqa: F401  (BLAS before mlx)

import numpy as np

BUDGET_S = 0.080
FRAME = 1920


def _frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(FRAME)).astype(np.float32) for _ in range(n)]


def tick_times(path: Path, sessions: int, ticks: int, batched: bool) -> list[float]:
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.families.personaplex.runtime import PersonaPlexRuntime

    runtime = PersonaPlexRuntime(load_personaplex(path))
    states = []
    for i in range(sessions):
        state = runtime.new_session(seed=i)
        runtime.condition(state)
        states.append(state)
    inputs = [_frames(ticks + 2, seed=i) for i in range(sessions)]
    runtime.step(states, [inputs[i][0] for i in range(sessions)])  # warm-up
    times = []
    for t in range(1, ticks + 1):
        start = time.perf_counter()
        if batched:
            runtime.step(states, [inputs[i][t] for i in range(sessions)])
        else:
            for i, state in enumerate(states):
                runtime.step([state], [inputs[i][t]])
        times.append(time.perf_counter() - start)
    for state in states:
        runtime.close(state)
    return times


def report(label: str, path: Path, counts: list[int], ticks: int) -> None:
    print(f"\n{label}: per-tick step time (median over {ticks} ticks; budget 80 ms)")
    print(
        f"{'sessions':>8} {'batched ms':>11} {'one-by-one ms':>14} {'speed-up':>9} {'in budget':>9}"
    )
    for n in counts:
        batched = statistics.median(tick_times(path, n, ticks, batched=True))
        serial = statistics.median(tick_times(path, n, ticks, batched=False))
        ok = "yes" if batched <= BUDGET_S else "no"
        print(
            f"{n:>8} {batched * 1e3:>11.1f} {serial * 1e3:>14.1f} {serial / batched:>8.2f}x {ok:>9}"
        )


async def _handshakes(url: str, speaker: str, n: int) -> list[float]:
    import websockets

    times = []
    for i in range(n):
        start = time.perf_counter()
        async with websockets.connect(f"{url}/duplex?speaker={speaker}&seed={i}") as ws:
            message = await ws.recv()
            assert message[0] == 0x00
            times.append(time.perf_counter() - start)
    return times


def server_handshake(path: Path, work: Path) -> None:
    from tests.service_helpers import server_process

    settings = {
        "data_dir": str(work),
        "models": {"pp": {"path": str(path), "family": "personaplex"}},
    }
    with server_process(settings) as url:
        ws = url.replace("http://", "ws://")
        times = asyncio.run(_handshakes(ws, "pp", 6))
    print("\nconnect -> handshake through a real server (no voice prompt, no text prompt)")
    rest = statistics.median(times[1:])
    print(f"  first {times[0] * 1e3:.0f} ms, median of the rest {rest * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--skip-width", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()
    from finetune.families.personaplex.tiny import make_tiny_personaplex

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = make_tiny_personaplex(work / "tiny", seed=0, preset="tiny")
        report("tiny PersonaPlex", tiny, [1, 4, 8], args.ticks)
        if not args.skip_width:
            start = time.perf_counter()
            width = make_tiny_personaplex(work / "width", seed=0, preset="width")
            print(f"\n(built the PersonaPlex-width slice in {time.perf_counter() - start:.0f} s)")
            report("PersonaPlex-width slice", width, [1, 4, 8], max(4, args.ticks // 4))
            shutil.rmtree(work / "width", ignore_errors=True)
        if not args.skip_server:
            server_handshake(tiny, work / "server")


if __name__ == "__main__":
    main()
