"""A quantised Qwen3-TTS checkpoint, made by mlx-audio's own converter (`mlx_audio.convert`).

The converter runs as a subprocess, offline. Two of its quirks are worked around here, without
touching the installed package:

- Without `--model-domain`, it guesses the domain by importing every model module of every
  domain; one of them (`tts.models.llama`) downloads a codec from the hub at import time, which
  fails offline. Naming the domain (`tts`) skips the guessing.
- It writes into an existing directory without clearing it: it is given a fresh staging folder
  that replaces `dst` only once the result has been checked.

The result is what the converter writes for a real model: the talker and code predictor Linear
layers (whose input width divides the group size) as `QuantizedLinear` (packed uint32 `weight`
plus `scales` / `biases`), every other tensor cast to the config's `torch_dtype`, and the config's
`quantization` / `quantization_config` keys set; the speech tokenizer is copied unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune.arrays import load_arrays
from finetune.fsutil import atomic_directory
from finetune.loading import CheckpointError, tail

import mlx.core as mx

CONVERT_TIMEOUT_S = 1800


def quantize_checkpoint(
    src: Path | str, dst: Path | str, bits: int, group_size: int = 64, mode: str | None = None
) -> Path:
    """Convert the local checkpoint `src` into a `bits`-bit quantised copy at `dst`."""
    src, dst = Path(src).resolve(), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(src, ["not a local checkpoint directory (no config.json)"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with atomic_directory(dst) as staging:
        command = [
            sys.executable,
            "-m",
            "mlx_audio.convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(staging),
            "--model-domain",
            "tts",
            "-q",
            "--q-bits",
            str(bits),
            "--q-group-size",
            str(group_size),
        ]
        if mode is not None:
            command += ["--q-mode", mode]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S
        )
        if done.returncode != 0:
            raise CheckpointError(
                src, [f"mlx_audio.convert failed ({done.returncode}): {tail(done.stderr)}"]
            )
        problems = converted_problems(staging, bits=bits, group_size=group_size, mode=mode)
        if problems:
            raise CheckpointError(dst, problems)
    return dst


def converted_problems(
    path: Path, *, bits: int, group_size: int, mode: str | None = None
) -> list[str]:
    """What is wrong with a converter output that should be quantised as asked (all at once)."""
    problems: list[str] = []
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"config.json unreadable: {exc}"]
    quant = config.get("quantization")
    want = {"bits": bits, "group_size": group_size, "mode": mode or "affine"}
    if not isinstance(quant, dict):
        problems.append("config.json has no 'quantization' object")
    else:
        got = {k: quant.get(k, "affine" if k == "mode" else None) for k in want}
        if got != want:
            problems.append(f"config.json quantization is {got}, asked for {want}")
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        return [*problems, "no model*.safetensors written"]
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(load_arrays(file))
    layers = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    if not layers:
        problems.append("no quantised layer (no '.scales' tensor) in the weights")
    unpacked = [p for p in layers if weights.get(f"{p}.weight", mx.array(0.0)).dtype != mx.uint32]
    if unpacked:
        problems.append(
            f"{len(unpacked)} layers have scales but no packed uint32 weight: {unpacked[:3]}"
        )
    if not any(k.startswith("talker.model.layers.") for k in layers):
        problems.append("the talker's decoder layers were not quantised")
    if not sorted((path / "speech_tokenizer").glob("*.safetensors")):
        problems.append("speech_tokenizer/ weights were not copied")
    return problems
