"""Qwen3-TTS fine-tuning: data -> codes -> LoRA on the talker (and code predictor) -> trainer.

Both strategies put the detached speaker-encoder embedding of each line's reference clip in the
codec prefix's speaker slot, as the official recipe does: `speaker` lines name their
`ref_audio`; a `language` line without one uses its own audio. A served voice conditions the
same way (conditioning.py): a baked speaker row (the mean of exactly those embeddings), or the
voice's reference clip. Languages the checkpoint has no id for get a trainable row
(languages.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import data as data_lib
from finetune import distributed
from finetune.audio import load_audio
from finetune.config import QWEN3_CODE_PREDICTOR_TARGETS, TrainConfig
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import (
    SpecialIds,
    VoiceConditioning,
    normalise_language,
)
from finetune.families.qwen3_tts.forward import qwen3_tts_loss
from finetune.families.qwen3_tts.languages import (
    WEIGHT_KEY,
    LanguageRows,
    attach_language_rows,
    new_languages,
)
from finetune.families.qwen3_tts.layout import (
    IGNORE,
    PackedBatch,
    build_sequence,
    chat_text,
    pack,
)
from finetune.families.qwen3_tts.quality import quality_hook
from finetune.identity import weights_identity
from finetune.lora import LoRAConfig, apply_lora, save_adapters
from finetune.progress import LanguageRow, NewLanguageRows, Phase, Preprocessed, ProgressWriter
from finetune.trainer import Trainer, TrainerConfig, TrainResult

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FAMILY = "qwen3_tts"


def speech_tokenizer_identity(model_path: Path) -> str:
    """Content hash of the speech tokenizer: cached codes are valid only for the same one."""
    digest = hashlib.sha256()
    folder = Path(model_path) / "speech_tokenizer"
    for file in [*sorted(folder.glob("*.safetensors")), folder / "config.json"]:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"qwen3_tts_12hz:{digest.hexdigest()[:16]}"


def codec_encoder(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """24 kHz mono float audio -> [T, 16] int codes with the model's own speech tokenizer."""

    def encode(audio: np.ndarray) -> np.ndarray:
        codes = model.speech_tokenizer.encode(mx.array(audio, dtype=mx.float32)[None, None, :])
        return np.asarray(codes[0]).T.astype(np.int32)

    return encode


def speaker_embedding(model: Any, audio_path: Path) -> np.ndarray:
    wav = load_audio(audio_path, 24_000)
    return np.asarray(model.extract_speaker_embedding(mx.array(wav))[0], dtype=np.float32)


def speaker_ref(clip: data_lib.Clip) -> Path:
    """The clip whose speaker embedding conditions a training line: its ref, else itself."""
    return Path(clip.ref_audio) if clip.ref_audio else Path(clip.audio)


def mean_speaker_embedding(model: Any, ref_paths: list[Path]) -> np.ndarray:
    """The mean over `ref_paths` as given, one term per training line (repeats count)."""
    cache: dict[Path, np.ndarray] = {}
    for path in ref_paths:
        if path not in cache:
            cache[path] = speaker_embedding(model, path)
    return np.mean(np.stack([cache[p] for p in ref_paths]), axis=0)


def voice_conditioning(strategy: str, clips: list[data_lib.Clip]) -> VoiceConditioning:
    """What the trained voice records: a baked row (speaker) or its reference clip (language),
    in the one language all its lines share (None when they mix: requests name it)."""
    languages = {normalise_language(c.language) for c in clips}
    language = languages.pop() if len(languages) == 1 else None
    return VoiceConditioning(
        speaker="baked" if strategy == "speaker" else "ref_clip", language=language
    )


@dataclass
class Qwen3Batch:
    packed: PackedBatch
    speaker_embeds: np.ndarray | None  # [B_spk, H] in the order of packed.speaker_rows
    size: int


class Collator:
    """Examples -> a packed batch, each line conditioned as its served voice will be."""

    def __init__(self, model: Any, speakers: dict[Path, np.ndarray]) -> None:
        self.tokenizer = model.tokenizer
        self.ids = SpecialIds.from_config(model.config)  # after new language rows are added
        self.speakers = speakers

    def __call__(self, examples: list[data_lib.Example]) -> Qwen3Batch:
        sequences = [
            build_sequence(
                self.ids,
                self.tokenizer.encode(chat_text(ex.clip.text)),
                ex.codes,
                VoiceConditioning(speaker="ref_clip", language=ex.clip.language).utterance(
                    None, None
                ),
            )
            for ex in examples
        ]
        spk = np.stack([self.speakers[speaker_ref(ex.clip)] for ex in examples])
        return Qwen3Batch(packed=pack(sequences, self.ids), speaker_embeds=spk, size=len(examples))


