"""Several CSM utterances in one forward per frame, over mlx-audio's Sesame weights.

mlx-audio's `SesameModel.generate_frame` keeps ONE backbone KV cache on the model and runs one
utterance. Here each utterance is a `CsmStream` with its own backbone caches, its own sampler
(PRNG key) and its own adapter-bank slot, and one `step` makes the next frame of every stream:

- `start` prefills one stream's prompt alone, through mlx-audio's own backbone call on the
  stream's caches: exactly what `generate_frame` computes for that prompt. Prompts are not
  left-padded into one prefill: a [B x L, D] GEMM is not row-exact on OpenBLAS (its kernel
  depends on the row count; measured on the tiny model's 64 -> 64 projections from 4 rows of
  5), and a stream prefilled alone can join a running batch at any step.
- `step` runs the depth decoder for all streams at once (their decoder caches all start empty
  and grow together, so mlx-audio's decoder call takes the batch as it is), samples each row
  with its own sampler, then feeds the frames of the streams that go on through the backbone in
  one batched pass: projections and MLPs over all rows, rotary embeddings at each row's own
  position, attention per row over that row's cache (caches differ in length).
- A stream whose frame is all zeros (EOS) or that made its `max_frames` leaves; the caller may
  drop a cancelled stream before any step. Nobody else waits for it.

Equal to each stream alone: the sampler draws from the stream's own key in the same order, and
every op works row by row; the GEMMs of a decode step (one row per stream) give each row what it
gives alone wherever OpenBLAS's small-matrix kernel does not depend on the row count (the tiny
model's shapes up to at least 4 rows: tests/test_csm_batched.py). Elsewhere rows agree to
float32 rounding (about 1e-6 relative on the logits), so a draw can differ only at a near tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.families.csm.checkpoint import LoadedCsm
from finetune.families.csm.conditioning import Frames, GenerationError
from finetune.families.csm.generate import MAX_SEQUENCE, FrameSampler

import mlx.core as mx
import numpy as np
from mlx_audio.lm.models.cache import make_prompt_cache

SetRows = Callable[[list[int] | None], None]


@dataclass
class CsmStream:
    """One utterance being generated: its backbone caches, the hidden state that predicts its
    next frame, its sampler, its adapter slot."""

    sampler: FrameSampler
    max_frames: int
    slot: int
    caches: list[Any]  # one mlx-audio KVCache per backbone layer
    last_h: mx.array  # [1, D]
    made: int = 0
    done: bool = False

    @property
    def position(self) -> int:
        return int(self.caches[0].offset)


class CsmBatchGenerator:
    def __init__(self, loaded: LoadedCsm, set_rows: SetRows | None = None) -> None:
        self.sesame = loaded.backbone
        self.num_codebooks = loaded.num_codebooks
        self._set_rows = set_rows
        self._slots: tuple[int, ...] | None = None
        n = self.num_codebooks
        self._frame_mask = mx.array(np.arange(n + 1) < n)[None, None]  # [1, 1, N + 1]

    # --- adapter rows ------------------------------------------------------------------------
    def _use_slots(self, slots: Sequence[int]) -> None:
        """The bank's rows for the next forward (re-gathered only when they change)."""
        key = tuple(slots)
        if self._set_rows is not None and key != self._slots:
            self._set_rows(list(key))
        self._slots = key

    def release(self) -> None:
        """Back to no adapter rows (the bank's state outside a batch)."""
        if self._set_rows is not None:
            self._set_rows(None)
        self._slots = None

    # --- streams -----------------------------------------------------------------------------
    def start(
        self, prompt: Frames, sampler: FrameSampler, *, max_frames: int, slot: int = 0
    ) -> CsmStream:
        """Prefill `prompt` alone on fresh caches (lazy: evaluated with the next step)."""
        if max_frames < 1:
            raise GenerationError(f"max_audio_frames must be >= 1, got {max_frames}")
        if len(prompt) + max_frames > MAX_SEQUENCE:
            raise GenerationError(
                f"prompt of {len(prompt)} frames + {max_frames} audio frames exceeds the "
                f"model's {MAX_SEQUENCE}-frame window: shorten the text or the context"
            )
        self._use_slots([slot])
        caches = make_prompt_cache(self.sesame.backbone)
        h = self._embed(mx.array(prompt.tokens)[None], mx.array(prompt.mask)[None])
        h = self.sesame.backbone(h, cache=caches)
        return CsmStream(sampler, max_frames, slot, caches, h[:, -1, :])

    def step(self, streams: Sequence[CsmStream]) -> np.ndarray:
        """The next frame of every stream: codes [B, N] int32 (all zeros: EOS, that stream is
        done). Streams that go on are fed their frame through the backbone (lazily)."""
        live = [s for s in streams if not s.done]
        if len(live) != len(streams):
            raise ValueError("a finished stream cannot step again")
        if not live:
            return np.zeros((0, self.num_codebooks), np.int32)
        self._use_slots([s.slot for s in live])
        sample = self._frame(live)
        mx.eval(sample)
        codes = np.array(sample, np.int32)
        going = []
        for i, stream in enumerate(live):
            if not codes[i].any():
                stream.done = True
                continue
            stream.made += 1
            if stream.made >= stream.max_frames:
                stream.done = True
            else:
                going.append(i)
        if going:
            index = mx.array(going) if len(going) < len(live) else None
            self._feed([live[i] for i in going], sample if index is None else sample[index])
        return codes

    def stop(self, stream: CsmStream) -> None:
        """Take a stream out (cancelled): its caches go with it."""
        stream.done = True
        stream.caches = []

    # --- the model ---------------------------------------------------------------------------
    def _embed(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """`generate_frame`'s backbone input: masked codebook + text embeddings, summed."""
        embeds = self.sesame._embed_tokens(tokens)
        return mx.sum(embeds * mx.expand_dims(mask, -1), axis=2)

    def _frame(self, streams: list[CsmStream]) -> mx.array:
        """`generate_frame`'s codebook loop for the batch: samples [B, N]."""
        sesame = self.sesame
        last_h = (
            streams[0].last_h if len(streams) == 1 else mx.concatenate([s.last_h for s in streams])
        )
        sample = self._sample(sesame.codebook0_head(last_h), streams)
        curr_h = mx.concatenate([mx.expand_dims(last_h, 1), sesame._embed_audio(0, sample)], 1)
        samples = [sample]
        cache = make_prompt_cache(sesame.decoder)
        for i in range(1, self.num_codebooks):
            decoder_h = sesame.decoder(sesame.projection(curr_h), cache=cache)
            logits = mx.matmul(decoder_h[:, -1, :], sesame.audio_head[i - 1])
            sample = self._sample(logits, streams)
            curr_h = sesame._embed_audio(i, sample)
            samples.append(sample)
        return mx.concatenate(samples, axis=1)

    @staticmethod
    def _sample(logits: mx.array, streams: list[CsmStream]) -> mx.array:
        """[B, V] -> [B, 1], row i drawn by stream i's sampler from its own key."""
        if len(streams) == 1:
            return mx.expand_dims(streams[0].sampler(logits), -1)
        rows = [s.sampler(logits[i : i + 1]) for i, s in enumerate(streams)]
        return mx.expand_dims(mx.concatenate(rows), -1)

    def _feed(self, streams: list[CsmStream], sample: mx.array) -> None:
        """One backbone step over each stream's new frame [B, N], each on its own caches."""
        self._use_slots([s.slot for s in streams])
        tokens = mx.concatenate([sample, mx.zeros((sample.shape[0], 1), mx.int32)], axis=1)
        h = self._embed(tokens[:, None, :], self._frame_mask)  # [B, 1, D]
        backbone = self.sesame.backbone
        positions = mx.array([s.position for s in streams])
        for index, layer in enumerate(backbone.layers):
            caches = [s.caches[index] for s in streams]
            h = h + _attend(layer.self_attn, layer.input_layernorm(h), caches, positions)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = backbone.norm(h)
        for i, stream in enumerate(streams):
            stream.last_h = h[i : i + 1, -1, :]


def _attend(attn: Any, x: mx.array, caches: list[Any], positions: mx.array) -> mx.array:
    """mlx-audio's sesame `Attention` for one new position per row: rows at their own rotary
    positions, each attending over its own cache."""
    batch = x.shape[0]
    q = attn.q_proj(x).reshape(batch, 1, attn.n_heads, attn.head_dim)
    k = attn.k_proj(x).reshape(batch, 1, -1, attn.head_dim)
    v = attn.v_proj(x).reshape(batch, 1, -1, attn.head_dim)
    q = _rope_rows(attn.rope, q, positions).swapaxes(1, 2)
    k = _rope_rows(attn.rope, k, positions).swapaxes(1, 2)
    v = v.swapaxes(1, 2)
    outs = []
    for i, cache in enumerate(caches):
        keys, values = cache.update_and_fetch(k[i : i + 1], v[i : i + 1])
        outs.append(
            mx.fast.scaled_dot_product_attention(q[i : i + 1], keys, values, scale=attn.scale)
        )
    out = outs[0] if batch == 1 else mx.concatenate(outs)
    return attn.o_proj(out.swapaxes(1, 2).reshape(batch, 1, -1))


def _rope_rows(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """`Llama3ScaledRoPE` on x [B, 1, H, D] with row b at `positions[b]` (same table, same
    arithmetic as mlx-audio's, which takes one offset for the whole batch)."""
    batch, steps, heads, dim = x.shape
    cos, sin = rope._get_cache(x.dtype, rope.max_seq_len, 0)  # [1, L, 1, D / 2]
    cos = cos[0, positions].reshape(batch, steps, 1, rope.d2)
    sin = sin[0, positions].reshape(batch, steps, 1, rope.d2)
    x_even = x[..., 0::2]
    x_odd = x[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_odd * cos + x_even * sin
    return mx.stack([out_even, out_odd], axis=-1).reshape(batch, steps, heads, dim)
