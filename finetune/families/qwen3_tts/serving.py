"""Batched Qwen3-TTS generation: the server's decode loop, also used for training previews.

The same step as mlx-audio's `Model.generate` (base path), for several requests at once: left
padded prompts with an attention mask, one adapter-bank slot per row, and one random key per row
that is split exactly as MLX splits its global key. A request alone with seed s therefore draws
what `mx.random.seed(s); model.generate(...)` draws, and a request in a batch draws what it
would draw alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune.families.qwen3_tts.conditioning import Conditioning, Reference, SpecialIds
from finetune.families.qwen3_tts.forward import input_embeddings
from finetune.families.qwen3_tts.layout import (
    build_sequence,
    chat_text,
    instruct_ids,
    pack,
    reference_chat_text,
    reference_text_ids,
)
from finetune.families.qwen3_tts.row_sampling import sample_rows
from finetune.families.qwen3_tts.vocoder_stream import VocoderStream
from finetune.sampling import Sampling

import mlx.core as mx
import numpy as np

__all__ = ["Qwen3BatchGenerator", "Qwen3DecodeBatch", "Qwen3Prompter", "Row"]


@dataclass
class Row:
    """One request in a batch. `on_frames(codes [n, 16])` is called as frames are made."""

    prompt: mx.array  # [P, H] prefix embeddings
    sampling: Sampling
    seed: int | None = None
    slot: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    on_frames: Callable[[np.ndarray], None] | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    # An ICL reference's frames [T, 16]: in the prompt, and the decoder's left context.
    context: np.ndarray | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    key: mx.array | None = None
    steps: int = 0  # decode steps this row has taken
    audio: VocoderStream | None = None  # its vocoder stream, opened at its first audio chunk

    def __post_init__(self) -> None:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        assert self.key is not None  # set in __post_init__
        self.key, sub = mx.random.split(self.key)
        return sub


class Qwen3Prompter:
    """Prefix embeddings, the same mlx-audio builds (pinned by tests/test_qwen3_layout.py)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def speaker_vector(self, name: str) -> mx.array:
        spk_id = self.model.config.talker_config.spk_id or {}
        row = spk_id[name.lower()]
        row = row[0] if isinstance(row, list | tuple) else row
        return self.model.talker.model.codec_embedding.weight[int(row)]

    def reference(self, wav: np.ndarray, text: str) -> Reference:
        """An ICL reference from a 24 kHz clip and its transcript (the speech tokenizer's
        encoder makes the frames). Raises ValueError where the checkpoint has no encoder."""
        tokenizer = self.model.speech_tokenizer
        if tokenizer is None or not getattr(tokenizer, "has_encoder", False):
            raise ValueError("the checkpoint's speech tokenizer has no encoder to clone with")
        if not text.strip():
            raise ValueError("the reference transcript is empty")
        codes = tokenizer.encode(mx.array(wav, mx.float32)[None, None, :])  # [1, 16, T]
        frames = np.array(codes[0].T, dtype=np.int32)
        chat = self.model.tokenizer.encode(reference_chat_text(text.strip()))
        return Reference(text_ids=reference_text_ids(chat), codes=frames)

    def prompt(
        self,
        text: str,
        cond: Conditioning,
        speaker: mx.array | None,
        reference: Reference | None = None,
    ) -> mx.array:
        """[P, H] prefix of `text` under `cond` (the layout training uses, with no frames; an
        ICL `reference`'s transcript and frames included)."""
        if cond.speaker != (speaker is not None):
            raise ValueError("the conditioning and the speaker vector disagree")
        ids = SpecialIds.from_config(self.model.config)  # language rows can change at run time
        chat = self.model.tokenizer.encode(chat_text(text))
        instruct = instruct_ids(self.model.tokenizer, cond)
        seq = build_sequence(
            ids, chat, np.zeros((0, 16), np.int32), cond, reference, instruct=instruct
        )
        spk = None if speaker is None else speaker.reshape(1, -1)
        embeds = input_embeddings(self.model.talker, pack([seq], ids), spk)
        return embeds[0]