def make_loss_fn(sub_weight: float, label_smoothing: float):
    def loss_fn(talker: nn.Module, batch: Qwen3Batch) -> tuple[mx.array, dict[str, mx.array]]:
        spk = None if batch.speaker_embeds is None else mx.array(batch.speaker_embeds)
        parts = qwen3_tts_loss(
            talker, batch.packed, spk, sub_weight=sub_weight, label_smoothing=label_smoothing
        )
        return parts.total, {"main": parts.main, "sub": parts.sub}

    return loss_fn


def loss_terms(sub_weight: float) -> distributed.LossTerms:
    """`qwen3_tts_loss` as data-parallel weighting sees it: `main` is a mean over the labelled
    positions, `sub` over the frames the code predictor is trained on (x 15 codebooks)."""

    def counts(batch: Qwen3Batch) -> dict[str, float]:
        packed = batch.packed
        return {
            "main": float((packed.labels != IGNORE).sum()),
            "sub": float(len(packed.sub_positions)),
        }

    return distributed.LossTerms(coefficients={"main": 1.0, "sub": sub_weight}, counts=counts)


def lora_config(config: TrainConfig) -> LoRAConfig:
    targets = config.lora_targets
    if config.lora.train_code_predictor:
        targets += [t for t in QWEN3_CODE_PREDICTOR_TARGETS if t not in targets]
    return LoRAConfig(
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        targets=targets,
        scope="",
    )


def base_model_record(loaded: LoadedQwen3TTS, config: TrainConfig) -> dict[str, Any]:
    """The base a voice was trained against: where, its shape, and what exactly its weights were
    (content hash, and how they were quantised: by the checkpoint, or on the fly for QLoRA)."""
    talker = loaded.config["talker_config"]
    identity = weights_identity(loaded.path)
    if config.lora.quantize is not None:
        identity["quantization"] = {
            "bits": config.lora.quantize.bits,
            "group_size": config.lora.quantize.group_size,
            "on_the_fly": True,
        }
    return {
        "path": str(loaded.path),
        "tts_model_size": loaded.config.get("tts_model_size"),
        "hidden_size": talker["hidden_size"],
        "num_hidden_layers": talker["num_hidden_layers"],
        "identity": identity,
    }


def adapter_metadata(
    loaded: LoadedQwen3TTS,
    config: TrainConfig,
    conditioning: VoiceConditioning,
    language_rows: LanguageRows | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "family": FAMILY,
        "module": "talker",
        "strategy": config.model.strategy,
        "conditioning": conditioning.to_dict(),
        "base_model": base_model_record(loaded, config),
        "quantize": None
        if config.lora.quantize is None
        else {
            "bits": config.lora.quantize.bits,
            "group_size": config.lora.quantize.group_size,
        },
    }
    if language_rows is not None:
        meta["language_rows"] = language_rows.entries()
        meta["trained_tensors"] = [WEIGHT_KEY]
    return meta


def prepare_talker(loaded: LoadedQwen3TTS, config: TrainConfig) -> LoRAConfig:
    """Quantize the targets for QLoRA if asked, then wrap them with LoRA."""
    talker = loaded.model.talker
    lcfg = lora_config(config)
    if config.lora.quantize is not None and loaded.quantization is not None:
        raise ValueError(
            f"{loaded.path} is already quantised ({loaded.quantization}): drop lora.quantize "
            "(LoRA trains over its quantised layers as they are)"
        )
    if config.lora.quantize is not None:
        quantize_targets(talker, lcfg, config.lora.quantize.bits, config.lora.quantize.group_size)
    # The LoRA A matrices come from MLX's global RNG, which is seeded from the clock at import:
    # without this, two runs of the same config start from different adapters.
    mx.random.seed(config.trainer.seed)
    apply_lora(talker, lcfg)
    return lcfg


def quantize_targets(talker: nn.Module, lcfg: LoRAConfig, bits: int, group_size: int) -> None:
    import re

    patterns = [re.compile(t) for t in lcfg.targets]

    def wanted(path: str, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Linear)
            and module.weight.shape[-1] % group_size == 0
            and any(p.fullmatch(path) for p in patterns)
        )

    nn.quantize(talker, group_size=group_size, bits=bits, class_predicate=wanted)


def trainer_config(section: Any) -> TrainerConfig:
    """The trainer's settings: every field the config file's trainer section also names."""
    names = [f.name for f in dataclasses.fields(TrainerConfig) if hasattr(section, f.name)]
    return TrainerConfig(**{name: getattr(section, name) for name in names})


