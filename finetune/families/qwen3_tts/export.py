"""Write a loaded (possibly modified) Qwen3-TTS model back as a standalone checkpoint.

New-language rows: an adapter trained for a language the base has no id for holds the trained
rows as `language_rows.weight` [k, H] (row i = adapter_config.json `language_rows[i]`). An
export writes each into `codec_embedding[row]` and names it in `codec_language_id`, so
mlx-audio and `qwen_tts` resolve the language by name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items, load_arrays
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS
from finetune.families.qwen3_tts.hf_layout import main_model_to_hf
from finetune.families.qwen3_tts.languages import WEIGHT_KEY as LANGUAGE_ROWS_TENSOR
from finetune.families.qwen3_tts.languages import write_row
from finetune.fsutil import atomic_directory
from finetune.lora import ADAPTER_WEIGHTS, AdapterError

import mlx.core as mx
import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class LanguageRow:
    name: str  # lower-case, as mlx-audio looks it up
    row: int  # the codec_embedding row
    vector: np.ndarray  # [H] float32


def read_language_rows(adapter_dir: Path, adapter_cfg: dict[str, Any]) -> list[LanguageRow]:
    """The adapter's trained new-language rows ([] when it has none); every problem at once."""
    entries = adapter_cfg.get("language_rows") or []
    if not entries:
        return []
    problems: list[str] = []
    if not isinstance(entries, list):
        raise AdapterError(adapter_dir, [f"language_rows must be a list, not {entries!r}"])
    for i, entry in enumerate(entries):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and entry["name"].strip()
            and isinstance(entry.get("row"), int)
            and not isinstance(entry.get("row"), bool)
        )
        if not ok:
            problems.append(f"language_rows[{i}] must be {{name: str, row: int}}, not {entry!r}")
    weights = load_arrays(Path(adapter_dir) / ADAPTER_WEIGHTS)
    tensor = weights.get(LANGUAGE_ROWS_TENSOR)
    if tensor is None:
        problems.append(f"{ADAPTER_WEIGHTS} has no {LANGUAGE_ROWS_TENSOR} for its language_rows")
    elif tensor.ndim != 2 or tensor.shape[0] != len(entries):
        problems.append(
            f"{LANGUAGE_ROWS_TENSOR} has shape {tuple(tensor.shape)}, "
            f"language_rows names {len(entries)} row(s)"
        )
    if problems:
        raise AdapterError(adapter_dir, problems)
    assert tensor is not None
    vectors = np.asarray(tensor.astype(mx.float32))
    return [
        LanguageRow(name=e["name"].strip().lower(), row=int(e["row"]), vector=vectors[i])
        for i, e in enumerate(entries)
    ]


def install_language_rows(model: Any, config: dict[str, Any], rows: list[LanguageRow]) -> None:
    """Write the rows into the model's codec_embedding and name them in `config`'s
    `talker_config.codec_language_id`, beside the languages already there."""
    if not rows:
        return
    for lang in rows:
        write_row(model, lang.row, lang.vector)
    talker = config.setdefault("talker_config", {})
    talker["codec_language_id"] = {
        **(talker.get("codec_language_id") or {}),
        **{lang.name: lang.row for lang in rows},
    }


def _stored_dtypes(path: Path) -> dict[str, mx.Dtype]:
    dtypes: dict[str, mx.Dtype] = {}
    for file in sorted(path.glob("model*.safetensors")):
        dtypes.update({k: v.dtype for k, v in load_arrays(file).items()})
    return dtypes


def _float_dtype(stored: mx.Dtype | None) -> mx.Dtype:
    """The dtype a float tensor is written in: the base's, unless the base stored it packed
    (a dequantised layer's weight was uint32 there) or not at all."""
    return stored if stored is not None and mx.issubdtype(stored, mx.floating) else mx.bfloat16


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
    # Packed quantised weights (uint32) must keep their dtype: only floats go through float32.
    params = {
        k: np.asarray(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in flat_items(loaded.model.parameters())
        if k.startswith(prefixes)
    }
    if any(".lora_" in k or ".linear." in k for k in params):
        raise ValueError("fuse or remove the LoRA layers before exporting a checkpoint")
    dtypes = _stored_dtypes(loaded.path)
    weights = {
        k: mx.array(v).astype(_float_dtype(dtypes.get(k))) if v.dtype.kind == "f" else mx.array(v)
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
