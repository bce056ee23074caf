"""The Lm's forward for a batch of sessions at different positions, over mlx-audio's modules.

mlx-audio's `Lm` keeps one KV cache on the module and one rotary offset for the whole batch.
Here every linear layer runs ONCE for the whole batch (row i = session i, so a LoRA bank
installed in `in_proj` / `out_proj` / `linear_in` applies each row's adapter), while the
attention core runs per row over that session's own `WindowKVCache`, with that session's
rotary offset (one `mx.fast.rope` call with a vector of offsets). A single query needs no
padding and no mask that way, and no session's cache is ever copied into a shared slab.

Attention sees at most `context` positions including the current one (PyTorch moshi's
`delta < context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune.families.personaplex.caches import WindowKVCache

import mlx.core as mx

FullWeights = dict[str, mx.array]


@dataclass
class _ConcatCache:
    """The depformer's per-tick cache: at most 16 positions, so plain concatenation."""

    offset: int = 0
    keys: mx.array | None = None
    values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values


def new_temporal_cache(lm: Any) -> list[WindowKVCache]:
    context = int(lm.cfg.transformer.context)
    return [WindowKVCache(keep=context) for _ in lm.transformer.layers]


def _embed_with(weight: mx.array, tokens: mx.array) -> mx.array:
    emb = weight[mx.maximum(tokens, 0)]
    return mx.where((tokens == -1)[..., None], mx.zeros(1, dtype=emb.dtype), emb)


def embed_inputs(
    lm: Any, tokens: mx.array, overrides: Sequence[FullWeights | None] | None = None
) -> mx.array:
    """[B, T, D] model input of tokens [B, T, 17] (text, then the audio codebooks)."""
    xs = lm.text_emb(tokens[..., 0])
    for k, emb in enumerate(lm.audio_embs):
        stream = tokens[..., k + 1]
        base = emb(stream)
        name = f"audio_embs.{k}.weight"
        if overrides and any(o is not None and name in o for o in overrides):
            rows = [
                base[i] if o is None or name not in o else _embed_with(o[name], stream[i])
                for i, o in enumerate(overrides)
            ]
            base = mx.stack(rows)
        xs = xs + base
    return xs


def out_norm(lm: Any, xs: mx.array, overrides: Sequence[FullWeights | None] | None) -> mx.array:
    base = lm.out_norm(xs)
    if not overrides or not any(o is not None and "out_norm.weight" in o for o in overrides):
        return base
    rows = [
        base[i]
        if o is None or "out_norm.weight" not in o
        else mx.fast.rms_norm(xs[i], o["out_norm.weight"], lm.out_norm.eps)
        for i, o in enumerate(overrides)
    ]
    return mx.stack(rows)


def temporal_forward(lm: Any, xs: mx.array, caches: Sequence[list[WindowKVCache]]) -> mx.array:
    """The temporal transformer on xs [B, T, D], row i appending to caches[i] (one per layer)."""
    batch, steps, dim = xs.shape
    context = int(lm.cfg.transformer.context)
    for index, layer in enumerate(lm.transformer.layers):
        attn = layer.self_attn
        heads, head_dim = attn.cfg.num_heads, attn.cfg.head_dim
        qkv = attn.in_proj(layer.norm1(xs)).reshape(batch, steps, 3, heads, head_dim)
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)
        k = qkv[:, :, 1].transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        if attn.rope is not None:
            offsets = mx.array([rows[index].offset for rows in caches], dtype=mx.int32)
            q = _rope(attn.rope, q, offsets)
            k = _rope(attn.rope, k, offsets)
        outs = []
        for row, rows in enumerate(caches):
            cache = rows[index]
            keys, values = cache.update_and_fetch(k[row : row + 1], v[row : row + 1])
            outs.append(_attend(q[row : row + 1], keys, values, attn.scale, context, cache.offset))
        attended = outs[0] if batch == 1 else mx.concatenate(outs, axis=0)
        attended = attended.transpose(0, 2, 1, 3).reshape(batch, steps, dim)
        xs = xs + layer.layer_scale_1(attn.out_proj(attended))
        xs = xs + layer.layer_scale_2(layer.gating(layer.norm2(xs)))
    return xs


def _rope(rope: Any, x: mx.array, offsets: mx.array) -> mx.array:
    return mx.fast.rope(
        x,
        rope.dims,
        traditional=rope.traditional,
        base=rope.base,
        scale=rope.scale,
        offset=offsets,
    )


def _attend(
    q: mx.array, keys: mx.array, values: mx.array, scale: float, context: int, end: int
) -> mx.array:
    steps, length = q.shape[2], keys.shape[2]
    if steps == 1:
        if length > context:
            keys, values = keys[..., -context:, :], values[..., -context:, :]
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    pos_k = mx.arange(end - length, end)
    pos_q = mx.arange(end - steps, end)
    delta = pos_q[:, None] - pos_k[None, :]
    allowed = (delta >= 0) & (delta < context)
    mask = mx.where(allowed, 0.0, -1e9).astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def depformer_sample(
    lm: Any,
    transformer_out: mx.array,
    text: mx.array,
    forced: mx.array,
    forced_mask: mx.array,
    sample: Any,
    codebooks: int,
) -> mx.array:
    """Sampled tokens [B, codebooks] of the first `codebooks` depformer slices, batched.

    Slice j reads the token of slice j - 1 (the text token for slice 0): the forced one where
    `forced_mask[:, j - 1]`, else the sampled one (NVIDIA's depformer teacher forcing).
    `sample(logits [B, V], j)` draws slice j's tokens.
    """
    from mlx_audio.sts.models.moshi.modules.transformer import LayerCache

    slices = lm.depformer.slices
    cache = [LayerCache(_ConcatCache()) for _ in slices[0].transformer.layers]
    previous = text
    tokens = []
    for j in range(codebooks):
        part = slices[j]
        xs = part.linear_in(transformer_out) + part.emb(previous[:, None])
        xs = part.transformer(xs, cache=cache)
        logits = part.linear_out(xs)[:, 0]
        token = sample(logits, j)
        tokens.append(token)
        previous = mx.where(forced_mask[:, j], forced[:, j], token)
    return mx.stack(tokens, axis=1)
