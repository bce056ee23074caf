"""Data-parallel LoRA: optimizer-step time with 1 rank vs 2 ranks (mlx.launch, ring over TCP on
127.0.0.1) on the same global batch, and the ratio. Each rank is a separate process with its
own MLX; on a 2-core machine the two ranks share the two cores that one process already uses,
so the ceiling is the CPU: expect ~1x here, and the gain on separate hosts.

    python tests/bench/bench_distributed.py [--preset small] [--batch 8] [--steps 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import finetune  # noqa: F401  (BLAS before mlx)

import yaml


def step_times(progress: Path) -> list[float]:
    """Seconds between consecutive step events, the first step (warm-up, compile) left out."""
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    steps = [e["time"] for e in events if e["event"] == "step"]
    return [b - a for a, b in itertools.pairwise(steps)]


def run(config: Path, out: Path, ranks: int, port: int) -> tuple[list[float], float]:
    progress = out.with_suffix(".jsonl")
    command = [sys.executable, "-m", "finetune", "train", "--config", str(config)]
    command += ["--output", str(out), "--progress-file", str(progress)]
    if ranks > 1:
        command += ["--ranks", str(ranks), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=900)
    return step_times(progress), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--port", type=int, default=45123)
    args = parser.parse_args()

    from finetune.data import synthetic_dataset
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    with tempfile.TemporaryDirectory(prefix="bench-dp-") as folder:
        root = Path(folder)
        model = make_tiny_qwen3_tts(root / "model", seed=0, preset=args.preset)
        train = synthetic_dataset(root / "data", 2 * args.batch, seed=1, with_ref=False)
        config = root / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"path": str(model), "strategy": "language"},
                    "data": {"train": [str(train)]},
                    "lora": {"rank": 8, "alpha": 16.0},
                    "trainer": {
                        "batch_size": args.batch,
                        "max_steps": args.steps,
                        "learning_rate": 1e-4,
                        "prefetch": 0,
                    },
                }
            )
        )
        print(
            f"qwen3_tts {args.preset}, global batch {args.batch}, {args.steps} steps "
            f"(first left out), {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}"
        )
        results = {}
        for ranks in (1, 2):
            times, wall = run(config, root / f"out{ranks}", ranks, args.port)
            results[ranks] = statistics.median(times)
            print(
                f"{ranks} rank(s): median step {results[ranks] * 1e3:.0f} ms "
                f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); "
                f"whole run {wall:.1f} s"
            )
        print(f"speed-up 2 ranks / 1 rank: {results[1] / results[2]:.2f}x")
        if (os.cpu_count() or 1) <= 2:
            print("(2 cores: the ranks share the CPU one process already fills: the ceiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
