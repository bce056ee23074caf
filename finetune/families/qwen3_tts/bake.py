"""Baking a speaker: a speaker embedding written into a free `codec_embedding` row, named in
`spk_id` BESIDE the speakers already there (the official recipe replaces them all)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import data as data_lib
from finetune.config import TrainConfig
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts
from finetune.families.qwen3_tts.export import export_checkpoint
from finetune.families.qwen3_tts.training import FAMILY, mean_speaker_embedding
from finetune.fsutil import atomic_directory
from finetune.lora import fuse_lora, load_adapters, read_adapter_config

import mlx.core as mx
import numpy as np

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
FIRST_FREE_ROW = 2048  # rows below are audio codes; 2048-3071 are never sampled as audio
PACKAGE_FORMAT = "voicefoundry.voice/1"
EMBEDDING_FILE = "speaker_embedding.safetensors"


class BakeError(ValueError):
    pass


def normalise_name(name: str) -> str:
    lowered = name.strip().lower()
    if not NAME_PATTERN.fullmatch(lowered):
        raise BakeError(f"speaker name {name!r} must match {NAME_PATTERN.pattern}")
    return lowered


def occupied_rows(model: Any) -> dict[int, str]:
    spk_id = model.config.talker_config.spk_id or {}
    return {_row(v): k for k, v in spk_id.items()}


def _row(value: Any) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def reserved_rows(talker: Any) -> set[int]:
    """codec_embedding rows that hold special codec tokens (never a speaker)."""
    return {
        talker.codec_pad_id,
        talker.codec_bos_id,
        talker.codec_eos_token_id,
        talker.codec_think_id,
        talker.codec_nothink_id,
        talker.codec_think_bos_id,
        talker.codec_think_eos_id,
        *(talker.codec_language_id or {}).values(),
    }


def check_slot(model: Any, name: str, slot: int, *, force: bool) -> None:
    vocab = model.config.talker_config.vocab_size
    if not FIRST_FREE_ROW <= slot < vocab:
        raise BakeError(f"slot {slot} is not a speaker row ({FIRST_FREE_ROW}-{vocab - 1})")
    talker = model.config.talker_config
    reserved = reserved_rows(talker)
    if slot in reserved:
        raise BakeError(f"slot {slot} holds a special codec token")
    owner = occupied_rows(model).get(slot)
    if owner is not None and owner != name and not force:
        raise BakeError(f"slot {slot} already holds speaker {owner!r} (use --force to overwrite)")
    if name in (talker.spk_id or {}) and _row(talker.spk_id[name]) != slot and not force:
        raise BakeError(f"speaker {name!r} already exists at row {_row(talker.spk_id[name])}")


def bake_into_model(model: Any, name: str, slot: int, embedding: np.ndarray) -> None:
    """Write the row and register the name in a loaded model, without reloading anything."""
    table = model.talker.model.codec_embedding
    weight = table.weight
    if embedding.shape != (weight.shape[1],):
        raise BakeError(f"embedding has shape {embedding.shape}, rows are {weight.shape[1]} wide")
    weight[slot] = mx.array(embedding).astype(weight.dtype)
    table.weight = weight
    mx.eval(table.weight)
    talker = model.config.talker_config
    talker.spk_id = {**(talker.spk_id or {}), name: slot}
    talker.spk_is_dialect = {**(talker.spk_is_dialect or {}), name: False}
    if name not in model.supported_speakers:
        model.supported_speakers.append(name)


def unbake_from_model(model: Any, name: str, original_row: np.ndarray) -> None:
    talker = model.config.talker_config
    slot = _row((talker.spk_id or {})[name])
    table = model.talker.model.codec_embedding
    weight = table.weight
    weight[slot] = mx.array(original_row).astype(weight.dtype)
    table.weight = weight
    talker.spk_id = {k: v for k, v in talker.spk_id.items() if k != name}
    talker.spk_is_dialect = {k: v for k, v in (talker.spk_is_dialect or {}).items() if k != name}
    if name in model.supported_speakers:
        model.supported_speakers.remove(name)


@dataclass
class BakeResult:
    package: Path
    name: str
    slot: int
    embedding: np.ndarray
    export: Path | None


def bake(
    config: TrainConfig,
    checkpoint: Path,
    output: Path,
    *,
    name: str | None = None,
    slot: int | None = None,
    force: bool = False,
    fuse: bool = False,
    export: Path | None = None,
    keep_cloning: bool = False,
) -> BakeResult:
    if fuse and export is None:
        raise BakeError("--fuse-lora merges the adapter into an exported checkpoint: add --export")
    if keep_cloning and export is None:
        raise BakeError("--keep-cloning describes an exported checkpoint: add --export")
    adapter_cfg = read_adapter_config(checkpoint)
    if adapter_cfg.get("family") != FAMILY:
        raise BakeError(f"{checkpoint} holds a {adapter_cfg.get('family')!r} adapter, not {FAMILY}")
    name = normalise_name(name or config.speaker.name)
    slot = config.speaker.slot if slot is None else slot

    clips = data_lib.read_jsonl(
        [Path(p) for p in config.data.train],
        strategy="speaker",
        min_duration_s=config.data.min_duration_s,
        max_duration_s=config.data.max_duration_s,
    )
    loaded = load_qwen3_tts(config.model.path)
    if loaded.model.speaker_encoder is None:
        raise BakeError("baking needs a Base model with a speaker encoder")
    check_slot(loaded.model, name, slot, force=force)
    embedding = mean_speaker_embedding(loaded.model, [Path(c.ref_audio) for c in clips])

    package = write_package(
        output,
        name=name,
        slot=slot,
        embedding=embedding,
        adapter_dir=checkpoint,
        adapter_cfg=adapter_cfg,
        base=loaded,
    )
    exported = None
    if export is not None:
        exported = export_baked(
            loaded,
            export,
            name=name,
            slot=slot,
            embedding=embedding,
            adapter_dir=checkpoint if fuse else None,
            keep_cloning=keep_cloning,
        )
    return BakeResult(package, name, slot, embedding, exported)


def write_package(
    output: Path,
    *,
    name: str,
    slot: int | None,
    embedding: np.ndarray | None,
    adapter_dir: Path | None,
    adapter_cfg: dict[str, Any] | None,
    base: LoadedQwen3TTS,
    language: str | None = None,
) -> Path:
    """A voice package: what the server hot-loads (voice.json + embedding + adapter)."""
    with atomic_directory(Path(output)) as staging:
        if embedding is not None:
            mx.save_safetensors(str(staging / EMBEDDING_FILE), {"embedding": mx.array(embedding)})
        if adapter_dir is not None:
            shutil.copytree(
                adapter_dir,
                staging / "adapter",
                ignore=shutil.ignore_patterns("optimizer.safetensors", "trainer_state.json"),
            )
        meta = {
            "format": PACKAGE_FORMAT,
            "name": name,
            "family": FAMILY,
            "kind": "baked" if embedding is not None else "adapter",
            "slot": slot,
            "strategy": (adapter_cfg or {}).get("strategy", "speaker"),
            "adapter": "adapter" if adapter_dir is not None else None,
            "embedding": EMBEDDING_FILE if embedding is not None else None,
            "language": language,
            "base_model": {
                "path": str(base.path),
                "tts_model_size": base.config.get("tts_model_size"),
                "hidden_size": base.config["talker_config"]["hidden_size"],
            },
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (staging / "voice.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(output)


def export_baked(
    loaded: LoadedQwen3TTS,
    out_dir: Path,
    *,
    name: str,
    slot: int | None,
    embedding: np.ndarray | None,
    adapter_dir: Path | None,
    keep_cloning: bool,
) -> Path:
    """Official custom-voice format (no speaker encoder), or a Base that also keeps cloning."""
    model = loaded.model
    if adapter_dir is not None:
        load_adapters(model.talker, adapter_dir)
        fuse_lora(model.talker)
    bake_into_model(model, name, slot, embedding)
    config = json.loads((loaded.path / "config.json").read_text())
    talker = config.setdefault("talker_config", {})
    talker["spk_id"] = {**(talker.get("spk_id") or {}), name: slot}
    talker["spk_is_dialect"] = {**(talker.get("spk_is_dialect") or {}), name: False}
    config["tts_model_type"] = "base" if keep_cloning else "custom_voice"
    return export_checkpoint(loaded, out_dir, config=config, drop_speaker_encoder=not keep_cloning)