class Qwen3BatchGenerator:
    def __init__(self, model: Any, set_rows: Callable[[list[int] | None], None]) -> None:
        self.model = model
        self.talker = model.talker
        self.set_rows = set_rows
        config = model.config.talker_config
        self.eos = config.codec_eos_token_id
        self.suppress = mx.array(
            [i for i in range(config.vocab_size - 1024, config.vocab_size) if i != self.eos],
            dtype=mx.int32,
        )
        tts = mx.array([[model.config.tts_pad_token_id]])
        self.tts_pad = self.talker.text_projection(self.talker.get_text_embeddings()(tts))

    def run(self, rows: list[Row]) -> None:
        """Generate until every row hit codec_eos, its max_tokens, or was cancelled."""
        batch = Qwen3DecodeBatch(self)
        try:
            batch.admit(rows)
            while batch.rows:
                batch.step()
        finally:
            batch.close()

    def _record(self, active: list[Row], codes: np.ndarray) -> list[int]:
        """Each row's new frame; the indices of the rows that go on."""
        keep = []
        for i, row in enumerate(active):
            row.steps += 1
            token = int(codes[i, 0])
            if token == self.eos:
                row.finished = True
            elif row.cancel.is_set():
                pass
            else:
                row.generated.append(token)
                row.frames.append(codes[i])
                if row.on_frames is not None:
                    row.on_frames(codes[i : i + 1])
                if row.steps < row.sampling.max_tokens:
                    keep.append(i)
        return keep

    def _predict_codes(
        self, tokens: mx.array, hidden: mx.array, rows: list[Row], code_cache: list
    ) -> mx.array:
        for c in code_cache:
            c.keys, c.values, c.offset = None, None, 0
        predictor = self.talker.code_predictor
        out = [tokens]
        for idx in range(predictor.num_code_groups - 1):
            if idx == 0:
                code_input = mx.concatenate(
                    [hidden, self.talker.get_input_embeddings()(tokens)], axis=1
                )
            else:
                code_input = predictor.codec_embedding[idx - 1](out[-1])
            logits, code_cache, _ = predictor(code_input, cache=code_cache, generation_step=idx)
            out.append(sample_rows(logits[:, -1], rows))
        return mx.concatenate(out, axis=1)  # [B, 16]

    def _codec_embeds(self, codes: mx.array) -> mx.array:
        embed = self.talker.get_input_embeddings()(codes[:, :1])
        for i, table in enumerate(self.talker.code_predictor.codec_embedding):
            embed = embed + table(codes[:, i + 1 : i + 2])
        return embed


