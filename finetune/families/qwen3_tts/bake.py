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
from finetune.audio import load_audio, write_wav
from finetune.config import TrainConfig
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import VoiceConditioning, normalise_language
from finetune.families.qwen3_tts.export import (
    LANGUAGE_ROWS_TENSOR,
    LanguageRow,
    export_checkpoint,
    install_language_rows,
    read_language_rows,
)
from finetune.families.qwen3_tts.languages import FIRST_SPEAKER_ROW, row_of, special_rows
from finetune.families.qwen3_tts.training import FAMILY, mean_speaker_embedding, speaker_ref
from finetune.fsutil import atomic_directory
from finetune.identity import weights_identity
from finetune.lora import dequantize_linears, fuse_lora, load_adapters, read_adapter_config

import mlx.core as mx
import numpy as np

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PACKAGE_FORMAT = "voicefoundry.voice/1"
EMBEDDING_FILE = "speaker_embedding.safetensors"


class BakeError(ValueError):
    pass


def normalise_name(name: str) -> str:
    lowered = name.strip().lower()
    if not NAME_PATTERN.fullmatch(lowered):
        raise BakeError(f"speaker name {name!r} must match {NAME_PATTERN.pattern}")
    return lowered


def speaker_rows(model: Any) -> dict[int, str]:
    """Row -> name of each speaker in `spk_id`."""
    spk_id = model.config.talker_config.spk_id or {}
    return {row_of(v): k for k, v in spk_id.items()}


def reserved_rows(talker: Any) -> set[int]:
    """codec_embedding rows that hold special codec tokens or languages (never a speaker)."""
    return {*special_rows(talker), *(talker.codec_language_id or {}).values()}


def check_slot(model: Any, name: str, slot: int, *, force: bool) -> None:
    vocab = model.config.talker_config.vocab_size
    if not FIRST_SPEAKER_ROW <= slot < vocab:
        raise BakeError(f"slot {slot} is not a speaker row ({FIRST_SPEAKER_ROW}-{vocab - 1})")
    talker = model.config.talker_config
    reserved = reserved_rows(talker)
    if slot in reserved:
        raise BakeError(f"slot {slot} holds a special codec token")
    owner = speaker_rows(model).get(slot)
    if owner is not None and owner != name and not force:
        raise BakeError(f"slot {slot} already holds speaker {owner!r} (use --force to overwrite)")
    if name in (talker.spk_id or {}) and row_of(talker.spk_id[name]) != slot and not force:
        raise BakeError(f"speaker {name!r} already exists at row {row_of(talker.spk_id[name])}")


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
    slot = row_of((talker.spk_id or {})[name])
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
    language: str | None = None


def training_language(clips: list[data_lib.Clip], override: str | None = None) -> str | None:
    """The language the voice was trained in: the one all training lines share (None: auto).

    Lines in several languages were trained with different prefixes; `override` picks which of
    them the voice is served in. A language no line used is refused: it was never trained.
    """
    used = {normalise_language(c.language) for c in clips}
    shown = ", ".join(sorted(lang or "auto" for lang in used))
    if override is not None:
        chosen = normalise_language(override)
        if chosen not in used:
            raise BakeError(
                f"--language {override!r}: no training line is in it (they are in: {shown})"
            )
        return chosen
    if len(used) > 1:
        raise BakeError(
            f"the training lines mix languages ({shown}): choose the one the voice speaks "
            "with --language"
        )
    return next(iter(used), None)


def training_mean_embedding(model: Any, clips: list[data_lib.Clip]) -> np.ndarray:
    """The mean of the speaker vectors training put in the speaker slot: one per training line
    (a ref clip used by five lines counts five times)."""
    return mean_speaker_embedding(model, [speaker_ref(clip) for clip in clips])


def check_language_rows(model: Any, rows: list[LanguageRow], slot: int | None) -> None:
    """New-language rows must sit on free rows: no special token, speaker or other language."""
    talker = model.config.talker_config
    known = {k.lower(): int(v) for k, v in (talker.codec_language_id or {}).items()}
    owners = {v: k for k, v in known.items()}
    speakers = speaker_rows(model)
    specials = special_rows(talker)
    problems: list[str] = []
    seen: dict[int, str] = {}
    for lang in rows:
        where = f"language {lang.name!r} at row {lang.row}"
        if not FIRST_SPEAKER_ROW <= lang.row < talker.vocab_size:
            problems.append(
                f"{where}: not a free row ({FIRST_SPEAKER_ROW}-{talker.vocab_size - 1})"
            )
        elif lang.row == slot:
            problems.append(f"{where}: the speaker is baked into the same row")
        elif lang.row in specials:
            problems.append(f"{where}: the row holds a special codec token")
        elif lang.row in speakers:
            problems.append(f"{where}: the row holds speaker {speakers[lang.row]!r}")
        elif owners.get(lang.row, lang.name) != lang.name:
            problems.append(f"{where}: the row holds language {owners[lang.row]!r}")
        elif known.get(lang.name, lang.row) != lang.row:
            problems.append(f"{where}: the model already has it at row {known[lang.name]}")
        if seen.setdefault(lang.row, lang.name) != lang.name:
            problems.append(f"{where}: also used by language {seen[lang.row]!r}")
    if problems:
        raise BakeError("the adapter's language rows do not fit the model: " + "; ".join(problems))


