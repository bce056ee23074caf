"""The dual-channel sequence the Qwen3-TTS talker sees, built for teacher-forced training.

Each position sums a text-channel embedding (text embedding -> text projection) and a
codec-channel embedding, exactly as mlx-audio lays out a prompt at inference
(`Model._prepare_generation_inputs`, non-streaming text):

    pos      text channel                 codec channel
    0..2     <|im_start|> assistant \\n    (none)
    3..      tts_pad x (len(C)-2), tts_bos C[:-1]  (think part, [speaker], pad)
    ..       text tokens, tts_eos         codec_pad
    P-1      tts_pad                      codec_bos
    P+j      tts_pad                      frame j: codebook 0 + codebooks 1-15 (code predictor)

with C = [nothink, think_bos, think_eos] (or [think, think_bos, LANG, think_eos] for a known
language) + [speaker] + [codec_pad, codec_bos]. The logits at position P-1+j predict codebook 0
of frame j, and the last frame's position predicts codec_eos: labels are shifted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NO_CODEC = -1  # role positions carry no codec embedding
SPEAKER_SLOT = -2  # the codec embedding there is a speaker-encoder vector
IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    tts_pad: int
    tts_bos: int
    tts_eos: int
    codec_pad: int
    codec_bos: int
    codec_eos: int
    think: int
    nothink: int
    think_bos: int
    think_eos: int
    languages: dict[str, int]

    @classmethod
    def from_config(cls, config: Any) -> SpecialIds:
        talker = config.talker_config
        return cls(
            tts_pad=config.tts_pad_token_id,
            tts_bos=config.tts_bos_token_id,
            tts_eos=config.tts_eos_token_id,
            codec_pad=talker.codec_pad_id,
            codec_bos=talker.codec_bos_id,
            codec_eos=talker.codec_eos_token_id,
            think=talker.codec_think_id,
            nothink=talker.codec_nothink_id,
            think_bos=talker.codec_think_bos_id,
            think_eos=talker.codec_think_eos_id,
            languages=dict(talker.codec_language_id or {}),
        )


@dataclass
class Sequence:
    """One training example as aligned id arrays (length P + T)."""

    text_ids: np.ndarray  # [L] text-channel token ids
    codec_ids: np.ndarray  # [L] codec ids, NO_CODEC, SPEAKER_SLOT, or NO_CODEC on frames
    frame_codes: np.ndarray  # [T, 16] codes of the frames that follow the prefix
    prefix_len: int  # P

    @property
    def length(self) -> int:
        return int(self.text_ids.shape[0])


def codec_think_part(ids: SpecialIds, language: str | None) -> list[int]:
    lang = (language or "auto").lower()
    if lang != "auto" and lang in ids.languages:
        return [ids.think, ids.think_bos, ids.languages[lang], ids.think_eos]
    return [ids.nothink, ids.think_bos, ids.think_eos]


def split_chat_ids(chat_ids: list[int]) -> tuple[list[int], list[int]]:
    """Role and text tokens of the chat prompt (`chat_text`), sliced as mlx-audio slices it."""
    return chat_ids[:3], chat_ids[3:-5]


def chat_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def build_sequence(
    ids: SpecialIds,
    chat_ids: list[int],
    codes: np.ndarray,
    *,
    language: str | None,
    with_speaker: bool,
) -> Sequence:
    role, text = split_chat_ids(chat_ids)
    codec_prefix = codec_think_part(ids, language)
    if with_speaker:
        codec_prefix.append(SPEAKER_SLOT)
    codec_prefix += [ids.codec_pad, ids.codec_bos]

    n_frames = int(codes.shape[0])
    text_ids = (
        role
        + [ids.tts_pad] * (len(codec_prefix) - 2)
        + [ids.tts_bos]
        + text
        + [ids.tts_eos]
        + [ids.tts_pad]
        + [ids.tts_pad] * n_frames
    )
    codec_ids = (
        [NO_CODEC] * len(role)
        + codec_prefix[:-1]
        + [ids.codec_pad] * (len(text) + 1)
        + [ids.codec_bos]
        + [NO_CODEC] * n_frames
    )
    prefix_len = len(text_ids) - n_frames
    return Sequence(
        text_ids=np.asarray(text_ids, np.int32),
        codec_ids=np.asarray(codec_ids, np.int32),
        frame_codes=np.asarray(codes, np.int32),
        prefix_len=prefix_len,
    )


@dataclass
class PackedBatch:
    """Right-padded arrays for a batch of sequences (numpy; the loss turns them into MLX)."""

    text_ids: np.ndarray  # [B, L]
    codec_ids: np.ndarray  # [B, L]
    frame_codes: np.ndarray  # [B, L, 16], 0 where no frame
    frame_mask: np.ndarray  # [B, L] bool: position holds a frame's codec embedding
    speaker_mask: np.ndarray  # [B, L] bool
    labels: np.ndarray  # [B, L] codebook-0 targets (codes and codec_eos), IGNORE elsewhere
    sub_positions: np.ndarray  # [M] flat b*L+pos of the positions that predicted a frame
    sub_codes: np.ndarray  # [M, 16] that frame's codes
    speaker_rows: np.ndarray  # [M_spk] batch index of each speaker slot, in order

    @property
    def num_frames(self) -> int:
        return int(self.sub_codes.shape[0])


def pack(sequences: list[Sequence], ids: SpecialIds) -> PackedBatch:
    batch = len(sequences)
    length = max(s.length for s in sequences)
    text_ids = np.full((batch, length), ids.tts_pad, np.int32)
    codec_ids = np.full((batch, length), NO_CODEC, np.int32)
    frame_codes = np.zeros((batch, length, 16), np.int32)
    frame_mask = np.zeros((batch, length), bool)
    labels = np.full((batch, length), IGNORE, np.int32)
    sub_positions: list[int] = []
    sub_codes: list[np.ndarray] = []
    for b, seq in enumerate(sequences):
        p, t = seq.prefix_len, seq.frame_codes.shape[0]
        text_ids[b, : seq.length] = seq.text_ids
        codec_ids[b, : seq.length] = seq.codec_ids
        frame_codes[b, p : p + t] = seq.frame_codes
        frame_mask[b, p : p + t] = True
        labels[b, p - 1 : p - 1 + t] = seq.frame_codes[:, 0]
        labels[b, p - 1 + t] = ids.codec_eos
        sub_positions.extend(b * length + p - 1 + j for j in range(t))
        sub_codes.append(seq.frame_codes)
    speaker_mask = codec_ids == SPEAKER_SLOT
    return PackedBatch(
        text_ids=text_ids,
        codec_ids=codec_ids,
        frame_codes=frame_codes,
        frame_mask=frame_mask,
        speaker_mask=speaker_mask,
        labels=labels,
        sub_positions=np.asarray(sub_positions, np.int32),
        sub_codes=np.concatenate(sub_codes, axis=0).astype(np.int32),
        speaker_rows=np.nonzero(speaker_mask.any(axis=1))[0].astype(np.int32),
    )
