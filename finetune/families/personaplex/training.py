"""PersonaPlex LoRA fine-tuning (strategy `duplex`): paired audio -> Mimi codes -> LoRA -> trainer.

Trained: LoRA on the temporal attention (`in_proj`, `out_proj`) and on the depformer bridge
(`depformer.slices.N.linear_in`); full weights of `audio_embs` and `out_norm` (each optional).
`text_linear` (the 32000 x 4096 vocabulary projection) stays frozen unless
`personaplex.freeze_text_linear` is false: trained on ~1K samples it overfits into garbage.
The adapter's `trained_tensors` lists the fully trained tensors by their Lm parameter names.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items
from finetune.audio import TARGET_SAMPLE_RATE, AudioError, load_audio
from finetune.config import ConfigError, TrainConfig
from finetune.data import BatchPlan, prefetch
from finetune.families.personaplex import data as duplex_data
from finetune.families.personaplex.conditioning import (
    DuplexConditioning,
    conditioned_codes,
    prefix_codes,
)
from finetune.families.personaplex.forward import LossWeights, StreamLayout, personaplex_loss
from finetune.lora import LoRAConfig, apply_lora, save_adapters
from finetune.progress import Phase, Preprocessed, ProgressWriter
from finetune.quality import unavailable_hook
from finetune.smoke import smoke_run
from finetune.trainer import Trainer, TrainerConfig, TrainResult

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FAMILY = "personaplex"
SMOKE_CLIPS = 4


def codec_identity(mimi: nn.Module) -> str:
    """Content hash of the Mimi weights: cached codes are valid only for the same codec."""
    digest = hashlib.sha256()
    for name, value in sorted(flat_items(mimi.parameters()), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.asarray(value.astype(mx.float32)).tobytes())
    return f"mimi:{digest.hexdigest()[:16]}"


def mimi_encoder(mimi: nn.Module) -> duplex_data.Encoder:
    """24 kHz mono float audio -> [T, 8] int codes (batch encode; resets Mimi's state)."""

    def encode(audio: np.ndarray) -> np.ndarray:
        codes = mimi.encode(mx.array(audio, dtype=mx.float32)[None, None, :])
        return np.asarray(codes[0]).T.astype(np.int32)

    return encode


def lora_config(config: TrainConfig) -> LoRAConfig:
    return LoRAConfig(
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        targets=config.lora_targets,
        scope="",
    )


def prepare_lm(lm: nn.Module, config: TrainConfig) -> tuple[LoRAConfig, list[str]]:
    """Wrap the targets with LoRA (freezing everything), then unfreeze the fully trained
    tensors; returns the LoRA config and those tensors' names."""
    lcfg = lora_config(config)
    mx.random.seed(config.trainer.seed)  # LoRA A is drawn from the global generator
    apply_lora(lm, lcfg)
    section = config.personaplex
    trained: list[str] = []
    if section.train_audio_embs:
        for index, emb in enumerate(lm.audio_embs):
            emb.unfreeze(keys=["weight"], recurse=False)
            trained.append(f"audio_embs.{index}.weight")
    if section.train_out_norm:
        lm.out_norm.unfreeze(keys=["weight"], recurse=False)
        trained.append("out_norm.weight")
    if not section.freeze_text_linear:
        if not isinstance(lm.text_linear, nn.Linear):
            raise ValueError("text_linear carries LoRA: leave it out of lora.targets to train it")
        lm.text_linear.unfreeze(keys=["weight"], recurse=False)
        trained.append("text_linear.weight")
    return lcfg, trained


def base_model_info(path: Path, lm: nn.Module) -> dict[str, Any]:
    cfg = lm.cfg
    return {
        "path": str(path),
        "dim": cfg.transformer.d_model,
        "num_layers": cfg.transformer.num_layers,
        "num_heads": cfg.transformer.num_heads,
        "depformer_dim": cfg.depformer.transformer.d_model,
        "depformer_num_layers": cfg.depformer.transformer.num_layers,
        "dep_q": cfg.depformer.num_slices,
        "n_q": cfg.audio_codebooks,
        "text_card": cfg.text_out_vocab_size,
        "card": cfg.audio_vocab_size - 1,
        "delays": [0, *cfg.audio_delays],
        # A voice trained on a quantised variant says so (None: full precision).
        "quantization": _quantization(path),
    }


def _quantization(path: Path) -> dict[str, Any] | None:
    from finetune.identity import quantization

    return quantization(path) if (Path(path) / "config.json").is_file() else None


def adapter_metadata(
    path: Path, lm: nn.Module, config: TrainConfig, trained: list[str]
) -> dict[str, Any]:
    return {
        "family": FAMILY,
        "module": "lm",
        "strategy": config.model.strategy,
        "trained_tensors": list(trained),
        "base_model": base_model_info(path, lm),
    }


def trainer_config(section: Any) -> TrainerConfig:
    """The trainer's settings: every field the config file's trainer section also names."""
    names = [f.name for f in dataclasses.fields(TrainerConfig) if hasattr(section, f.name)]
    return TrainerConfig(**{name: getattr(section, name) for name in names})


def loss_weights(config: TrainConfig) -> LossWeights:
    section = config.personaplex
    return LossWeights(
        text=section.text_loss_weight,
        audio=section.audio_loss_weight,
        text_padding=section.text_padding_weight,
        user_audio=section.user_audio_loss_weight,
    )


def make_loss_fn(weights: LossWeights, pad_ids: tuple[int, ...]):
    def loss_fn(lm: nn.Module, batch: duplex_data.DuplexBatch) -> tuple[mx.array, dict]:
        parts = personaplex_loss(
            lm, batch.codes, weights, text_pad_ids=pad_ids, loss_from=batch.loss_from
        )
        report = {"text": parts.text, "audio": parts.audio}
        if parts.user_audio is not None:
            report["user_audio"] = parts.user_audio
        return parts.total, report

    return loss_fn


def text_tokenizer(loaded: Any) -> duplex_data.TextTokenizer:
    pad = int((loaded.config or {}).get("existing_text_padding_id", duplex_data.TEXT_PAD))
    return duplex_data.TextTokenizer.from_sentencepiece(loaded.text_tokenizer, pad_id=pad)


PromptPrefix = Callable[[duplex_data.DuplexClip], np.ndarray]


def prompt_prefixes(loaded: Any) -> PromptPrefix:
    """clip -> the [P, 17] prompt frames a session of its voice runs first (`conditioning.py`),
    one computation per distinct (voice prompt, text prompt)."""
    from finetune.families.personaplex.mimi_stream import MimiStreamer

    streamer: MimiStreamer | None = None
    cache: dict[tuple[Path | None, str | None], np.ndarray] = {}

    def prefix(clip: duplex_data.DuplexClip) -> np.ndarray:
        nonlocal streamer
        key = (clip.voice_prompt, clip.text_prompt)
        if key not in cache:
            audio = None
            if clip.voice_prompt is not None:
                audio = load_audio(clip.voice_prompt, TARGET_SAMPLE_RATE)
                streamer = streamer or MimiStreamer(loaded.mimi)
            cond = DuplexConditioning.build(
                streamer,
                loaded.text_tokenizer,
                voice_prompt=audio,
                text_prompt=clip.text_prompt,
            )
            cache[key] = prefix_codes(cond)
        return cache[key]

    return prefix


def build_examples(
    clips: list[duplex_data.DuplexClip],
    encode: duplex_data.Encoder,
    codec_id: str,
    tokenizer: duplex_data.TextTokenizer,
    max_frames: int,
    prompts: PromptPrefix | None = None,
) -> list[duplex_data.DuplexExample]:
    """Cached codes -> examples, each after the prompt frames `prompts` gives its clip (the
    session's conditioning); one DataError lists every clip that cannot be used."""
    if not clips:
        return []
    streams = {
        key: duplex_data.load_stream(*key, codec_id) for clip in clips for key in clip.streams
    }
    silence = duplex_data.silence_codes(encode, max(s.frames for s in streams.values()))
    examples: list[duplex_data.DuplexExample] = []
    problems: list[str] = []
    for clip in clips:
        agent, *user = (streams[key] for key in clip.streams)
        prefix = None
        if prompts is not None:
            try:
                codes = prompts(clip)
            except (OSError, AudioError, ValueError) as exc:
                problems.append(f"{clip.source}:{clip.line}: voice prompt: {exc}")
                continue
            prefix = partial(conditioned_codes, codes)
        try:
            example = duplex_data.build_example(
                clip,
                agent,
                user[0] if user else None,
                silence,
                tokenizer,
                max_frames=max_frames,
                prefix=prefix,
            )
            examples.append(example)
        except duplex_data.DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise duplex_data.DataError(problems)
    return examples


@dataclass
class PreparedRun:
    loaded: Any  # LoadedPersonaPlex
    lora: LoRAConfig
    trained_tensors: list[str]
    trainer: Trainer


def prepare_run(
    config: TrainConfig,
    *,
    progress: ProgressWriter,
    resume: Path | None = None,
) -> PreparedRun:
    from finetune.families.personaplex.checkpoint import load_personaplex

    progress.emit(Phase(phase="validate"))
    if config.model.strategy != "duplex":
        raise ConfigError(
            f"model.strategy: personaplex trains 'duplex', not {config.model.strategy!r}"
        )
    limits = {
        "min_duration_s": config.data.min_duration_s,
        "max_duration_s": config.data.max_duration_s,
    }
    train_clips = duplex_data.read_jsonl([Path(p) for p in config.data.train], **limits)
    val_clips = (
        duplex_data.read_jsonl([Path(p) for p in config.data.val], **limits)
        if config.data.val
        else []
    )
    loaded = load_personaplex(config.model.path)
    lm = loaded.lm

    progress.emit(Phase(phase="preprocess"))
    codec_id = codec_identity(loaded.mimi)
    encode = mimi_encoder(loaded.mimi)
    report = duplex_data.preprocess(train_clips + val_clips, encode, codec_id)
    progress.emit(Preprocessed(encoded=report.encoded, skipped=report.skipped))
    tokenizer = text_tokenizer(loaded)
    max_frames = lm.cfg.transformer.context - StreamLayout.from_lm(lm).max_delay
    prompts = prompt_prefixes(loaded)
    train = build_examples(train_clips, encode, codec_id, tokenizer, max_frames, prompts)
    val = build_examples(val_clips, encode, codec_id, tokenizer, max_frames, prompts)

    lcfg, trained = prepare_lm(lm, config)
    lm.train()
    tcfg = config.trainer
    plan = BatchPlan(train, tcfg.batch_size, seed=tcfg.seed)

    def batches(epoch: int, index: int) -> Iterator[tuple[int, int, duplex_data.DuplexBatch]]:
        source = ((e, i, duplex_data.pack(exs)) for e, i, exs in plan.iterate(epoch, index))
        return prefetch(source, tcfg.prefetch) if tcfg.prefetch > 0 else source

    val_batches = []
    if val:
        val_plan = BatchPlan(val, tcfg.batch_size, seed=0, shuffle=False)
        val_batches = [duplex_data.pack([val[i] for i in b]) for b in val_plan.epoch_batches(0)]

    metadata = adapter_metadata(loaded.path, lm, config, trained)

    def save_weights(module: nn.Module, out_dir: Path) -> None:
        save_adapters(out_dir, module, lcfg, metadata)

    trainer = Trainer(
        module=lm,
        loss_fn=make_loss_fn(loss_weights(config), (tokenizer.pad_id, tokenizer.epad_id)),
        batches=batches,
        batches_per_epoch=plan.num_batches,
        save_weights=save_weights,
        config=trainer_config(tcfg),
        output_dir=Path(config.output_dir),
        samples_in=_batch_size,
        val_batches=val_batches,
        progress=progress,
        on_checkpoint=unavailable_hook(config, progress),
    )
    if resume is not None:
        trainer.resume(resume)
    return PreparedRun(loaded=loaded, lora=lcfg, trained_tensors=trained, trainer=trainer)


def _batch_size(batch: duplex_data.DuplexBatch) -> int:
    return batch.size


def train(
    config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None
) -> TrainResult:
    run = prepare_run(config, progress=progress, resume=resume)
    progress.emit(Phase(phase="training"))
    return run.trainer.train()


def smoke_config(config: TrainConfig, workdir: Path, *, keep_output: bool) -> TrainConfig:
    """The same config on a tiny PersonaPlex and a synthetic paired dataset, for a few steps."""
    from finetune.families.personaplex.tiny import make_tiny_personaplex

    model = make_tiny_personaplex(Path(workdir) / "model", seed=0, preset="tiny")
    train_jsonl = duplex_data.synthetic_dataset(Path(workdir) / "data", SMOKE_CLIPS, seed=0)
    return smoke_run(
        config,
        workdir,
        model=model,
        train_jsonl=train_jsonl,
        keep_output=keep_output,
        min_duration_s=min(config.data.min_duration_s, 0.5),
        max_duration_s=max(config.data.max_duration_s, 5.0),
    )
