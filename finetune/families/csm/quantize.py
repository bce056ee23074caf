"""Quantised CSM checkpoints, made by mlx-audio's own converter (`mlx_audio.convert`).

The converter's sesame model fetches Kyutai's Mimi and a text tokenizer from the hub while it
is built: `converter_assets` hands it the checkpoint's own (the loader's stand-ins), in the
converter's process. It quantises the backbone's and depth decoder's Linear layers whose input
width divides the group size (sesame's `model_quant_predicate` skips only the codec), keeps the
embeddings' shapes (they are quantised too where their width divides), writes `model_type:
sesame`, and copies `mimi/` and the tokenizer files. Every variant applies, `mixed_4_6`
included: sesame's `Model.layers` is the backbone's, which mlx-lm's recipe numbers by depth.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from finetune.loading import CheckpointError, offline_hub
from finetune.variants import Variant, get_variant, quantised_layers, run_converter

VARIANTS = ("8", "4", "mixed_4_6", "mxfp4")


@contextlib.contextmanager
def converter_assets(src: Path) -> Iterator[None]:
    """In the converter's process: Mimi and the text tokenizer come from the checkpoint, and
    the model type is named (`sesame`): the converter would otherwise resolve our config's
    `csm` by importing every TTS model module, one of which fetches a codec from the hub."""
    from finetune.families.csm.checkpoint import _local_assets
    from finetune.families.csm.mimi import load_mimi

    from mlx_audio import convert

    config = json.loads((src / "config.json").read_text())
    mimi, problems = load_mimi(src, int(config["audio_num_codebooks"]))
    if problems:
        raise CheckpointError(src, problems)
    saved = convert.get_model_type
    convert.get_model_type = lambda config, path, domain: "sesame"
    try:
        with offline_hub(), _local_assets(src, mimi):
            yield
    finally:
        convert.get_model_type = saved


def quantize_csm(src: Path | str, dst: Path | str, variant: str) -> Path:
    chosen = get_variant(variant)
    if chosen.name not in VARIANTS:
        raise ValueError(f"CSM variants: {', '.join(VARIANTS)}")
    return run_converter(
        src,
        dst,
        chosen,
        domain="tts",
        context="finetune.families.csm.quantize:converter_assets",
        check=_check,
    )


def _check(path: Path, variant: Variant) -> list[str]:
    problems = []
    layers = quantised_layers(path)
    if not any(p.startswith("model.backbone.layers.") for p in layers):
        problems.append("the backbone's layers were not quantised")
    if not (path / "mimi").is_dir():
        problems.append("mimi/ was not copied")
    if not (path / "tokenizer.json").is_file():
        problems.append("tokenizer.json was not copied")
    return problems
