"""The Mimi codec CSM speaks through: the real file's name and key layout, a local copy, checks.

mlx-audio's CSM always builds Kyutai's full Mimi (`mimi_202407(32)`) from the hub file
`tokenizer-e351c8d8-checkpoint125.safetensors` (PyTorch key names and conv layout, read by
`Mimi.load_pytorch_weights`). A checkpoint here may carry its own Mimi in `mimi/`: that file
under the same name and layout, plus `mimi/config.json` (mlx-audio's `MimiConfig` fields) for
the sizes; without the config the real Mimi sizes apply. A checkpoint without `mimi/` falls back
to the real Mimi from the local hub cache (never downloaded).

The folder is not in the checkpoint root on purpose: mlx-audio's loader reads every
`*.safetensors` of the root into the model's weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

MIMI_DIR = "mimi"
MIMI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
FRAME_SAMPLES = 1920  # 24 kHz / 12.5 Hz
SAMPLE_RATE = 24_000

# The mlx-audio module paths of the SEANet stacks and their index in the PyTorch Sequential.
_ENCODER_RESIDUALS = (1, 4, 7, 10)
_DECODER_UPSAMPLES = (2, 5, 8, 11)


def mimi_config(
    *,
    num_codebooks: int,
    dimension: int = 512,
    nfilters: int = 64,
    transformer_layers: int = 8,
    transformer_heads: int = 8,
    transformer_ffn: int = 2048,
    quantizer_dim: int = 256,
) -> Any:
    """mlx-audio's `mimi_202407` with the sizes as arguments (SEANet ratios stay [8, 6, 5, 4])."""
    from mlx_audio.codec.models.mimi.mimi import mimi_202407

    real = mimi_202407(num_codebooks)
    seanet = dataclasses.replace(real.seanet, dimension=dimension, nfilters=nfilters)
    transformer = dataclasses.replace(
        real.transformer,
        d_model=dimension,
        num_heads=transformer_heads,
        num_layers=transformer_layers,
        dim_feedforward=transformer_ffn,
    )
    return dataclasses.replace(
        real, seanet=seanet, transformer=transformer, quantizer_dim=quantizer_dim
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> Any:
    from mlx_audio.codec.models.mimi.mimi import MimiConfig
    from mlx_audio.codec.models.mimi.modules import SeanetConfig, TransformerConfig

    fields = dict(data)
    fields["seanet"] = SeanetConfig(**fields["seanet"])
    fields["transformer"] = TransformerConfig(**fields["transformer"])
    return MimiConfig(**fields)


def to_pytorch_layout(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-audio Mimi parameter names / layouts -> the real file's (what load_pytorch_weights
    reads back; the round trip is exact)."""
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        out[_pytorch_name(key)] = _pytorch_value(key, value)
    return out


def _pytorch_name(key: str) -> str:
    k = key
    for stack in ("encoder", "decoder"):
        if k.startswith(f"{stack}.init_conv1d."):
            k = k.replace(f"{stack}.init_conv1d.", f"{stack}.model.0.", 1)
        if k.startswith(f"{stack}.final_conv1d."):
            k = k.replace(f"{stack}.final_conv1d.", f"{stack}.model.14.", 1)
    for i, index in enumerate(_ENCODER_RESIDUALS):
        k = k.replace(f"encoder.layers.{i}.residuals.0.", f"encoder.model.{index}.")
        k = k.replace(f"encoder.layers.{i}.downsample.", f"encoder.model.{index + 2}.")
    for i, index in enumerate(_DECODER_UPSAMPLES):
        k = k.replace(f"decoder.layers.{i}.upsample.", f"decoder.model.{index}.")
        k = k.replace(f"decoder.layers.{i}.residuals.0.", f"decoder.model.{index + 1}.")
    # Residual blocks are Sequential(ELU, conv, ELU, conv) in PyTorch.
    k = k.replace(".block.1.", ".block.3.").replace(".block.0.", ".block.1.")
    k = k.replace(".self_attn.in_proj.weight", ".self_attn.in_proj_weight")
    k = k.replace(".gating.linear1.", ".linear1.").replace(".gating.linear2.", ".linear2.")
    k = k.replace(".codebook.initialized", "._codebook._initialized")
    k = k.replace(".codebook.", "._codebook.")
    return k


def _pytorch_value(key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith((".conv.weight", ".output_proj.weight", ".input_proj.weight")):
        return np.ascontiguousarray(np.swapaxes(value, -1, -2))
    if key.endswith(".convtr.weight"):
        if value.ndim == 3 and value.shape[2] == 1:  # depthwise: (C, k, 1) <- (C, 1, k)
            return np.ascontiguousarray(value.transpose(0, 2, 1))
        return np.ascontiguousarray(value.transpose(2, 0, 1))  # (out, k, in) <- (in, out, k)
    return value


def local_mimi_file(checkpoint: Path) -> Path:
    return Path(checkpoint) / MIMI_DIR / MIMI_FILENAME


def load_mimi(checkpoint: Path, num_codebooks: int) -> tuple[Any | None, list[str]]:
    """The checkpoint's own Mimi, or the real one from the local hub cache; with problems."""
    from mlx_audio.codec.models.mimi.mimi import Mimi, mimi_202407

    folder = Path(checkpoint) / MIMI_DIR
    if folder.exists():
        weights_file = folder / MIMI_FILENAME
        if not weights_file.is_file():
            return None, [f"{MIMI_DIR}/{MIMI_FILENAME} is missing"]
        config_file = folder / "config.json"
        if config_file.is_file():
            try:
                cfg = config_from_dict(json.loads(config_file.read_text()))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                return None, [f"{MIMI_DIR}/config.json is not a Mimi config ({exc})"]
        else:
            cfg = mimi_202407(num_codebooks)
    else:
        from finetune.loading import offline_hub

        from huggingface_hub import hf_hub_download

        try:
            with offline_hub():
                weights_file = Path(hf_hub_download(MIMI_REPO, MIMI_FILENAME))
        except Exception as exc:  # the hub client raises several unrelated types here
            return None, [
                f"no {MIMI_DIR}/ folder and {MIMI_REPO}/{MIMI_FILENAME} is not in the local hub "
                f"cache ({type(exc).__name__})"
            ]
        cfg = mimi_202407(32)

    problems: list[str] = []
    if cfg.quantizer_nq != num_codebooks:
        problems.append(
            f"Mimi has {cfg.quantizer_nq} codebooks, audio_num_codebooks is {num_codebooks}"
        )
    if cfg.sample_rate != SAMPLE_RATE or _frame_samples(cfg) != FRAME_SAMPLES:
        problems.append(
            f"Mimi runs at {cfg.sample_rate} Hz with {_frame_samples(cfg)}-sample frames, "
            f"CSM needs {SAMPLE_RATE} Hz and {FRAME_SAMPLES}"
        )
    if problems:
        return None, problems
    mimi = Mimi(cfg)
    try:
        mimi.load_pytorch_weights(str(weights_file), strict=True)
    except Exception as exc:  # mlx raises ValueError / RuntimeError for bad or damaged files
        return None, [f"Mimi weights {weights_file.name} do not load: {exc}"]
    mx.eval(mimi.parameters())
    mimi.eval()
    return mimi, []


def _frame_samples(cfg: Any) -> int:
    return round(cfg.sample_rate / cfg.frame_rate)
