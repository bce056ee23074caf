"""CSM fine-tuning: JSONL clips -> Mimi codes -> LoRA on the SesameModel -> trainer.

A training example is the voice's served prompt (`conditioning.training_sequence`: the voice's
context clips, each `[speaker]text` + audio + EOS, then the clip's `[speaker]text`), then the
clip's audio frames and an all-zero EOS frame. The context clips are the first
`csm.context_clips` training clips of the voice's speaker id; the adapter records them and the
job packages exactly those, so serving prepends what training saw.

The backbone's hidden state at every position followed by one of the clip's audio frames
predicts that frame's codebook 0 (`codebook0_head`); the depth decoder, fed that hidden state
and the frame's codebooks 0..N-2 (teacher forcing), predicts codebooks 1..N-1
(`audio_head`). loss = CE(codebook 0) + csm.decoder_loss_weight x mean CE(codebooks 1..N-1). The
decoder can be trained on a random share of the frames (Sesame's "compute amortization").

LoRA wraps the SesameModel (`loaded.backbone`, adapter module "model"): the backbone's attention
and MLP projections, and the depth decoder's with `csm.train_decoder`. Mimi is never trained and
never wrapped (it lives outside the SesameModel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import data as data_lib
from finetune.config import ConfigError, TrainConfig
from finetune.families.csm.checkpoint import FAMILY, LoadedCsm, load_csm
from finetune.families.csm.conditioning import (
    ContextClip,
    Frames,
    audio_frames,
    encode_audio,
    text_frames,
    training_sequence,
)
from finetune.families.csm.family import (
    ADAPTER_MODULE,
    CSM_BACKBONE_TARGETS,  # noqa: F401 (re-exported)
    CSM_DECODER_TARGETS,
)
from finetune.families.csm.family import FAMILY as CSM_FAMILY
from finetune.families.csm.mimi import MIMI_DIR, MIMI_FILENAME, MIMI_REPO
from finetune.lora import LoRAConfig, apply_lora, save_adapters
from finetune.progress import Phase, Preprocessed, ProgressWriter
from finetune.quality import unavailable_hook
from finetune.trainer import Trainer, TrainerConfig, TrainResult

import mlx.core as mx
import mlx.nn as nn
import numpy as np

STRATEGIES = CSM_FAMILY.strategies


# --------------------------------------------------------------------------- batches


@dataclass
class CsmBatch:
    tokens: np.ndarray  # [B, L, N + 1] int32, rows past an example's end are all masked
    mask: np.ndarray  # [B, L, N + 1] bool
    target_rows: np.ndarray  # [M] flat indices into B * L: positions followed by an audio frame
    target_codes: np.ndarray  # [M, N] the frame each of those positions predicts
    decoder_rows: np.ndarray  # [M'] indices into the M targets the depth decoder trains on
    size: int


def example_frames(loaded: LoadedCsm, text: str, speaker: int, codes: np.ndarray) -> Frames:
    return Frames.concat([text_frames(loaded, text, speaker), audio_frames(codes)])


def collate(
    sequences: list[tuple[Frames, int]], *, decoder_fraction: float, rng: np.random.Generator
) -> CsmBatch:
    """`(frames, text_rows)` per example -> one padded batch with its prediction targets."""
    length = max(len(frames) for frames, _ in sequences)
    width = sequences[0][0].tokens.shape[1]
    tokens = np.zeros((len(sequences), length, width), np.int32)
    mask = np.zeros((len(sequences), length, width), bool)
    rows: list[int] = []
    codes: list[np.ndarray] = []
    for b, (frames, text_rows) in enumerate(sequences):
        tokens[b, : len(frames)] = frames.tokens
        mask[b, : len(frames)] = frames.mask
        for t in range(text_rows - 1, len(frames) - 1):  # position t predicts frame t + 1
            rows.append(b * length + t)
            codes.append(frames.tokens[t + 1, :-1])
    m = len(rows)
    keep = max(1, round(m * decoder_fraction))
    decoder_rows = np.arange(m) if keep >= m else np.sort(rng.choice(m, keep, replace=False))
    return CsmBatch(
        tokens=tokens,
        mask=mask,
        target_rows=np.asarray(rows, np.int32),
        target_codes=np.stack(codes).astype(np.int32),
        decoder_rows=decoder_rows.astype(np.int32),
        size=len(sequences),
    )


# --------------------------------------------------------------------------- forward and loss


@dataclass
class CsmLogits:
    codebook0: mx.array  # [M, V] for every target
    decoder: mx.array  # [M', N - 1, V] codebooks 1..N-1 for the decoder's targets


def teacher_forced_logits(sesame: nn.Module, batch: CsmBatch) -> CsmLogits:
    """The logits the frame-by-frame generation path computes, for every target at once."""
    tokens = mx.array(batch.tokens)
    embeds = sesame._embed_tokens(tokens)  # [B, L, N + 1, D]
    h = (embeds * mx.array(batch.mask)[..., None].astype(embeds.dtype)).sum(axis=2)
    h = sesame.backbone(h)  # no cache: a causal mask for multi-token inputs
    b, length, width = h.shape
    hidden = h.reshape(b * length, width)[mx.array(batch.target_rows)]  # [M, D]
    codebook0 = sesame.codebook0_head(hidden)

    n = sesame.args.audio_num_codebooks
    vocab = sesame.args.audio_vocab_size
    chosen = mx.array(batch.decoder_rows)
    codes = mx.array(batch.target_codes)[chosen]  # [M', N]
    offsets = mx.arange(n - 1) * vocab
    inputs = mx.concatenate(
        [hidden[chosen][:, None, :], sesame.audio_embeddings(codes[:, :-1] + offsets)], axis=1
    )  # [M', N, D]: h, then codebooks 0..N-2
    decoded = sesame.decoder(sesame.projection(inputs))  # [M', N, Dd], causal
    # Position i (1..N-1) predicts codebook i through audio_head[i - 1].
    per_codebook = mx.matmul(decoded[:, 1:].swapaxes(0, 1), sesame.audio_head)  # [N-1, M', V]
    return CsmLogits(codebook0=codebook0, decoder=per_codebook.swapaxes(0, 1))


def _cross_entropy(logits: mx.array, targets: mx.array, smoothing: float) -> mx.array:
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    if smoothing <= 0.0:
        return nll
    return (1.0 - smoothing) * nll - smoothing * logprobs.mean(axis=-1)


def csm_loss(
    sesame: nn.Module,
    batch: CsmBatch,
    *,
    decoder_weight: float,
    label_smoothing: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    logits = teacher_forced_logits(sesame, batch)
    codes = mx.array(batch.target_codes)
    c0 = _cross_entropy(logits.codebook0.astype(mx.float32), codes[:, 0], label_smoothing).mean()
    rest = codes[mx.array(batch.decoder_rows)][:, 1:]
    decoder = _cross_entropy(logits.decoder.astype(mx.float32), rest, label_smoothing).mean()
    return c0 + decoder_weight * decoder, {"codebook0": c0, "decoder": decoder}


# --------------------------------------------------------------------------- LoRA


def lora_config(config: TrainConfig) -> LoRAConfig:
    targets = config.lora_targets
    if config.csm.train_decoder:
        targets += [t for t in CSM_DECODER_TARGETS if t not in targets]
    return LoRAConfig(
        rank=config.lora.rank,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        targets=targets,
        scope="",
    )


def prepare_lora(loaded: LoadedCsm, config: TrainConfig) -> LoRAConfig:
    """Quantize the targets for QLoRA if asked, then wrap them with LoRA (in the SesameModel)."""
    sesame = loaded.backbone
    lcfg = lora_config(config)
    quantize = config.lora.quantize
    if quantize is not None:
        patterns = [re.compile(t) for t in lcfg.targets]

        def wanted(path: str, module: nn.Module) -> bool:
            return (
                isinstance(module, nn.Linear)
                and module.weight.shape[-1] % quantize.group_size == 0
                and any(p.fullmatch(path) for p in patterns)
            )

        nn.quantize(
            sesame, group_size=quantize.group_size, bits=quantize.bits, class_predicate=wanted
        )
    mx.random.seed(config.trainer.seed)  # the LoRA A matrices: same config, same run
    apply_lora(sesame, lcfg)
    return lcfg


def adapter_metadata(
    loaded: LoadedCsm, config: TrainConfig, context: list[data_lib.Clip]
) -> dict[str, Any]:
    quantize = config.lora.quantize
    return {
        "family": FAMILY,
        "module": ADAPTER_MODULE,
        "strategy": config.model.strategy,
        "speaker_id": config.csm.speaker_id,
        # The clips every training example was prefixed with: the voice's package carries them.
        "context": [{"audio": str(c.audio), "text": c.text} for c in context],
        "base_model": loaded.base_model_info(),
        "quantize": None
        if quantize is None
        else {"bits": quantize.bits, "group_size": quantize.group_size},
    }


# --------------------------------------------------------------------------- data


def codec_identity(loaded: LoadedCsm) -> str:
    """Content hash of the Mimi that made the codes: cached codes are valid only for it."""
    digest = hashlib.sha256()
    folder = loaded.path / MIMI_DIR
    if folder.is_dir():
        files = [folder / MIMI_FILENAME, *sorted(folder.glob("*.json"))]
    else:
        files = []
        digest.update(f"{MIMI_REPO}/{MIMI_FILENAME}".encode())
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(str(loaded.num_codebooks).encode())
    return f"csm_mimi:{digest.hexdigest()[:16]}"


def clip_speakers(clips: list[data_lib.Clip], default: int) -> dict[tuple[Path, int], int]:
    """Each line's optional integer `speaker` (the config's speaker id when absent)."""
    speakers: dict[tuple[Path, int], int] = {}
    problems: list[str] = []
    lines: dict[Path, list[bytes]] = {}
    for clip in clips:
        if clip.source not in lines:
            raw = clip.source.read_bytes().removeprefix(b"\xef\xbb\xbf")
            lines[clip.source] = raw.splitlines()
        value = json.loads(lines[clip.source][clip.line - 1]).get("speaker", default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(
                f"{clip.source}:{clip.line}: 'speaker' must be an integer id >= 0, got {value!r}"
            )
            continue
        speakers[(clip.source, clip.line)] = value
    if problems:
        raise data_lib.DataError(problems)
    return speakers


def voice_context(
    config: TrainConfig, clips: list[data_lib.Clip], speakers: dict[tuple[Path, int], int]
) -> list[data_lib.Clip]:
    """The voice's context clips: the first `csm.context_clips` training clips of its speaker id."""
    own = [c for c in clips if speakers[(c.source, c.line)] == config.csm.speaker_id]
    return own[: max(0, config.csm.context_clips)]


