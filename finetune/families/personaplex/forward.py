"""Teacher-forced PersonaPlex (Moshi) forward over whole sequences, and its training loss.

Streams: row 0 is the text (inner monologue), rows 1..8 the agent's Mimi codebooks, rows 9..16
the user's. Moshi reads stream k delayed by `delays[k]` steps ([0, 0, 1 x 7, 0, 1 x 7]): in
delayed time, step s holds token `codes[k, s - delays[k]]`, or the initial token while
`s < delays[k]`. The temporal transformer reads step s - 1 (the initial tokens at s = 0) and
predicts step s: the text logits, then the depformer predicts the audio codebooks of step s one
after the other, slice k fed `linear_in_k(temporal_out) + emb_k(token k - 1 of step s)` (the
text token for k = 0) and attending to the slices before it.

mlx-audio's layers pass no attention mask, so a multi-token call is not causal: the temporal
transformer here runs layer by layer with an explicit additive causal mask (limited to the
model's context window, as its KV-cache inference is). Each depformer slice has its own weights,
so the depformer runs slice after slice over all B x T steps at once, with a KV cache shared by
the slices: that is its causal attention over the codebook axis. `stepwise_logits` drives
mlx-audio's own step functions (`Lm._sample`, `DepFormer.sample`) one step at a time with the
same tokens forced; the two agree (tests/test_personaplex_training.py).

`-1` (Moshi's zero token) in `codes` means "no token": a zero input embedding and no loss. Batch
padding uses it, and the sequence is extended by the largest delay so the delayed streams' last
tokens are predicted too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ZERO_TOKEN = -1  # Moshi's "no input / no target" token
TEXT_PAD = 3  # PersonaPlex's `existing_text_padding_id`
TEXT_EPAD = 0  # end of padding: the step before a word starts


@dataclass(frozen=True)
class StreamLayout:
    """How one Lm reads its 1 + n_q streams."""

    delays: tuple[int, ...]  # one per stream, text first
    text_initial: int  # the text token fed at the very first step
    audio_initial: int  # the audio token fed where a delayed stream has no token yet
    dep_q: int  # codebooks the depformer predicts (rows 1..dep_q)
    audio_card: int  # audio classes the depformer predicts
    text_card: int  # text classes text_linear predicts

    @classmethod
    def from_lm(cls, lm: nn.Module) -> StreamLayout:
        cfg = lm.cfg
        return cls(
            delays=(0, *(int(d) for d in cfg.audio_delays)),
            text_initial=int(cfg.text_out_vocab_size),
            audio_initial=int(cfg.audio_padding_token),
            dep_q=int(cfg.depformer.num_slices),
            audio_card=int(cfg.audio_vocab_size) - 1,
            text_card=int(cfg.text_out_vocab_size),
        )

    @property
    def num_streams(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays)


@dataclass(frozen=True)
class DelayedSequence:
    """The model's view of a batch: what it reads at each step and what it must predict."""

    inputs: np.ndarray  # [B, K, S] int32: tokens read at step s (delayed tokens of step s - 1)
    targets: np.ndarray  # [B, K, S] int32: delayed tokens of step s
    valid: np.ndarray  # [B, K, S] bool: targets that are real tokens


def delay_streams(
    codes: np.ndarray, layout: StreamLayout, loss_from: np.ndarray | None = None
) -> DelayedSequence:
    """[B, K, T] undelayed tokens -> inputs / targets over S = T + max_delay steps.

    `loss_from` [B]: frames before it are forced conditioning (the prompts): read, no target.
    """
    codes = np.asarray(codes, dtype=np.int32)
    if codes.ndim != 3 or codes.shape[1] != layout.num_streams:
        raise ValueError(f"codes must be [B, {layout.num_streams}, T], got {codes.shape}")
    b, k_streams, t = codes.shape
    steps = t + layout.max_delay
    delayed = np.full((b, k_streams, steps), ZERO_TOKEN, dtype=np.int32)
    real = np.zeros((b, k_streams, steps), dtype=bool)
    initial = np.full((k_streams,), layout.audio_initial, dtype=np.int32)
    initial[0] = layout.text_initial
    trained = np.ones((b, t), dtype=bool)
    if loss_from is not None:
        trained = np.arange(t)[None, :] >= np.asarray(loss_from).reshape(b, 1)
    for k, delay in enumerate(layout.delays):
        delayed[:, k, :delay] = initial[k]
        delayed[:, k, delay : delay + t] = codes[:, k]
        real[:, k, delay : delay + t] = (codes[:, k] != ZERO_TOKEN) & trained
    first = np.broadcast_to(initial[None, :, None], (b, k_streams, 1))
    inputs = np.concatenate([first, delayed[:, :, :-1]], axis=2)
    return DelayedSequence(inputs=inputs, targets=delayed, valid=real)