def bake(
    config: TrainConfig,
    checkpoint: Path,
    output: Path,
    *,
    name: str | None = None,
    slot: int | None = None,
    force: bool = False,
    fuse: bool = True,
    export: Path | None = None,
    keep_cloning: bool = False,
    language: str | None = None,
    dequantize: bool = False,
) -> BakeResult:
    """Bake the speaker into a voice package (and, with `export`, a standalone checkpoint).

    The baked embedding is the mean over the training lines' speaker vectors; the language is
    the one the lines were trained in. An export fuses the adapter unless `fuse=False`, which is
    refused where the export would be a custom_voice checkpoint claiming the voice without its
    fine-tune.
    """
    if export is None and keep_cloning:
        raise BakeError("--keep-cloning describes an exported checkpoint: add --export")
    if export is None and not fuse:
        raise BakeError("--no-fuse describes an exported checkpoint: add --export")
    if export is None and dequantize:
        raise BakeError("--dequantize describes an exported checkpoint: add --export")
    if export is not None and not fuse and not keep_cloning:
        raise BakeError(
            "--no-fuse would export a custom_voice checkpoint that names this voice without its "
            "fine-tune: fuse the adapter (the default), or add --keep-cloning to export a Base "
            "model and keep the adapter apart"
        )
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
    language = training_language(clips, language)
    language_rows = read_language_rows(checkpoint, adapter_cfg)
    loaded = load_qwen3_tts(config.model.path)
    if loaded.model.speaker_encoder is None:
        raise BakeError("baking needs a Base model with a speaker encoder")
    check_slot(loaded.model, name, slot, force=force)
    check_language_rows(loaded.model, language_rows, slot)
    embedding = training_mean_embedding(loaded.model, clips)

    package = write_package(
        output,
        name=name,
        slot=slot,
        embedding=embedding,
        adapter_dir=checkpoint,
        adapter_cfg=adapter_cfg,
        base=loaded,
        language=language,
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
            language_rows=language_rows,
            dequantize=dequantize,
        )
    return BakeResult(package, name, slot, embedding, exported, language)


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
    ref_clip: Path | None = None,
) -> Path:
    """A voice package: what the server hot-loads (voice.json + embedding + adapter, and
    ref.wav for a voice conditioned on a reference clip).

    voice.json records everything the voice's conditioning needs (conditioning.py): where its
    speaker vector comes from, its language and any new language rows (their vectors ride in
    the adapter), and the exact base it was trained against, which the server checks.
    """
    cfg = adapter_cfg or {}
    trained = cfg.get("conditioning") or {"speaker": "baked" if embedding is not None else "none"}
    conditioning = VoiceConditioning.from_dict(
        {**trained, "language": language if language is not None else trained.get("language")}
    )
    if embedding is not None and conditioning.speaker != "baked":
        conditioning = VoiceConditioning(speaker="baked", language=conditioning.language)
    base_record = dict(cfg.get("base_model") or {})
    base_record.setdefault("path", str(base.path))
    base_record.setdefault("tts_model_size", base.config.get("tts_model_size"))
    base_record.setdefault("hidden_size", base.config["talker_config"]["hidden_size"])
    base_record.setdefault("identity", weights_identity(base.path))
    with atomic_directory(Path(output)) as staging:
        if embedding is not None:
            mx.save_safetensors(str(staging / EMBEDDING_FILE), {"embedding": mx.array(embedding)})
        if ref_clip is not None:
            write_wav(staging / "ref.wav", load_audio(ref_clip, 24_000))
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
            "strategy": cfg.get("strategy", "speaker"),
            "adapter": "adapter" if adapter_dir is not None else None,
            "embedding": EMBEDDING_FILE if embedding is not None else None,
            "language": conditioning.language,
            "conditioning": conditioning.to_dict(),
            "language_rows": list(cfg.get("language_rows") or []),
            "base_model": base_record,
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
    language_rows: list[LanguageRow] | None = None,
    dequantize: bool = False,
) -> Path:
    """Official custom-voice format (no speaker encoder), or a Base that also keeps cloning.

    `adapter_dir` is fused into the talker; new-language rows are written into
    `codec_embedding` and named in `codec_language_id` beside the languages already there.
    """
    if slot is None or embedding is None:
        raise BakeError("an exported custom voice needs a speaker slot and its embedding")
    model = loaded.model
    if adapter_dir is not None:
        # The language rows are no module of the talker: they are installed as rows below.
        load_adapters(model.talker, adapter_dir, ignore=(LANGUAGE_ROWS_TENSOR,))
        # A quantised base stays quantised (the fused layers are re-quantised like the base)
        # unless the export is asked to be full precision.
        fuse_lora(model.talker, requantize=loaded.quantization is not None and not dequantize)
    if dequantize:
        dequantize_linears(model)
    bake_into_model(model, name, slot, embedding)
    config = json.loads((loaded.path / "config.json").read_text())
    install_language_rows(model, config, language_rows or [])
    talker = config.setdefault("talker_config", {})
    talker["spk_id"] = {**(talker.get("spk_id") or {}), name: slot}
    talker["spk_is_dialect"] = {**(talker.get("spk_is_dialect") or {}), name: False}
    config["tts_model_type"] = "base" if keep_cloning else "custom_voice"
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return export_checkpoint(loaded, out_dir, config=config, drop_speaker_encoder=not keep_cloning)
