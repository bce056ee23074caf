"""LoRA rank 8 vs full fine-tuning of the Qwen3-TTS talker: step time, peak memory, adapter size.

Each (shape, mode) runs in its own process so peak memory is its own. Printed side by side:
the tiny model, and with --real the real 0.6B shape (random weights; builds a ~2.5 GB
checkpoint), plus the adapter file size at rank 8 / 16 for the 0.6B shape.

    python tests/bench/bench_finetune.py [--real] [--steps 5]
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

SEQ_FRAMES = 50  # 4 s of audio per clip, batch of 2


def child(args: argparse.Namespace) -> None:
    import finetune  # noqa: F401
    from finetune.config import QWEN3_TALKER_TARGETS
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.conditioning import Conditioning, SpecialIds
    from finetune.families.qwen3_tts.forward import qwen3_tts_loss
    from finetune.families.qwen3_tts.layout import build_sequence, chat_text, pack
    from finetune.lora import LoRAConfig, apply_lora, save_adapters

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    loaded = load_qwen3_tts(args.model)
    model, talker = loaded.model, loaded.model.talker
    out: dict[str, float] = {}
    if args.mode.startswith("lora"):
        rank = int(args.mode[4:])
        cfg = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=list(QWEN3_TALKER_TARGETS))
        apply_lora(talker, cfg)
        if args.adapter_dir:
            start = time.perf_counter()
            save_adapters(Path(args.adapter_dir), talker, cfg, {"family": "qwen3_tts"})
            out["save_s"] = time.perf_counter() - start
            size = (Path(args.adapter_dir) / "adapters.safetensors").stat().st_size
            out["adapter_mb"] = size / 1e6
    else:  # full fine-tuning: every talker weight but the (frozen) text embedding table
        talker.unfreeze()
        talker.model.text_embedding.freeze()
    trainable = sum(v.size for _, v in tree_flatten(talker.trainable_parameters()))
    out["trainable_params"] = float(trainable)

    ids = SpecialIds.from_config(model.config)
    rng = np.random.default_rng(0)
    seqs = [
        build_sequence(
            ids,
            model.tokenizer.encode(chat_text(t)),
            rng.integers(0, 2048, (SEQ_FRAMES, 16)).astype(np.int32),
            Conditioning(language=None, speaker=False),
        )
        for t in ("A sentence for the benchmark.", "And a second one, a little longer.")
    ]
    batch = pack(seqs, ids)
    optimizer = optim.AdamW(learning_rate=1e-5)

    def loss_fn(module, b):
        return qwen3_tts_loss(module, b).total

    value_and_grad = nn.value_and_grad(talker, loss_fn)
    mx.reset_peak_memory()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss, grads = value_and_grad(talker, batch)
        optimizer.update(talker, grads)
        mx.eval(talker.trainable_parameters(), optimizer.state, loss)
        if step > 0:  # the first step compiles and allocates
            times.append(time.perf_counter() - start)
    out["step_s"] = float(np.median(times))
    out["peak_gb"] = mx.get_peak_memory() / 1e9
    out["seq_len"] = float(batch.text_ids.shape[1])
    print(json.dumps(out))


def run(model: Path, mode: str, steps: int, adapter_dir: Path | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        str(model),
        "--mode",
        mode,
        "--steps",
        str(steps),
    ]
    if adapter_dir is not None:
        cmd += ["--adapter-dir", str(adapter_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {model.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mode", default="lora8")
    parser.add_argument("--adapter-dir")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--real", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import finetune  # noqa: F401
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    with tempfile.TemporaryDirectory(prefix="vf-bench-ft-") as tmp:
        shapes = {"tiny": make_tiny_qwen3_tts(Path(tmp) / "tiny", seed=0)}
        if args.real:
            shapes["real-0.6b"] = make_tiny_qwen3_tts(
                Path(tmp) / "real", seed=0, preset="real-0.6b"
            )
        print(f"batch: 2 clips x {SEQ_FRAMES} frames; median of {args.steps} steps after warm-up")
        print(f"{'shape':10s} {'mode':6s} {'trainable':>12s} {'step (s)':>9s} {'peak (GB)':>10s}")
        for shape, path in shapes.items():
            results = {mode: run(path, mode, args.steps) for mode in ("lora8", "full")}
            for mode, r in results.items():
                print(
                    f"{shape:10s} {mode:6s} {int(r['trainable_params']):12,d} "
                    f"{r['step_s']:9.3f} {r['peak_gb']:10.2f}"
                )
            lora, full = results["lora8"], results["full"]
            print(
                f"{shape:10s} full / lora8: step time {full['step_s'] / lora['step_s']:.2f}x, "
                f"peak memory {full['peak_gb'] / lora['peak_gb']:.2f}x"
            )
        if args.real:
            for rank in (8, 16):
                r = run(shapes["real-0.6b"], f"lora{rank}", 1, Path(tmp) / f"adapter{rank}")
                print(
                    f"real-0.6b adapter at rank {rank}: {r['adapter_mb']:.1f} MB "
                    f"(seed pipeline: {23 if rank == 8 else 45} MB)"
                )


if __name__ == "__main__":
    main()
