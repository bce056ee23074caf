"""Teacher-forced talker + code predictor forward and the Qwen3-TTS training loss.

loss = CE(codebook 0, next frame, codec_eos included) + sub_weight x CE(codebooks 1-15 from the
code predictor fed the talker hidden state that predicted that frame), masked to real frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.families.qwen3_tts.layout import IGNORE, NO_CODEC, PackedBatch

import mlx.core as mx
import mlx.nn as nn

SUB_TALKER_WEIGHT = 0.3


@dataclass
class LossParts:
    total: mx.array
    main: mx.array
    sub: mx.array


def input_embeddings(
    talker: nn.Module, batch: PackedBatch, speaker_embeds: mx.array | None
) -> mx.array:
    """[B, L, H]: text channel + codec channel (+ all 16 codebooks on frame positions)."""
    text = talker.text_projection(talker.model.text_embedding(mx.array(batch.text_ids)))
    codec_ids = mx.array(batch.codec_ids)
    codec = talker.model.codec_embedding(mx.maximum(codec_ids, 0))
    codec = codec * (codec_ids >= 0)[..., None].astype(codec.dtype)
    if "language_rows" in talker:  # new languages being trained (languages.py)
        codec = talker.language_rows.overlay(codec_ids, codec)

    frame_codes = mx.array(batch.frame_codes)
    frames = talker.model.codec_embedding(frame_codes[..., 0])
    for i, table in enumerate(talker.code_predictor.model.codec_embedding):
        frames = frames + table(frame_codes[..., i + 1])
    frames = frames * mx.array(batch.frame_mask)[..., None].astype(frames.dtype)

    embeds = text + codec + frames
    if batch.speaker_mask.any():
        if speaker_embeds is None:
            raise ValueError("batch has speaker slots but no speaker embeddings were given")
        # Detached: the speaker encoder is never trained, only conditioned on.
        spk = mx.stop_gradient(speaker_embeds).astype(embeds.dtype)[:, None, :]
        embeds = embeds + mx.array(batch.speaker_mask)[..., None].astype(embeds.dtype) * spk
    return embeds


def _cross_entropy(logits: mx.array, targets: mx.array, smoothing: float) -> mx.array:
    """Per-row CE; with smoothing, mixes in the mean negative log-likelihood over the vocab."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    if smoothing <= 0.0:
        return nll
    return (1.0 - smoothing) * nll - smoothing * logprobs.mean(axis=-1)


def qwen3_tts_loss(
    talker: nn.Module,
    batch: PackedBatch,
    speaker_embeds: mx.array | None = None,
    *,
    sub_weight: float = SUB_TALKER_WEIGHT,
    label_smoothing: float = 0.0,
) -> LossParts:
    embeds = input_embeddings(talker, batch, speaker_embeds)
    logits, hidden = talker(embeds)  # causal mask is built for multi-token inputs

    labels = mx.array(batch.labels)
    valid = labels != IGNORE
    ce = _cross_entropy(logits.astype(mx.float32), mx.maximum(labels, 0), label_smoothing)
    main = (ce * valid).sum() / mx.maximum(valid.sum(), 1)

    b, length, width = hidden.shape
    frame_hidden = hidden.reshape(b * length, width)[mx.array(batch.sub_positions)]
    codes = mx.array(batch.sub_codes)
    predictor = talker.code_predictor
    steps = [frame_hidden[:, None, :], talker.model.codec_embedding(codes[:, :1])]
    steps += [predictor.model.codec_embedding[i](codes[:, i + 1 : i + 2]) for i in range(14)]
    cp_in = mx.concatenate(steps, axis=1)  # [M, 16, H]
    if predictor.small_to_mtp_projection is not None:
        cp_in = predictor.small_to_mtp_projection(cp_in)
    cp_hidden = predictor.model(cp_in)  # [M, 16, Hc]
    sub_ce = [
        _cross_entropy(
            predictor.lm_head[i](cp_hidden[:, i + 1]).astype(mx.float32),
            codes[:, i + 1],
            label_smoothing,
        )
        for i in range(15)
    ]
    sub = mx.stack(sub_ce, axis=1).mean()
    return LossParts(total=main + sub_weight * sub, main=main, sub=sub)


__all__ = ["NO_CODEC", "LossParts", "input_embeddings", "qwen3_tts_loss"]