# --------------------------------------------------------------------------- caches


class _GrowingKV:
    """The cache interface mlx-audio's Attention calls, without preallocation or slice writes:
    keys / values are concatenated (differentiable), so it also serves training."""

    def __init__(self) -> None:
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def reset(self) -> None:
        self.offset = 0
        self.keys = self.values = None


def _fresh_caches(transformer: nn.Module) -> list:
    from mlx_audio.sts.models.moshi.modules.transformer import LayerCache

    return [LayerCache(_GrowingKV()) for _ in transformer.layers]


# --------------------------------------------------------------------------- forward


def causal_mask(steps: int, context: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive [S, S] mask: step i attends to steps i - context .. i, like the KV-cache path
    (mlx-audio's Attention keeps the newest token plus `context` earlier ones)."""
    rows = mx.arange(steps)[:, None]
    cols = mx.arange(steps)[None, :]
    allowed = (cols <= rows) & (cols >= rows - context)
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def input_embeddings(lm: nn.Module, inputs: mx.array) -> mx.array:
    """[B, K, S] tokens -> [B, S, D]: text embedding + every audio codebook's embedding."""
    xs = lm.text_emb(inputs[:, 0])
    for k, emb in enumerate(lm.audio_embs):
        xs = xs + emb(inputs[:, 1 + k])
    return xs


def _layer_forward(layer: nn.Module, xs: mx.array, mask: mx.array | None, cache) -> mx.array:
    """mlx-audio's TransformerLayer.__call__, with the mask it does not pass."""
    if layer.cross_attention is not None:
        raise NotImplementedError("cross-attention layers are not supported in training")
    update = layer.self_attn(layer.norm1(xs), cache=cache.self_attn, mask=mask)
    xs = xs + layer.layer_scale_1(update)
    return xs + layer.layer_scale_2(layer.gating(layer.norm2(xs)))


def temporal_forward(
    lm: nn.Module, inputs: mx.array, *, causal: bool = True
) -> tuple[mx.array, mx.array]:
    """(normed temporal output [B, S, D], text logits [B, S, text_card]) for all steps at once.

    `causal=False` drops the mask (what calling mlx-audio's layers directly does): only there
    to show that the mask matters.
    """
    xs = input_embeddings(lm, inputs)
    mask = causal_mask(xs.shape[1], lm.cfg.transformer.context, xs.dtype) if causal else None
    for layer, cache in zip(lm.transformer.layers, _fresh_caches(lm.transformer), strict=True):
        xs = _layer_forward(layer, xs, mask, cache)
    out = lm.out_norm(xs)
    return out, lm.text_linear(out)


def depformer_logits(
    lm: nn.Module, temporal_out: mx.array, targets: mx.array, num_slices: int
) -> mx.array:
    """Teacher-forced depformer: [B, num_slices, S, audio_card] logits for codebooks 1..n.

    Slice k reads the target token of stream k (text for k = 0) at the same step; slices share
    one KV cache per layer, so slice k attends to slices 0..k only (DepFormer.sample's recipe).
    """
    b, steps, _ = temporal_out.shape
    if num_slices == 0:
        return mx.zeros((b, 0, steps, lm.cfg.audio_vocab_size - 1), temporal_out.dtype)
    caches = _fresh_caches(lm.depformer.slices[0].transformer)
    logits = []
    for k in range(num_slices):
        dep_slice = lm.depformer.slices[k]
        xs = dep_slice.linear_in(temporal_out) + dep_slice.emb(targets[:, k])
        xs = xs.reshape(b * steps, 1, xs.shape[-1])
        xs = dep_slice.transformer(xs, cache=caches)
        logits.append(dep_slice.linear_out(xs).reshape(b, steps, -1))
    return mx.stack(logits, axis=1)


@dataclass
class ForwardOutput:
    text_logits: mx.array  # [B, S, text_card]
    audio_logits: mx.array  # [B, n, S, audio_card] for codebooks 1..n
    sequence: DelayedSequence


def teacher_forced(
    lm: nn.Module,
    codes: np.ndarray,
    *,
    num_slices: int | None = None,
    causal: bool = True,
    loss_from: np.ndarray | None = None,
) -> ForwardOutput:
    """Logits for every step of `codes` [B, 1 + n_q, T] (undelayed; -1 = no token)."""
    layout = StreamLayout.from_lm(lm)
    sequence = delay_streams(codes, layout, loss_from)
    n = layout.dep_q if num_slices is None else num_slices
    if not 0 <= n <= layout.dep_q:
        raise ValueError(f"num_slices must be in [0, {layout.dep_q}], got {n}")
    out, text_logits = temporal_forward(lm, mx.array(sequence.inputs), causal=causal)
    audio = depformer_logits(lm, out, mx.array(sequence.targets), n)
    return ForwardOutput(text_logits=text_logits, audio_logits=audio, sequence=sequence)


# --------------------------------------------------------------------------- loss


@dataclass
class LossWeights:
    text: float = 1.0
    audio: float = 1.0
    text_padding: float = 0.5  # relative weight of PAD / EPAD text targets
    user_audio: float = 0.0  # weight of the user's codebooks (0: not predicted at all)
    agent_codebooks: int = 8


@dataclass
class LossParts:
    total: mx.array
    text: mx.array
    audio: mx.array
    user_audio: mx.array | None


def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def _weighted_mean(values: mx.array, weights: mx.array) -> mx.array:
    return (values * weights).sum() / mx.maximum(weights.sum(), 1e-9)


def personaplex_loss(
    lm: nn.Module,
    codes: np.ndarray,
    weights: LossWeights,
    *,
    text_pad_ids: tuple[int, ...] = (TEXT_PAD, TEXT_EPAD),
    loss_from: np.ndarray | None = None,
) -> LossParts:
    """text CE (pads down-weighted) x text + agent audio CE x audio (+ user audio CE x user);
    no loss on the frames before `loss_from` [B] (the prompts)."""
    layout = StreamLayout.from_lm(lm)
    agent = min(weights.agent_codebooks, layout.dep_q)
    slices = layout.dep_q if weights.user_audio > 0 else agent
    fwd = teacher_forced(lm, codes, num_slices=slices, loss_from=loss_from)
    seq = fwd.sequence

    text_targets = mx.array(np.where(seq.valid[:, 0], seq.targets[:, 0], 0))
    is_pad = np.isin(seq.targets[:, 0], text_pad_ids)
    text_w = np.where(is_pad, weights.text_padding, 1.0) * seq.valid[:, 0]
    text_w = mx.array(text_w.astype(np.float32))
    text = _weighted_mean(_cross_entropy(fwd.text_logits, text_targets), text_w)

    valid = seq.valid[:, 1 : 1 + slices]
    audio_targets = mx.array(np.where(valid, seq.targets[:, 1 : 1 + slices], 0))
    audio_ce = _cross_entropy(fwd.audio_logits, audio_targets)  # [B, n, S]
    mask = mx.array(valid.astype(np.float32))
    audio = _weighted_mean(audio_ce[:, :agent], mask[:, :agent])
    total = weights.text * text + weights.audio * audio
    user = None
    if slices > agent:
        user = _weighted_mean(audio_ce[:, agent:], mask[:, agent:])
        total = total + weights.user_audio * user
    return LossParts(total=total, text=text, audio=audio, user_audio=user)


# --------------------------------------------------------------------------- reference path


def _forced_text(targets: mx.array) -> Callable[[int], mx.array]:
    return lambda _: targets[:, 0:1]


def _forced_audio(targets: mx.array) -> Callable[[int], mx.array]:
    return lambda k: targets[:, 1 + k : 2 + k]


class _ForcingSampler:
    """A Sampler stand-in for mlx-audio's step loop: records the logits, returns forced tokens."""

    def __init__(self, tokens: Callable[[int], mx.array]) -> None:
        self._tokens = tokens
        self.calls = 0
        self.logits: list[mx.array] = []

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        self.logits.append(logits)
        token = self._tokens(self.calls)
        self.calls += 1
        return token, logits


def stepwise_logits(lm: nn.Module, codes: np.ndarray) -> tuple[mx.array, mx.array]:
    """The same logits as `teacher_forced`, from mlx-audio's KV-cache inference path.

    Drives `Lm._sample` (temporal step + `DepFormer.sample`) one step at a time on the model's
    own caches, forcing the sampled tokens to the sequence's: (text [B, S, V], audio
    [B, dep_q, S, card]). Resets the model's transformer cache before and after.
    """
    layout = StreamLayout.from_lm(lm)
    seq = delay_streams(codes, layout)
    steps = seq.inputs.shape[2]
    for cache in lm.transformer_cache:
        cache.reset()
    text_rows, audio_rows = [], []
    try:
        for s in range(steps):
            inputs = mx.array(seq.inputs[:, :, s])
            targets = mx.array(seq.targets[:, :, s])
            text_sampler = _ForcingSampler(_forced_text(targets))
            audio_sampler = _ForcingSampler(_forced_audio(targets))
            lm._sample(
                inputs[:, 0:1],
                [inputs[:, 1 + k][None] for k in range(layout.num_streams - 1)],
                text_sampler,
                audio_sampler,
            )
            text_rows.append(text_sampler.logits[0][:, 0])
            audio_rows.append(mx.stack([lg[:, 0] for lg in audio_sampler.logits], axis=1))
            mx.eval(text_rows[-1], audio_rows[-1])
    finally:
        for cache in lm.transformer_cache:
            cache.reset()
    return mx.stack(text_rows, axis=1), mx.stack(audio_rows, axis=2)
