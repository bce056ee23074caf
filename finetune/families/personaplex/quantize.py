"""Quantised PersonaPlex checkpoints: MLX's `nn.quantize` with the converter's semantics.

mlx-audio's converter cannot convert PersonaPlex: its moshi module (`sts.models.moshi`) has no
`Model` / `ModelConfig` for the converter to build, and the release stores PyTorch names that
only `Lm.load_pytorch_weights` reads. So the variant is written as Kyutai's own MLX releases
of Moshi are (`kyutai/moshiko-mlx-q8`: `model.q8.safetensors` in MLX names, loaded by
`Lm.load_weights` into an `nn.quantize`d tree), with config.json's `quantization` object in the
converter's form. The predicate is the converter's (a layer that can be quantised, whose input
width divides the group size and 64) with a family predicate like Qwen3-TTS's: the embeddings
and the text head stay full precision (training unfreezes them). `mixed_4_6` does not apply:
mlx-lm's recipe raises bits for `v_proj` / `down_proj`, names Moshi does not have (its attention
is one fused `in_proj`, its MLP `gating.linear_in` / `linear_out`), so it would be plain 4-bit.
Mimi, the text tokenizer and `mimi_config.json` are copied as they are.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from finetune.families.personaplex.layout import CONFIG_NAME
from finetune.fsutil import atomic_directory
from finetune.variants import Variant, converted_problems, get_variant, quantize_module

import mlx.core as mx

PERSONAPLEX_VARIANTS = ("8", "4", "mxfp4")
_KEPT = re.compile(r"(^|\.)(emb|text_emb|audio_embs(\.\d+)?|text_linear)$")


def quant_allowed(path: str, module: Any) -> bool:
    """The family's `model_quant_predicate`: embeddings and the text head stay as they are."""
    return _KEPT.search(path) is None


def weights_name(variant: Variant) -> str:
    return (
        f"model.q{variant.bits}.safetensors"
        if variant.mode == "affine"
        else (f"model.{variant.mode}.safetensors")
    )


def quantize_personaplex(src: Path | str, dst: Path | str, variant: str) -> Path:
    from finetune.arrays import flat_items
    from finetune.families.personaplex.checkpoint import load_personaplex

    chosen = get_variant(variant)
    if chosen.name not in PERSONAPLEX_VARIANTS:
        raise ValueError(
            f"PersonaPlex variants: {', '.join(PERSONAPLEX_VARIANTS)} (mlx-lm's {chosen.name} "
            "recipe has no layers to raise in Moshi)"
        )
    src = Path(src).resolve()
    loaded = load_personaplex(src)
    config, _ = _source_config(src)
    if "quantization" in config:
        raise ValueError(f"{src} is already quantised")
    quant = quantize_module(loaded.lm, chosen, allow=quant_allowed)
    dtype = getattr(mx, str(config.get("torch_dtype", "bfloat16")), mx.bfloat16)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in flat_items(loaded.lm.parameters())
    }
    name = weights_name(chosen)
    moshi = str(config.get("moshi_name", "model.safetensors"))
    with atomic_directory(Path(dst)) as staging:
        mx.save_safetensors(str(staging / name), weights, metadata={"format": "mlx"})
        for item in src.iterdir():
            if item.is_file() and item.name not in (moshi, CONFIG_NAME):
                shutil.copy2(item, staging / item.name)
        config.update(moshi_name=name, quantization=quant, quantization_config=quant)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        problems = converted_problems(staging, chosen)
        if problems:
            from finetune.loading import CheckpointError

            raise CheckpointError(Path(dst), problems)
    return Path(dst)


def _source_config(src: Path) -> tuple[dict[str, Any], list[str]]:
    from finetune.families.personaplex.checkpoint import read_personaplex_config

    return read_personaplex_config(src)
