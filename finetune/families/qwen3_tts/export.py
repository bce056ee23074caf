"""Write a loaded (possibly modified) Qwen3-TTS model back as a standalone checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS
from finetune.families.qwen3_tts.hf_layout import main_model_to_hf
from finetune.fsutil import atomic_directory

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _stored_dtypes(path: Path) -> dict[str, mx.Dtype]:
    dtypes: dict[str, mx.Dtype] = {}
    for file in sorted(path.glob("model*.safetensors")):
        dtypes.update({k: v.dtype for k, v in mx.load(str(file)).items()})
    return dtypes


def export_checkpoint(
    loaded: LoadedQwen3TTS,
    out_dir: Path,
    *,
    config: dict[str, Any],
    drop_speaker_encoder: bool,
) -> Path:
    """Talker (+ speaker encoder) weights in the base checkpoint's names, layouts and dtypes;
    every other file (tokenizers, speech tokenizer, generation config) copied from the base."""
    out_dir = Path(out_dir)
    prefixes = ("talker.",) if drop_speaker_encoder else ("talker.", "speaker_encoder.")
    params = {
        k: np.asarray(v.astype(mx.float32))
        for k, v in tree_flatten(loaded.model.parameters())
        if k.startswith(prefixes)
    }
    if any(".lora_" in k or ".linear." in k for k in params):
        raise ValueError("fuse or remove the LoRA layers before exporting a checkpoint")
    dtypes = _stored_dtypes(loaded.path)
    weights = {
        k: mx.array(v).astype(dtypes.get(k, mx.bfloat16))
        for k, v in sorted(main_model_to_hf(params).items())
    }
    with atomic_directory(out_dir) as staging:
        for item in loaded.path.iterdir():
            if item.name in WEIGHT_FILES or item.name == "config.json":
                continue
            target = staging / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
