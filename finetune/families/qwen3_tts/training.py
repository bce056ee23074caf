"""Qwen3-TTS fine-tuning: data -> codes -> LoRA on the talker -> trainer.

Strategies: `language` (no speaker conditioning) and `speaker` (the detached speaker-encoder
embedding of each line's ref clip sits in the codec prefix's speaker slot).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import data as data_lib
from finetune.audio import load_audio
from finetune.config import QWEN3_CODE_PREDICTOR_TARGETS, TrainConfig
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts
from finetune.families.qwen3_tts.forward import qwen3_tts_loss
from finetune.families.qwen3_tts.layout import (
    PackedBatch,
    SpecialIds,
    build_sequence,
    chat_text,
    pack,
)
from finetune.lora import LoRAConfig, apply_lora, save_adapters
from finetune.progress import ProgressWriter
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


def mean_speaker_embedding(model: Any, ref_paths: list[Path]) -> np.ndarray:
    vectors = [speaker_embedding(model, p) for p in sorted(set(ref_paths))]
    return np.mean(np.stack(vectors), axis=0)


@dataclass
class Qwen3Batch:
    packed: PackedBatch
    speaker_embeds: np.ndarray | None  # [B_spk, H] in the order of packed.speaker_rows
    size: int


class Collator:
    def __init__(self, model: Any, strategy: str, speakers: dict[Path, np.ndarray]) -> None:
        self.tokenizer = model.tokenizer
        self.ids = SpecialIds.from_config(model.config)
        self.strategy = strategy
        self.speakers = speakers

    def __call__(self, examples: list[data_lib.Example]) -> Qwen3Batch:
        with_speaker = self.strategy == "speaker"
        sequences = [
            build_sequence(
                self.ids,
                self.tokenizer.encode(chat_text(ex.clip.text)),
                ex.codes,
                language=ex.clip.language,
                with_speaker=with_speaker,
            )
            for ex in examples
        ]
        spk = None
        if with_speaker:
            spk = np.stack([self.speakers[Path(ex.clip.ref_audio)] for ex in examples])
        return Qwen3Batch(packed=pack(sequences, self.ids), speaker_embeds=spk, size=len(examples))


def make_loss_fn(sub_weight: float, label_smoothing: float):
    def loss_fn(talker: nn.Module, batch: Qwen3Batch) -> tuple[mx.array, dict[str, mx.array]]:
        spk = None if batch.speaker_embeds is None else mx.array(batch.speaker_embeds)
        parts = qwen3_tts_loss(
            talker, batch.packed, spk, sub_weight=sub_weight, label_smoothing=label_smoothing
        )
        return parts.total, {"main": parts.main, "sub": parts.sub}

    return loss_fn


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


def adapter_metadata(loaded: LoadedQwen3TTS, config: TrainConfig) -> dict[str, Any]:
    talker = loaded.config["talker_config"]
    return {
        "family": FAMILY,
        "module": "talker",
        "strategy": config.model.strategy,
        "base_model": {
            "path": str(loaded.path),
            "tts_model_size": loaded.config.get("tts_model_size"),
            "hidden_size": talker["hidden_size"],
            "num_hidden_layers": talker["num_hidden_layers"],
        },
        "quantize": None
        if config.lora.quantize is None
        else {
            "bits": config.lora.quantize.bits,
            "group_size": config.lora.quantize.group_size,
        },
    }


def prepare_talker(loaded: LoadedQwen3TTS, config: TrainConfig) -> LoRAConfig:
    """Quantize the targets for QLoRA if asked, then wrap them with LoRA."""
    talker = loaded.model.talker
    lcfg = lora_config(config)
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
    progress.emit("phase", phase="validate")
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

    progress.emit("phase", phase="preprocess")
    tokenizer_id = speech_tokenizer_identity(loaded.path)
    report = data_lib.preprocess(train_clips + val_clips, codec_encoder(model), tokenizer_id)
    progress.emit("preprocessed", encoded=report.encoded, skipped=report.skipped)
    train = [data_lib.Example(c, data_lib.load_codes(c, tokenizer_id)) for c in train_clips]
    val = [data_lib.Example(c, data_lib.load_codes(c, tokenizer_id)) for c in val_clips]

    speakers: dict[Path, np.ndarray] = {}
    if strategy == "speaker":
        for clip in train_clips + val_clips:
            ref = Path(clip.ref_audio)
            if ref not in speakers:
                speakers[ref] = speaker_embedding(model, ref)

    lcfg = prepare_talker(loaded, config)
    talker = model.talker
    talker.train()
    collate = Collator(model, strategy, speakers)
    tcfg = config.trainer
    plan = data_lib.BatchPlan(train, tcfg.batch_size, seed=tcfg.seed)

    def batches(epoch: int, index: int) -> Iterator[tuple[int, int, Qwen3Batch]]:
        source = ((e, i, collate(exs)) for e, i, exs in plan.iterate(epoch, index))
        return data_lib.prefetch(source, tcfg.prefetch) if tcfg.prefetch > 0 else source

    val_batches = []
    if val:
        val_plan = data_lib.BatchPlan(val, tcfg.batch_size, seed=0, shuffle=False)
        val_batches = [collate([val[i] for i in idx]) for idx in val_plan.epoch_batches(0)]

    metadata = adapter_metadata(loaded, config)

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
    )
    if resume is not None:
        trainer.resume(resume)
    return PreparedRun(loaded=loaded, lora=lcfg, trainer=trainer)


def train(
    config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None
) -> TrainResult:
    run = prepare_run(config, progress=progress, resume=resume)
    progress.emit("phase", phase="training")
    return run.trainer.train()
