"""Random-initialised PersonaPlex checkpoints in the real on-disk layout.

`model.safetensors` holds the PyTorch names NVIDIA's checkpoint uses (bf16), the Mimi weights
sit in `tokenizer-e351c8d8-checkpoint125.safetensors` with Kyutai's PyTorch names and all 32
codebooks (fp32), and `tokenizer_spm_32k_3.model` is a small SentencePiece model trained here.
`config.json` carries the flat Kyutai LM keys and only keys Kyutai's `moshi` loader knows (it
hands the rest to `LMModel`): the preset goes under `model_id`, and a Mimi that is not the real
one is described in `mimi_config.json` (Kyutai's `mimi_config_name`, `kyutai_mimi.py`). Vocab
sizes, codebook counts, delays and the 1920-sample frame are always the real ones.

Presets: "tiny" (tests), "width" (real widths, one layer each: benchmarks), "real-7b" (all real
dims, ~16 GB: never built in tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items
from finetune.families.personaplex.kyutai_mimi import kyutai_mimi_config
from finetune.families.personaplex.layout import (
    CONFIG_NAME,
    MIMI_CONFIG_NAME,
    MIMI_FILE_CODEBOOKS,
    MIMI_NAME,
    MOSHI_NAME,
    TEXT_TOKENIZER_NAME,
    lm_config,
    mimi_config,
    real_lm_config_dict,
)
from finetune.families.personaplex.pytorch_names import lm_pytorch_shapes, mimi_to_pytorch
from finetune.families.personaplex.text_tokenizer import write_tiny_spm
from finetune.fsutil import atomic_directory

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Dims:
    dim: int
    num_heads: int
    num_layers: int
    depformer_dim: int
    depformer_num_heads: int
    depformer_num_layers: int
    mimi: dict[str, Any] | None  # None: the real Mimi


TINY_MIMI: dict[str, Any] = {
    # SEANet ratios stay [8, 6, 5, 4] (1920-sample frames); widths stay above 64 where
    # mlx-audio's loaders guess conv layouts from shapes.
    "seanet": {"dimension": 128, "nfilters": 16},
    "transformer": {"d_model": 128, "num_heads": 4, "num_layers": 1, "dim_feedforward": 256},
    "quantizer_nq": MIMI_FILE_CODEBOOKS,
    "quantizer_bins": 2048,
    "quantizer_dim": 32,
}

PRESETS: dict[str, Dims] = {
    "tiny": Dims(64, 4, 2, 64, 4, 1, TINY_MIMI),
    "width": Dims(4096, 32, 1, 1024, 16, 1, None),
    "real-7b": Dims(4096, 32, 32, 1024, 16, 6, None),
}


def config_dict(preset: str) -> dict[str, Any]:
    dims = PRESETS[preset]
    config = real_lm_config_dict()
    config.update(
        {
            "dim": dims.dim,
            "num_heads": dims.num_heads,
            "num_layers": dims.num_layers,
            "depformer_dim": dims.depformer_dim,
            "depformer_dim_feedforward": int(4.125 * dims.depformer_dim),
            "depformer_num_heads": dims.depformer_num_heads,
            "depformer_num_layers": dims.depformer_num_layers,
            "moshi_name": MOSHI_NAME,
            "mimi_name": MIMI_NAME,
            "tokenizer_name": TEXT_TOKENIZER_NAME,
            "model_type": "personaplex",
            "model_id": {"preset": preset},
        }
    )
    if dims.mimi is not None:
        config["mimi_config_name"] = MIMI_CONFIG_NAME
    return config


def make_tiny_personaplex(out_dir: Path | str, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a seeded random checkpoint to `out_dir` (replaced whole, never left half-written)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    from mlx_audio.codec.models.mimi.mimi import Mimi
    from mlx_audio.sts.models.moshi.lm import Lm

    out = Path(out_dir)
    config = config_dict(preset)
    rng = np.random.Generator(np.random.PCG64(seed))
    lm_shapes = lm_pytorch_shapes(Lm(lm_config(config)))
    # Converted one tensor at a time: the "width" preset is ~1B parameters.
    lm_weights = {
        k: mx.array(_lm_value(k, lm_shapes[k], rng)).astype(mx.bfloat16) for k in sorted(lm_shapes)
    }
    dims = PRESETS[preset]
    mimi = Mimi(mimi_config(dims.mimi))
    mimi_shapes = {k: tuple(v.shape) for k, v in flat_items(mimi.parameters())}
    mimi_weights = _mimi_values(mimi_shapes, rng)

    with atomic_directory(out) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if dims.mimi is not None:
            mimi_json = json.dumps(kyutai_mimi_config(dims.mimi), indent=2, sort_keys=True)
            (staging / MIMI_CONFIG_NAME).write_text(mimi_json + "\n")
        mx.save_safetensors(str(staging / MOSHI_NAME), lm_weights, metadata={"format": "pt"})
        mimi_arrays = {k: mx.array(v) for k, v in sorted(mimi_to_pytorch(mimi_weights).items())}
        mx.save_safetensors(str(staging / MIMI_NAME), mimi_arrays, metadata={"format": "pt"})
        write_tiny_spm(staging / TEXT_TOKENIZER_NAME, seed=seed)
    return out


def _lm_value(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if key.endswith(".alpha"):  # RMSNorm gains
        return np.ones(shape, np.float32)
    if key == "text_emb.weight" or key.startswith(("emb.", "depformer_emb.", "depformer_text")):
        return rng.normal(0.0, 1.0, shape).astype(np.float32)
    fan_in = shape[-1]
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)


def _mimi_values(
    shapes: dict[str, tuple[int, ...]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        leaf = key.rsplit(".", 1)[-1]
        if ".norm" in key:
            values[key] = (np.ones if leaf == "weight" else np.zeros)(shape, np.float32)
        elif leaf == "bias":
            values[key] = np.zeros(shape, np.float32)
        elif leaf == "scale":  # layer scale
            values[key] = np.full(shape, 0.01, np.float32)
        elif leaf == "initialized":
            values[key] = np.ones(shape, np.float32)
        elif leaf == "cluster_usage":
            values[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif leaf == "embedding_sum":
            # Random codebooks (zeros would encode every frame to code 0); stored as
            # embedding * usage, as Mimi keeps running sums.
            values[key] = rng.normal(0.0, 1.0, shape).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            values[key] = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape).astype(np.float32)
    for key in sorted(values):
        if key.endswith("embedding_sum"):
            usage = values[key[: -len("embedding_sum")] + "cluster_usage"]
            values[key] = values[key] * usage[:, None]
    return values