@dataclass
class PreparedRun:
    loaded: LoadedQwen3TTS
    lora: LoRAConfig
    trainer: Trainer


def prepare_run(
    config: TrainConfig,
    *,
    progress: ProgressWriter,
    resume: Path | None = None,
) -> PreparedRun:
    progress.emit(Phase(phase="validate"))
    strategy = config.model.strategy
    if strategy not in ("language", "speaker"):
        raise ValueError(f"qwen3_tts trains 'language' or 'speaker', not {strategy!r}")
    limits = {
        "min_duration_s": config.data.min_duration_s,
        "max_duration_s": config.data.max_duration_s,
    }
    train_clips = data_lib.read_jsonl(
        [Path(p) for p in config.data.train], strategy=strategy, **limits
    )
    val_clips = (
        data_lib.read_jsonl([Path(p) for p in config.data.val], strategy=strategy, **limits)
        if config.data.val
        else []
    )
    loaded = load_qwen3_tts(config.model.path)
    model = loaded.model

    progress.emit(Phase(phase="preprocess"))
    tokenizer_id = speech_tokenizer_identity(loaded.path)
    report = data_lib.preprocess(train_clips + val_clips, codec_encoder(model), tokenizer_id)
    progress.emit(Preprocessed(encoded=report.encoded, skipped=report.skipped))
    train = [data_lib.Example(c, data_lib.load_codes(c, tokenizer_id)) for c in train_clips]
    val = [data_lib.Example(c, data_lib.load_codes(c, tokenizer_id)) for c in val_clips]

    if model.speaker_encoder is None:
        raise ValueError(
            f"{loaded.path} has no speaker encoder (a custom_voice checkpoint): fine-tune a Base"
        )
    speakers: dict[Path, np.ndarray] = {}
    for clip in train_clips + val_clips:
        ref = speaker_ref(clip)
        if ref not in speakers:
            speakers[ref] = speaker_embedding(model, ref)

    lcfg = prepare_talker(loaded, config)
    languages = new_languages(
        model.config.talker_config, [c.language for c in train_clips + val_clips]
    )
    rows = attach_language_rows(model, languages)  # trainable: attached after LoRA froze all
    if rows is not None:
        progress.emit(
            NewLanguageRows(rows=[LanguageRow(e["name"], e["row"]) for e in rows.entries()])
        )
    talker = model.talker
    talker.train()
    collate = Collator(model, speakers)
    tcfg = config.trainer
    plan = data_lib.BatchPlan(train, tcfg.batch_size, seed=tcfg.seed)
    group = distributed.launched_group()  # None: one process

    def batches(epoch: int, index: int) -> Iterator[tuple[int, int, Any]]:
        source = (
            (e, i, distributed.shard_batch(collate, exs, group))
            for e, i, exs in plan.iterate(epoch, index)
        )
        return data_lib.prefetch(source, tcfg.prefetch) if tcfg.prefetch > 0 else source

    val_batches = []
    if val:
        val_plan = data_lib.BatchPlan(val, tcfg.batch_size, seed=0, shuffle=False)
        val_batches = [collate([val[i] for i in idx]) for idx in val_plan.epoch_batches(0)]

    conditioning = voice_conditioning(strategy, train_clips)
    metadata = adapter_metadata(loaded, config, conditioning, rows)
    # The voice's speaker-slot vector: what bake writes (speaker) or its one reference clip's.
    voice_lines = train_clips if strategy == "speaker" else train_clips[:1]
    voice_vector = np.mean(np.stack([speakers[speaker_ref(c)] for c in voice_lines]), axis=0)

    def save_weights(module: nn.Module, out_dir: Path) -> None:
        save_adapters(out_dir, module, lcfg, metadata)

    trainer = Trainer(
        module=talker,
        loss_fn=make_loss_fn(tcfg.sub_talker_weight, tcfg.label_smoothing),
        batches=batches,
        batches_per_epoch=plan.num_batches,
        save_weights=save_weights,
        config=trainer_config(tcfg),
        output_dir=Path(config.output_dir),
        samples_in=lambda batch: batch.size,
        val_batches=val_batches,
        progress=progress,
        on_checkpoint=quality_hook(
            config, loaded, train_clips, progress, voice=conditioning, speaker=voice_vector
        ),
        group=group,
        loss_terms=loss_terms(tcfg.sub_talker_weight),
    )
    if resume is not None:
        trainer.resume(resume)
    return PreparedRun(loaded=loaded, lora=lcfg, trainer=trainer)


def train(
    config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None
) -> TrainResult:
    run = prepare_run(config, progress=progress, resume=resume)
    progress.emit(Phase(phase="training"))
    return run.trainer.train()
