"""A quantised Qwen3-TTS checkpoint, made by mlx-audio's own converter (`mlx_audio.convert`).

The converter runs as a subprocess, offline, through the shared driver
(`finetune.variants.run_converter`: the domain named, a staging folder replacing `dst` only
once the result has been checked).

The result is what the converter writes for a real model: the talker and code predictor Linear
layers (whose input width divides the group size) as `QuantizedLinear` (packed uint32 `weight`
plus `scales` / `biases`), every other tensor cast to the config's `torch_dtype`, and the config's
`quantization` / `quantization_config` keys set; the speech tokenizer is copied unchanged.
"""

from __future__ import annotations

from pathlib import Path

from finetune.variants import VARIANTS, Variant, get_variant, quantised_layers, run_converter

# mlx-lm's mixed recipes (`--quant-predicate mixed_4_6`) do not apply: the converter's recipe
# numbers layers by `model.layers`, which Qwen3-TTS's Model does not have (it fails with
# AttributeError), and the talker and code predictor are numbered at different depths anyway.
QWEN3_VARIANTS = ("8", "4", "mxfp4")


def quantize_variant(src: Path | str, dst: Path | str, variant: str) -> Path:
    """The named variant (`finetune.variants`) of the local checkpoint `src`, at `dst`."""
    chosen = get_variant(variant)
    if chosen.name not in QWEN3_VARIANTS:
        raise ValueError(
            f"Qwen3-TTS variants: {', '.join(QWEN3_VARIANTS)} (mlx-audio's converter has no "
            f"layer numbering for {chosen.name} on Qwen3-TTS)"
        )
    return run_converter(src, dst, chosen, domain="tts", check=_check)


def quantize_checkpoint(
    src: Path | str, dst: Path | str, bits: int, group_size: int = 64, mode: str | None = None
) -> Path:
    """Convert the local checkpoint `src` into a `bits`-bit quantised copy at `dst`."""
    variant = Variant(f"{bits}-bit", bits=bits, group_size=group_size, mode=mode or "affine")
    return run_converter(src, dst, variant, domain="tts", check=_check)


def _check(path: Path, variant: Variant) -> list[str]:
    problems = []
    if not any(p.startswith("talker.model.layers.") for p in quantised_layers(path)):
        problems.append("the talker's decoder layers were not quantised")
    if not sorted((path / "speech_tokenizer").glob("*.safetensors")):
        problems.append("speech_tokenizer/ weights were not copied")
    return problems


__all__ = ["QWEN3_VARIANTS", "VARIANTS", "quantize_checkpoint", "quantize_variant"]
