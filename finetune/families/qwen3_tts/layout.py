"""The dual-channel sequence the Qwen3-TTS talker sees, built for teacher-forced training.

Each position sums a text-channel embedding (text embedding -> text projection) and a
codec-channel embedding, exactly as mlx-audio lays out a prompt at inference
(`Model._prepare_generation_inputs`, non-streaming text):

    pos      text channel                 codec channel
    (I)      the instruct's tokens        (none)    only with an instruct (conditioning.py)
    0..2     <|im_start|> assistant \\n    (none)
    3..      tts_pad x (len(C)-2), tts_bos C[:-1]  (think part, [speaker], pad)
    ..       text tokens, tts_eos         codec_pad
    P-1      tts_pad                      codec_bos
    P+j      tts_pad                      frame j: codebook 0 + codebooks 1-15 (code predictor)

with C the codec prefix of the utterance's `Conditioning` (conditioning.py, shared with
serving). The logits at position P-1+j predict codebook 0
of frame j, and the last frame's position predicts codec_eos: labels are shifted exactly once.

An ICL clone's `Reference` puts its transcript tokens ahead of the text tokens and its codec
frames ahead of the frames (mlx-audio's `_prepare_icl_generation_inputs`); those frames are
context, never labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.families.qwen3_tts.conditioning import (
    SPEAKER_SLOT,
    Conditioning,
    Reference,
    SpecialIds,
    codec_prefix,
    instruct_text,
)

import numpy as np

NO_CODEC = -1  # role positions carry no codec embedding
IGNORE = -100


@dataclass
class Sequence:
    """One training example as aligned id arrays (length P + T)."""

    text_ids: np.ndarray  # [L] text-channel token ids
    codec_ids: np.ndarray  # [L] codec ids, NO_CODEC, SPEAKER_SLOT, or NO_CODEC on frames
    frame_codes: np.ndarray  # [T, 16] codes of the frames that follow the prefix
    prefix_len: int  # P
    reference_frames: int = 0  # the first frames are an ICL reference's (context, no labels)

    @property
    def length(self) -> int:
        return int(self.text_ids.shape[0])


def split_chat_ids(chat_ids: list[int]) -> tuple[list[int], list[int]]:
    """Role and text tokens of the chat prompt (`chat_text`), sliced as mlx-audio slices it."""
    return chat_ids[:3], chat_ids[3:-5]


def chat_text(text: str) -> str:
    return f"<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"


def reference_chat_text(text: str) -> str:
    """An ICL reference transcript's template; its tokens are `reference_text_ids` of it."""
    return f"<|im_start|>assistant\n{text}<|im_end|>\n"


def reference_text_ids(chat_ids: list[int]) -> tuple[int, ...]:
    """The transcript tokens of `reference_chat_text`, sliced as mlx-audio slices them."""
    return tuple(chat_ids[3:-2])


def instruct_ids(tokenizer: Any, cond: Conditioning) -> list[int]:
    """The tokens of the utterance's instruct (none without one), tokenized apart from the
    chat prompt as the reference tokenizes it."""
    return list(tokenizer.encode(instruct_text(cond.instruct))) if cond.instruct else []


def build_sequence(
    ids: SpecialIds,
    chat_ids: list[int],
    codes: np.ndarray,
    cond: Conditioning,
    reference: Reference | None = None,
    *,
    instruct: list[int] | None = None,
) -> Sequence:
    """`instruct`: the tokens of `cond.instruct` (`instruct_ids`), required with one."""
    if bool(cond.instruct) != bool(instruct):
        raise ValueError("the conditioning's instruct and its tokens disagree")
    head = list(instruct or [])
    role, text = split_chat_ids(chat_ids)
    prefix = codec_prefix(ids, cond)
    if reference is not None:
        text = list(reference.text_ids) + text
        codes = np.concatenate([np.asarray(reference.codes, np.int32).reshape(-1, 16), codes])

    n_frames = int(codes.shape[0])
    text_ids = (
        head
        + role
        + [ids.tts_pad] * (len(prefix) - 2)
        + [ids.tts_bos]
        + text
        + [ids.tts_eos]
        + [ids.tts_pad]
        + [ids.tts_pad] * n_frames
    )
    codec_ids = (
        [NO_CODEC] * (len(head) + len(role))
        + prefix[:-1]
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
        reference_frames=0 if reference is None else reference.frames,
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
        p, t, r = seq.prefix_len, seq.frame_codes.shape[0], seq.reference_frames
        text_ids[b, : seq.length] = seq.text_ids
        codec_ids[b, : seq.length] = seq.codec_ids
        frame_codes[b, p : p + t] = seq.frame_codes
        frame_mask[b, p : p + t] = True
        labels[b, p - 1 + r : p - 1 + t] = seq.frame_codes[r:, 0]
        labels[b, p - 1 + t] = ids.codec_eos
        sub_positions.extend(b * length + p - 1 + j for j in range(r, t))
        sub_codes.append(seq.frame_codes[r:])
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