class Qwen3DecodeBatch:
    """Iteration-level decoding: rows join (`admit`) and leave (`step` returns them) between
    decode steps, so a request never waits for a whole batch to finish.

    The running rows share one dense KV cache [B, heads, T, dim] per layer and an attention mask
    [B, T] (1: a real position). Each newcomer is prefilled alone, then its cache is merged in:
    the shorter side is left-padded with masked zeros to the longer one's length. Positions come
    from each row's own mask (mlx-audio's talker numbers them cumsum(mask) - 1), so a row's
    positions, keys and sampled keys are the same as alone; masked positions add exact zeros to
    attention. A row's logits are then bit for bit its logits alone, step after step, joined
    mid-way or not (tests/test_decode_batch.py). A row that leaves is dropped from the batch;
    columns every remaining row has as padding are cut off (grown, then compacted).
    """

    def __init__(self, generator: Qwen3BatchGenerator) -> None:
        self.gen = generator
        self.talker = generator.talker
        self.rows: list[Row] = []
        self._cache: list[Any] = []
        self._mask: mx.array | None = None  # [B, T]
        self._pads: list[int] = []  # each row's leading masked columns
        self._logits: mx.array | None = None  # [B, V]: each row's next-token logits
        self._hidden: mx.array | None = None  # [B, 1, H]
        self._code_cache = self.talker.code_predictor.make_cache()
        self._slots_changed = True

    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` (those not cancelled) and add them to the running batch.

        Each row is prefilled alone, as mlx-audio's own generate runs it (one prompt, no
        mask): a batched prefill multiplies [rows x tokens] at once, and BLAS sums a row's
        products in another order when the row count changes, which moved a row's keys and
        hidden state in the last bits and, now and then, one sampled code (then every later
        one). The prefill is compute-bound, so batching it gained little."""
        for row in rows:
            if row.cancel.is_set():
                continue
            cache = self.talker.make_cache()
            self.gen.set_rows([row.slot])
            self._slots_changed = True
            logits, hidden = self.talker(row.prompt[None], cache=cache)
            logits, hidden = logits[:, -1], hidden[:, -1:, :]
            mx.eval(logits, hidden, [c.keys for c in cache], [c.values for c in cache])
            self._merge(row, cache, logits, hidden)

    def _merge(self, row: Row, cache: list[Any], logits: mx.array, hidden: mx.array) -> None:
        """Add `row`, prefilled alone (its cache holds its prompt, unpadded), to the batch: the
        shorter side's cache is left-padded with masked zeros to the longer one's length."""
        joining = row.prompt.shape[0]
        mask = mx.ones((1, joining), mx.int32)
        if not self.rows:
            self.rows, self._cache, self._mask, self._pads = [row], cache, mask, [0]
            self._logits, self._hidden = logits, hidden
            return
        assert self._mask is not None and self._logits is not None and self._hidden is not None
        running = self._mask.shape[1]
        length = max(running, joining)
        for old, new in zip(self._cache, cache, strict=True):
            keys = mx.concatenate(
                [
                    _left_pad(old.keys[..., :running, :], length),
                    _left_pad(new.keys[..., :joining, :], length),
                ]
            )
            values = mx.concatenate(
                [
                    _left_pad(old.values[..., :running, :], length),
                    _left_pad(new.values[..., :joining, :], length),
                ]
            )
            old.keys, old.values, old.offset = keys, values, length
        self._mask = mx.concatenate(
            [_left_pad_mask(self._mask, length), _left_pad_mask(mask, length)]
        )
        self._pads = [p + length - running for p in self._pads] + [length - joining]
        self._logits = mx.concatenate([self._logits, logits])
        self._hidden = mx.concatenate([self._hidden, hidden])
        self.rows.append(row)
        mx.eval([c.keys for c in self._cache], [c.values for c in self._cache], self._mask)

    def step(self) -> list[Row]:
        """One decode step of every running row; the rows that ended (eos, max_tokens,
        cancelled), removed from the batch."""
        if not self.rows:
            return []
        assert self._logits is not None and self._hidden is not None and self._mask is not None
        gen = self.gen
        if self._slots_changed:
            gen.set_rows([r.slot for r in self.rows])
            self._slots_changed = False
        tokens = sample_rows(self._logits, self.rows, suppress=gen.suppress)  # [B, 1]
        codes = gen._predict_codes(tokens, self._hidden, self.rows, self._code_cache)
        next_embeds = gen.tts_pad + gen._codec_embeds(codes)
        mx.eval(codes, next_embeds)
        keep = gen._record(self.rows, np.array(codes))
        going_on = set(keep)
        ended = [r for i, r in enumerate(self.rows) if i not in going_on]
        if ended:
            self._keep(keep)
            next_embeds = next_embeds[mx.array(keep)] if keep else next_embeds[:0]
        if not self.rows:
            self._clear()
            return ended
        if self._slots_changed:  # rows left: the adapter rows of those that stay
            gen.set_rows([r.slot for r in self.rows])
            self._slots_changed = False
        mask = mx.concatenate([self._mask, mx.ones((self._mask.shape[0], 1), self._mask.dtype)], 1)
        self._mask = mask
        plain = not any(self._pads)
        logits, hidden = self.talker(
            next_embeds, cache=self._cache, attention_mask=None if plain else mask
        )
        self._logits, self._hidden = logits[:, -1], hidden[:, -1:, :]
        return ended

    def _keep(self, keep: list[int]) -> None:
        """Only rows `keep` (indices) go on; columns that are padding for all of them go."""
        assert self._mask is not None and self._logits is not None and self._hidden is not None
        self.rows = [self.rows[i] for i in keep]
        self._pads = [self._pads[i] for i in keep]
        self._slots_changed = True
        if not keep:
            return
        index = mx.array(keep)
        cut = min(self._pads)
        for c in self._cache:
            c.keys = c.keys[index, :, cut : c.offset, :]
            c.values = c.values[index, :, cut : c.offset, :]
            c.offset -= cut
        self._mask = self._mask[index, cut:]
        self._pads = [p - cut for p in self._pads]
        self._logits = self._logits[index]
        self._hidden = self._hidden[index]

    def _clear(self) -> None:
        self._cache, self._mask, self._pads = [], None, []
        self._logits = self._hidden = None

    def close(self) -> None:
        """Drop every row and the adapter rows they selected."""
        self.rows = []
        self._clear()
        self.gen.set_rows(None)


def _left_pad(array: mx.array, length: int) -> mx.array:
    """[B, H, T, D] -> [B, H, length, D], zeros on the left."""
    missing = length - array.shape[2]
    if missing <= 0:
        return array
    shape = (array.shape[0], array.shape[1], missing, array.shape[3])
    return mx.concatenate([mx.zeros(shape, array.dtype), array], axis=2)


def _left_pad_mask(mask: mx.array, length: int) -> mx.array:
    missing = length - mask.shape[1]
    if missing <= 0:
        return mask
    return mx.concatenate([mx.zeros((mask.shape[0], missing), mask.dtype), mask], axis=1)
