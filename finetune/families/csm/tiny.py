"""Random-initialised CSM checkpoints with the real module tree, config keys and file layout.

Layout (what `load_csm` and mlx-audio's loader read):

    config.json                  the CSM config keys (transformers' CsmConfig + Sesame's
                                 audio_vocab_size / audio_num_codebooks / *_flavor) and
                                 `text_tokenizer` pointing at this folder (".")
    model.safetensors            the SesameModel's weights under mlx-audio's names
                                 (`model.backbone.layers.0.self_attn.q_proj.weight`, ...,
                                 `model.audio_head`), as mlx-community/csm-1b stores them
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                 a small Llama-3-style byte-level BPE (specials on real ids)
    mimi/tokenizer-e351c8d8-checkpoint125.safetensors
                                 a tiny Mimi, the real file name and PyTorch key layout;
    mimi/config.json             its sizes (nq = audio_num_codebooks, SEANet ratios 8/6/5/4 so
                                 a frame stays 1920 samples at 24 kHz)

Real values kept: audio vocab 2051 (2048 codes + specials), text vocab 128256 with
`<|begin_of_text|>` 128000 / `<|end_of_text|>` 128001, the Llama-3 RoPE scaling, the
codebook size 2048. The tiny preset reduces the codebooks to 8 (mlx-audio sizes every
codebook-shaped tensor from `audio_num_codebooks`). Mimi's codebooks are randomised (a fresh
Euclidean codebook is all zeros and would encode every frame as code 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items
from finetune.families.csm.mimi import (
    MIMI_DIR,
    MIMI_FILENAME,
    config_to_dict,
    mimi_config,
    to_pytorch_layout,
)
from finetune.families.csm.text_tokenizer import (
    BOS_ID,
    TEXT_VOCAB_SIZE,
    write_tiny_llama3_tokenizer,
)
from finetune.fsutil import atomic_directory

import mlx.core as mx
import mlx.nn as nn
import numpy as np

AUDIO_VOCAB_SIZE = 2051
CODEBOOK_PAD_ID = 2050
LLAMA3_ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


@dataclass(frozen=True)
class Llama:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Dims:
    backbone: Llama
    decoder: Llama
    num_codebooks: int
    mimi: dict[str, int]
    dtype: str  # how model.safetensors is stored


PRESETS: dict[str, Dims] = {
    "tiny": Dims(
        backbone=Llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16),
        decoder=Llama(hidden=48, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=12),
        num_codebooks=8,
        mimi={
            "dimension": 64,
            "nfilters": 8,
            "transformer_layers": 1,
            "transformer_heads": 2,
            "transformer_ffn": 128,
            "quantizer_dim": 32,
        },
        dtype="float32",
    ),
    # Sesame's llama-1B backbone and llama-100M depth decoder, 32 codebooks, Kyutai's Mimi.
    "real-1b": Dims(
        backbone=Llama(
            hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64
        ),
        decoder=Llama(hidden=1024, intermediate=8192, layers=4, heads=8, kv_heads=2, head_dim=128),
        num_codebooks=32,
        mimi={},
        dtype="bfloat16",
    ),
}


def _llama_keys(d: Llama) -> dict[str, Any]:
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "mlp_bias": False,
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_scaling": dict(LLAMA3_ROPE_SCALING),
        "rope_theta": 500000,
        "use_cache": True,
    }


def model_config(dims: Dims) -> dict[str, Any]:
    n = dims.num_codebooks
    return {
        "architectures": ["CsmForConditionalGeneration"],
        "model_type": "csm",
        "backbone_flavor": "llama-1B",
        "decoder_flavor": "llama-100M",
        **_llama_keys(dims.backbone),
        "max_position_embeddings": 2048,
        "text_vocab_size": TEXT_VOCAB_SIZE,
        "audio_vocab_size": AUDIO_VOCAB_SIZE,
        "vocab_size": AUDIO_VOCAB_SIZE,
        "audio_num_codebooks": n,
        "num_codebooks": n,
        "bos_token_id": BOS_ID,
        "pad_token_id": 128002,
        "audio_token_id": 128002,
        "audio_eos_token_id": 128003,
        "codebook_eos_token_id": 0,
        "codebook_pad_token_id": CODEBOOK_PAD_ID,
        "tie_codebooks_embeddings": True,
        "torch_dtype": dims.dtype,
        "text_tokenizer": ".",
        "depth_decoder_config": {
            "model_type": "csm_depth_decoder_model",
            **_llama_keys(dims.decoder),
            "backbone_hidden_size": dims.backbone.hidden,
            "max_position_embeddings": n + 1,
            "num_codebooks": n,
            "vocab_size": AUDIO_VOCAB_SIZE,
        },
    }


def make_tiny_csm(out_dir: Path, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a random CSM checkpoint to `out_dir` (replaced whole, never left half-written)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    from mlx_audio.codec.models.mimi.mimi import Mimi
    from mlx_audio.tts.models.sesame.sesame import SesameModel

    dims = PRESETS[preset]
    config = model_config(dims)
    rng = np.random.Generator(np.random.PCG64(seed))
    model_weights = {
        f"model.{k}": v for k, v in _random_parameters(SesameModel(config), rng).items()
    }
    mimi_cfg = mimi_config(num_codebooks=dims.num_codebooks, **dims.mimi)
    mimi_weights = to_pytorch_layout(_random_parameters(Mimi(mimi_cfg), rng))

    out = Path(out_dir)
    with atomic_directory(out) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _save(staging / "model.safetensors", model_weights, getattr(mx, dims.dtype))
        write_tiny_llama3_tokenizer(staging, seed=seed)
        mimi_dir = staging / MIMI_DIR
        mimi_dir.mkdir()
        (mimi_dir / "config.json").write_text(
            json.dumps(config_to_dict(mimi_cfg), indent=2, sort_keys=True) + "\n"
        )
        _save(mimi_dir / MIMI_FILENAME, mimi_weights, mx.float32)
    return out


def _random_parameters(module: nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded values for every parameter, by the role of the module that owns it."""
    norms = {
        f"{name}.{leaf}"
        for name, sub in module.named_modules()
        if type(sub).__name__ in ("LayerNorm", "RMSNorm")
        for leaf in ("weight", "bias")
    }
    shapes = {k: tuple(v.shape) for k, v in flat_items(module.parameters())}
    values: dict[str, np.ndarray] = {}
    for key in sorted(shapes):
        values[key] = _value_for(key, shapes[key], key in norms, rng)
    for key in sorted(values):
        if key.endswith("codebook.embedding_sum"):  # Mimi stores sum = embedding * usage
            usage = values[key[: -len("embedding_sum")] + "cluster_usage"]
            values[key] = values[key] * usage[:, None]
    return values


def _value_for(
    key: str, shape: tuple[int, ...], is_norm: bool, rng: np.random.Generator
) -> np.ndarray:
    leaf = key.rsplit(".", 1)[-1]
    if is_norm:
        return (np.ones if leaf == "weight" else np.zeros)(shape, np.float32)
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":  # Mimi's layer scales
        return np.full(shape, 0.01, np.float32)
    if leaf == "initialized":
        return np.ones(shape, np.float32)
    if leaf == "cluster_usage":
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if leaf == "embedding_sum":
        return rng.normal(0.0, 1.0, shape).astype(np.float32)
    if "embeddings" in key:  # CSM's text / audio embedding tables
        return rng.normal(0.0, 1.0, shape).astype(np.float32)
    if leaf == "audio_head":  # [codebooks - 1, decoder_dim, vocab]: fan-in is the middle axis
        return rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape).astype(np.float32)


def _save(path: Path, weights: dict[str, np.ndarray], dtype: mx.Dtype) -> None:
    arrays = {k: mx.array(weights[k]).astype(dtype) for k in sorted(weights)}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