def read_clips(config: TrainConfig, paths: list[str]) -> list[data_lib.Clip]:
    if not paths:
        return []
    return data_lib.read_jsonl(
        [Path(p) for p in paths],
        strategy="language",  # CSM needs no ref_audio: the speaker is an id
        min_duration_s=config.data.min_duration_s,
        max_duration_s=config.data.max_duration_s,
    )


def trainer_config(section: Any) -> TrainerConfig:
    names = [f.name for f in dataclasses.fields(TrainerConfig) if hasattr(section, f.name)]
    return TrainerConfig(**{name: getattr(section, name) for name in names})


# --------------------------------------------------------------------------- run


@dataclass
class PreparedRun:
    loaded: LoadedCsm
    lora: LoRAConfig
    trainer: Trainer


def prepare_run(
    config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None
) -> PreparedRun:
    progress.emit(Phase(phase="validate"))
    if config.model.strategy not in STRATEGIES:
        raise ConfigError(
            f"csm trains the {' or '.join(STRATEGIES)} strategy, not {config.model.strategy!r}"
        )
    if not 0.0 < config.csm.decoder_frame_fraction <= 1.0:
        raise ConfigError("csm.decoder_frame_fraction must be in (0, 1]")
    if config.csm.speaker_id < 0:
        raise ConfigError("csm.speaker_id must be >= 0")
    train_clips = read_clips(config, config.data.train)
    val_clips = read_clips(config, config.data.val)
    speakers = clip_speakers(train_clips + val_clips, config.csm.speaker_id)
    loaded = load_csm(config.model.path)

    progress.emit(Phase(phase="preprocess"))
    codec_id = codec_identity(loaded)
    n = loaded.num_codebooks
    report = data_lib.preprocess(
        train_clips + val_clips,
        lambda audio: encode_audio(loaded, audio),
        codec_id,
        num_codebooks=n,
    )
    progress.emit(Preprocessed(encoded=report.encoded, skipped=report.skipped))
    train = data_lib.load_examples(train_clips, codec_id, num_codebooks=n)
    val = data_lib.load_examples(val_clips, codec_id, num_codebooks=n)

    context_clips = voice_context(config, [ex.clip for ex in train], speakers)
    codes_of = {(ex.clip.source, ex.clip.line): ex.codes for ex in train}
    # The context as serving builds it: the voice's speaker id, the clips' Mimi codes.
    context = [
        ContextClip(text=c.text, speaker=config.csm.speaker_id, codes=codes_of[(c.source, c.line)])
        for c in context_clips
    ]

    def sequence(example: data_lib.Example) -> tuple[Frames, int]:
        clip = example.clip
        speaker = speakers[(clip.source, clip.line)]
        return training_sequence(loaded, clip.text, speaker, example.codes, context)

    # Tokenized once: batches are then pure numpy (and may be built on the prefetch thread).
    train_sequences = {id(ex): sequence(ex) for ex in train}
    val_sequences = {id(ex): sequence(ex) for ex in val}

    lcfg = prepare_lora(loaded, config)
    sesame = loaded.backbone
    sesame.train()
    tcfg = config.trainer
    fraction = config.csm.decoder_frame_fraction
    plan = data_lib.BatchPlan(train, tcfg.batch_size, seed=tcfg.seed)

    def batches(epoch: int, index: int) -> Iterator[tuple[int, int, CsmBatch]]:
        source = (
            (
                e,
                i,
                collate(
                    [train_sequences[id(ex)] for ex in exs],
                    decoder_fraction=fraction,
                    rng=np.random.default_rng([tcfg.seed, e, i]),
                ),
            )
            for e, i, exs in plan.iterate(epoch, index)
        )
        return data_lib.prefetch(source, tcfg.prefetch) if tcfg.prefetch > 0 else source

    val_batches = []
    if val:
        val_plan = data_lib.BatchPlan(val, tcfg.batch_size, seed=0, shuffle=False)
        val_batches = [
            collate(
                [val_sequences[id(val[i])] for i in idx],
                decoder_fraction=1.0,
                rng=np.random.default_rng(0),
            )
            for idx in val_plan.epoch_batches(0)
        ]

    metadata = adapter_metadata(loaded, config, context_clips)
    weight = config.csm.decoder_loss_weight
    smoothing = tcfg.label_smoothing

    def loss_fn(module: nn.Module, batch: CsmBatch) -> tuple[mx.array, dict[str, mx.array]]:
        return csm_loss(module, batch, decoder_weight=weight, label_smoothing=smoothing)

    def save_weights(module: nn.Module, out_dir: Path) -> None:
        save_adapters(out_dir, module, lcfg, metadata)

    trainer = Trainer(
        module=sesame,
        loss_fn=loss_fn,
        batches=batches,
        batches_per_epoch=plan.num_batches,
        save_weights=save_weights,
        config=trainer_config(tcfg),
        output_dir=Path(config.output_dir),
        samples_in=lambda batch: batch.size,
        val_batches=val_batches,
        progress=progress,
        on_checkpoint=unavailable_hook(config, progress),
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


def smoke_config(config: TrainConfig, workdir: Path, *, keep_output: bool) -> TrainConfig:
    """The same config on a tiny CSM and synthetic clips, for a few steps."""
    from finetune.data import synthetic_dataset
    from finetune.families.csm.tiny import make_tiny_csm
    from finetune.smoke import smoke_run

    model = make_tiny_csm(workdir / "model", seed=0)
    train_jsonl = synthetic_dataset(workdir / "data", 4, seed=0, with_ref=False)
    return smoke_run(config, workdir, model=model, train_jsonl=train_jsonl, keep_output=keep_output)
