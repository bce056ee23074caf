"""The C++ primitives of the CPU path (finetune/runtime/csrc/cpu_primitives.cpp) as graph nodes:
a product with a stored weight, an RMS norm and a SwiGLU are one node each, whatever the layout
of what they are given, with the values of MLX's own ops."""

from __future__ import annotations

import io
import re
from collections import Counter

from finetune.runtime import fast_cpu_active, fused, packed, primitives

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not fast_cpu_active(), reason="the primitives are the CPU backend's fast path"
)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert primitives.load() is not None, primitives.problem()  # a C++ compiler is at hand
    assert packed.load() is not None, packed.problem()  # and an AVX2 CPU for the products


def _nodes(*outputs: mx.array) -> Counter[str]:
    """The graph's nodes by primitive (inputs already evaluated are not nodes)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return Counter(re.findall(r'label ="([A-Za-z0-9_]+)', dot.getvalue()))


def _quantised(out_dims: int, in_dims: int, bits: int) -> nn.QuantizedLinear:
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=False, group_size=64, bits=bits)
    layer.update({"scales": layer["scales"].astype(mx.float32)})
    layer.update({"biases": layer["biases"].astype(mx.float32)})
    mx.eval(layer.parameters())
    return layer


def _views(rows: int, width: int) -> dict[str, mx.array]:
    """Inputs laid out every way a graph hands them over: each a view, never copied."""
    base = mx.random.normal((2 * rows, 2 * width), key=mx.random.key(width))
    columns = mx.random.normal((width, rows), key=mx.random.key(rows))
    mx.eval(base, columns)
    return {
        "row-major": base[:rows, :width] * 1.0,
        "every other column": base[:rows, ::2],
        "transposed": columns.T,
        "broadcast row": mx.broadcast_to(base[:1, :width], (rows, width)),
        "batched, strided": base.reshape(2, rows, 2 * width)[:, :, 1::2],
    }


@pytest.mark.parametrize("bits", [4, 8])
def test_a_packed_product_is_one_node_whatever_the_inputs_layout(bits: int) -> None:
    layer = _quantised(96, 128, bits)
    x = mx.random.normal((3, 128))
    mx.eval(x)
    assert _nodes(packed.matmul(x, layer)) == Counter({"PackedMatmul": 1})
    for name, view in _views(3, 128).items():
        got = packed.matmul(view, layer)
        assert _nodes(got)["Contiguous"] == 0, name
        wanted = packed.matmul(mx.array(np.array(view)), layer)  # the same values, row-major
        assert mx.array_equal(got, wanted).item(), name
        dense = mx.dequantize(
            layer["weight"], layer["scales"], layer["biases"], group_size=64, bits=bits
        )
        assert mx.allclose(got, view @ dense.T, atol=1e-4).item(), name


def test_a_weight_that_is_not_stored_row_major_is_made_so_first() -> None:
    weight = mx.random.normal((64, 96)).astype(mx.bfloat16)
    mx.eval(weight)
    x = mx.random.normal((2, 64))
    mx.eval(x)
    view = weight.T  # [96, 64], column-major: the kernel reads rows, so it gets a copy
    got = packed.bf16_matmul(x, view)
    assert _nodes(got) == Counter({"Bf16Matmul": 1, "Contiguous": 1, "Transpose": 1})
    assert mx.allclose(got, x @ view.astype(mx.float32).T, atol=1e-4).item()
    rows = weight[16:48]  # evaluated: a view of whole rows, row-major as it is
    x = mx.random.normal((2, 96))
    mx.eval(rows, x)
    got = packed.bf16_matmul(x, rows)
    assert _nodes(got) == Counter({"Bf16Matmul": 1})
    assert mx.array_equal(got, packed.bf16_matmul(x, weight)[:, 16:48]).item()


def test_a_bf16_product_reads_any_input_layout() -> None:
    weight = mx.random.normal((80, 128)).astype(mx.bfloat16)
    mx.eval(weight)
    for name, view in _views(4, 128).items():
        got = packed.bf16_matmul(view, weight)
        assert _nodes(got) == Counter({"Bf16Matmul": 1}) + _nodes(view), name
        wanted = packed.bf16_matmul(mx.array(np.array(view)), weight)
        assert mx.array_equal(got, wanted).item(), name


def test_the_rms_norm_is_one_node_with_the_fallbacks_values() -> None:
    weight = mx.random.normal((128,))
    mx.eval(weight)
    for name, view in _views(5, 128).items():
        got = fused.rms_norm(view, weight, 1e-6)
        assert _nodes(got) == Counter({"RmsNorm": 1}) + _nodes(view), name
        assert mx.array_equal(got, mx.fast.rms_norm(view, weight, 1e-6)).item(), name
        # each row alone is that row of the batch, bit for bit
        rows = mx.array(np.array(view))
        for r in range(rows.shape[0]):
            alone = fused.rms_norm(rows[r : r + 1], weight, 1e-6)
            assert mx.array_equal(alone, got[r : r + 1]).item(), (name, r)
    # a strided weight, and the extremes: zeros stay zeros, eps = 0 divides by the mean square
    x = mx.concatenate([mx.zeros((1, 128)), mx.full((1, 128), 3e-20), mx.full((1, 128), 1e18)])
    for eps in (0.0, 1e-5):
        strided = mx.broadcast_to(weight[:1], (128,))
        want = mx.fast.rms_norm(x, strided, eps)
        assert mx.array_equal(fused.rms_norm(x, strided, eps), want, equal_nan=True).item()


def test_the_rms_norm_is_differentiable_in_input_and_weight() -> None:
    x = mx.random.normal((3, 64))
    weight = mx.random.normal((64,))
    cotangent = mx.random.normal((3, 64))

    def loss(fn, v: mx.array, w: mx.array) -> mx.array:
        return (fn(v, w, 1e-5) * cotangent).sum()

    ours = mx.grad(lambda v, w: loss(fused.rms_norm, v, w), argnums=(0, 1))(x, weight)
    theirs = mx.grad(lambda v, w: loss(mx.fast.rms_norm, v, w), argnums=(0, 1))(x, weight)
    for got, want in zip(ours, theirs, strict=True):
        assert mx.allclose(got, want, atol=1e-5).item()


def test_the_rms_norm_takes_mlxs_ops_without_the_extension(monkeypatch) -> None:
    monkeypatch.setattr(primitives, "load", lambda: None)
    x = mx.random.normal((2, 1, 256))
    weight = mx.random.normal((256,))
    got = fused.rms_norm(x, weight, 1e-6)
    assert "RmsNorm" not in _nodes(got)
    assert mx.array_equal(got, mx.fast.rms_norm(x, weight, 1e-6)).item()


def test_a_norm_the_primitive_does_not_take_keeps_the_fallback() -> None:
    x = mx.random.normal((2, 8))
    one = mx.array([1.5])  # broadcast along the last axis: the fallback's ops take it
    got = fused.rms_norm(x, one, 1e-6)
    assert not fused.primitive_wanted(x, one) and "RmsNorm" not in _nodes(got)
    assert mx.array_equal(got, fused._rms_norm(x, one, mx.array(1e-6))).item()
    half = x.astype(mx.bfloat16)
    weight = mx.ones((8,), mx.bfloat16)
    assert "RmsNorm" not in _nodes(fused.rms_norm(half, weight, 1e-6))


def test_the_graph_elu_is_cpu_only(monkeypatch) -> None:
    from finetune.runtime import accelerate, host_elu

    assert host_elu.graph_elu() is not None
    monkeypatch.setattr(accelerate, "is_cpu_backend", lambda: False)
    assert host_elu.graph_elu() is None  # a Metal / CUDA graph keeps the host round trip


def _swiglu_references() -> dict[str, object]:
    """What the SwiGLU MLPs the runtime re-classes computed before: mlx-audio's compiled
    `swiglu` (Qwen3-TTS's talker and code predictor; its Llama blocks, CSM's) and the vocoder
    transformer's `nn.silu(gate) * up`."""
    from mlx_audio.lm.models.activations import swiglu as llama_swiglu
    from mlx_audio.tts.models.qwen3_tts.talker import swiglu as talker_swiglu

    return {
        "talker": talker_swiglu,
        "llama": llama_swiglu,
        "silu times up": lambda g, u: nn.silu(g) * u,
    }


def _same_bits(a: mx.array, b: mx.array) -> bool:
    x, y = np.array(a), np.array(b)
    return bool(np.all((x.view(np.uint32) == y.view(np.uint32)) | (np.isnan(x) & np.isnan(y))))


def test_swiglu_is_one_node_with_the_compiled_kernels_values() -> None:
    rng = np.random.default_rng(7)
    # every float near the points where exp's integer part (|g| log2 e rounded) changes, the
    # overflow edge at 88, signed zeros, infinities, NaN, subnormals
    edges = (np.arange(0, 130) + 0.5) / 1.442695
    near = np.concatenate(
        [np.nextafter(edges.astype(np.float32), np.float32(d)) for d in (0, np.inf)]
        + [edges.astype(np.float32), np.float32([0.0, 88.0, 88.00001, 1e-45, 3e-39])]
    )
    special = np.float32([np.inf, np.nan, 1e30])
    gates = {
        "edges": np.concatenate([near, -near, special, -special]),
        "any bits": rng.integers(0, 2**32, 200_003, dtype=np.uint64).astype(np.uint32),
        "normal x 30": (rng.standard_normal(50_001) * 30).astype(np.float32),
    }
    for name, values in gates.items():
        gate = mx.array(values.view(np.float32))
        up = mx.array(rng.standard_normal(gate.shape).astype(np.float32))
        got = fused.swiglu(gate, up)
        assert _nodes(got) == Counter({"SwiGlu": 1}), name
        for reference, fn in _swiglu_references().items():
            assert _same_bits(got, fn(gate, up)), (name, reference)


def test_swiglu_takes_any_layout_and_each_row_alone_is_its_row_of_the_batch() -> None:
    for name, view in _views(6, 96).items():
        up = mx.random.normal(view.shape)
        got = fused.swiglu(view, up)
        assert _nodes(got)["SwiGlu"] == 1 and _nodes(got)["Contiguous"] == 0, name
        assert _same_bits(got, _swiglu_references()["talker"](view, up)), name  # type: ignore[operator]
        rows, ups = mx.array(np.array(view)).reshape(-1, 96), up.reshape(-1, 96)
        flat = got.reshape(-1, 96)
        for r in range(rows.shape[0]):
            assert _same_bits(fused.swiglu(rows[r : r + 1], ups[r : r + 1]), flat[r : r + 1])
    # a gate and an up of different shapes broadcast through MLX's ops
    gate, up = mx.random.normal((3, 1, 8)), mx.random.normal((4, 8))
    assert _same_bits(fused.swiglu(gate, up), nn.silu(gate) * up)


def test_swiglu_is_differentiable_in_gate_and_up() -> None:
    gate, up, cotangent = (mx.random.normal((4, 40), key=mx.random.key(i)) for i in range(3))

    def loss(fn, g: mx.array, u: mx.array) -> mx.array:
        return (fn(g, u) * cotangent).sum()

    ours = mx.grad(lambda g, u: loss(fused.swiglu, g, u), argnums=(0, 1))(gate, up)
    theirs = mx.grad(lambda g, u: loss(lambda a, b: nn.silu(a) * b, g, u), argnums=(0, 1))(gate, up)
    for got, want in zip(ours, theirs, strict=True):
        assert mx.allclose(got, want, atol=1e-6).item()


def test_swiglu_takes_mlxs_ops_without_the_extension_or_off_float32(monkeypatch) -> None:
    gate, up = mx.random.normal((3, 50)), mx.random.normal((3, 50))
    half = fused.swiglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16))
    assert "SwiGlu" not in _nodes(half) and half.dtype == mx.bfloat16
    monkeypatch.setattr(primitives, "load", lambda: None)
    got = fused.swiglu(gate, up)
    assert "SwiGlu" not in _nodes(got) and _same_bits(got, nn.silu(gate) * up)


def test_the_swiglu_mlps_are_reclassed_and_keep_their_outputs() -> None:
    from types import SimpleNamespace

    from finetune.runtime.accelerate import install_fast_modules

    from mlx_audio.lm.models import llama
    from mlx_audio.tts.models.qwen3_tts import speech_tokenizer, talker

    config = SimpleNamespace(hidden_size=32, intermediate_size=80, mlp_bias=False)
    mlps = {
        "talker": talker.TalkerMLP(config),
        "code predictor": talker.CodePredictorMLP(config),
        "vocoder": speech_tokenizer.DecoderMLP(config),
        "llama": llama.MLP(config),
    }
    x = mx.random.normal((2, 5, 32))
    before = {name: mlp(x) for name, mlp in mlps.items()}
    mx.eval(before)
    holder = nn.Module()
    holder.mlps = list(mlps.values())
    swapped = install_fast_modules(holder)
    assert sum(swapped.values()) == 4, swapped
    for name, mlp in mlps.items():
        after = mlp(x)
        assert "SwiGlu" in _nodes(after), name
        assert mx.array_equal(after, before[name]).item(), name


def _norm_then_rope_ops(
    x: mx.array, weight: mx.array, cos: mx.array, sin: mx.array, heads: int
) -> mx.array:
    """What mlx-audio's Qwen3-TTS attention does to its query (or key), op for op."""
    from mlx_audio.tts.models.qwen3_tts.talker import apply_rotary_pos_emb

    batch, length, _ = x.shape
    normed = mx.fast.rms_norm(x.reshape(batch, length, heads, -1), weight, 1e-6)
    per_head = normed.transpose(0, 2, 1, 3)
    rotated, _ = apply_rotary_pos_emb(per_head, per_head, cos, sin)
    return rotated


def _angles(batch: int, length: int, dim: int, seed: int) -> tuple[mx.array, mx.array]:
    angles = mx.random.uniform(-300, 300, (batch, length, dim), key=mx.random.key(seed))
    return mx.cos(angles), mx.sin(angles)


def test_the_query_norm_and_rotation_is_one_node_with_mlx_audios_values() -> None:
    weight = mx.random.normal((64,), key=mx.random.key(1))
    for batch, length, heads in [(1, 1, 16), (3, 7, 2), (2, 1, 8)]:
        x = 4 * mx.random.normal((batch, length, 2 * heads * 64), key=mx.random.key(heads))
        view = x[..., ::2]  # any layout: a strided view of the projection
        cos, sin = _angles(batch, length, 64, length)
        mx.eval(x, view, weight, cos, sin)
        got = fused.norm_rope(view, weight, cos, sin, heads, 1e-6)
        assert _nodes(got) == Counter({"NormRope": 1}) + _nodes(view)
        assert got.shape == (batch, heads, length, 64)
        assert _same_bits(got, _norm_then_rope_ops(view, weight, cos, sin, heads))
        # cos / sin shared by the batch's rows; each row alone is its row of the batch
        shared = fused.norm_rope(view, weight, cos[:1], sin[:1], heads, 1e-6)
        assert _same_bits(shared, _norm_then_rope_ops(view, weight, cos[:1], sin[:1], heads))
        for r in range(batch):
            alone = fused.norm_rope(
                view[r : r + 1], weight, cos[r : r + 1], sin[r : r + 1], heads, 1e-6
            )
            assert _same_bits(alone, got[r : r + 1])


def test_the_query_norm_and_rotation_is_differentiable() -> None:
    x = mx.random.normal((2, 3, 4 * 32))
    weight = mx.random.normal((32,))
    cos, sin = _angles(2, 3, 32, 0)

    def loss(fn: object, v: mx.array, w: mx.array) -> mx.array:
        return (fn(v, w) * mx.arange(v.size).reshape(2, 4, 3, 32)).sum()  # type: ignore[operator]

    ours = mx.grad(
        lambda v, w: loss(lambda a, b: fused.norm_rope(a, b, cos, sin, 4, 1e-6), v, w),
        argnums=(0, 1),
    )(x, weight)
    theirs = mx.grad(
        lambda v, w: loss(lambda a, b: _norm_then_rope_ops(a, b, cos, sin, 4), v, w),
        argnums=(0, 1),
    )(x, weight)
    for a, b in zip(ours, theirs, strict=True):
        assert _same_bits(a, b)


def test_the_query_norm_and_rotation_takes_mlxs_ops_without_the_extension(monkeypatch) -> None:
    x = mx.random.normal((2, 3, 4 * 32))
    weight = mx.random.normal((32,))
    cos, sin = _angles(2, 3, 32, 5)
    want = _norm_then_rope_ops(x, weight, cos, sin, 4)
    half = fused.norm_rope(x, weight, cos.astype(mx.bfloat16), sin.astype(mx.bfloat16), 4, 1e-6)
    assert "NormRope" not in _nodes(half)
    monkeypatch.setattr(primitives, "load", lambda: None)
    got = fused.norm_rope(x, weight, cos, sin, 4, 1e-6)
    assert "NormRope" not in _nodes(got) and _same_bits(got, want)


def test_the_qwen3_attentions_are_reclassed_and_keep_their_outputs() -> None:
    from types import SimpleNamespace

    from finetune.runtime.accelerate import install_fast_modules

    from mlx_audio.lm.models.cache import KVCache
    from mlx_audio.tts.models.qwen3_tts import talker

    config = SimpleNamespace(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_scaling=None,
    )
    attentions = {
        "talker": talker.TalkerAttention(config, 0),
        "code predictor": talker.CodePredictorAttention(config, 0),
    }
    prompt, step = mx.random.normal((2, 5, 48)), mx.random.normal((2, 1, 48))
    cos, sin = _angles(2, 6, 16, 2)
    mask = mx.random.uniform(shape=(2, 1, 1, 6)) > 0.3  # a row's padding: any masked columns

    def run(attention: nn.Module) -> list[mx.array]:
        cache = KVCache()
        first = attention(prompt, (cos[:, :5], sin[:, :5]), mask="causal", cache=cache)
        mx.eval(first, cache.keys, cache.values)
        second = attention(step, (cos[:, 5:], sin[:, 5:]), mask=mask, cache=cache)
        return [first, second]

    before = {name: run(a) for name, a in attentions.items()}
    mx.eval(before)
    holder = nn.Module()
    holder.attentions = list(attentions.values())
    assert sum(install_fast_modules(holder).values()) == 2 + 4  # and their four norms
    for name, attention in attentions.items():
        after = run(attention)
        assert _nodes(after[1])["NormRope"] == 2, name
        assert _nodes(after[1])["Attention"] == 1, name
        for a, b in zip(after, before[name], strict=True):
            assert mx.allclose(a, b, rtol=1e-5, atol=1e-6).item(), name


def _mlx_attention(q: mx.array, k: mx.array, v: mx.array, mask: object) -> mx.array:
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)  # type: ignore[arg-type]
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


def _qkv(batch: int, heads: int, kv_heads: int, length: int, keys: int, dim: int, seed: int):
    q = mx.random.normal((batch, heads, length, dim), key=mx.random.key(seed))
    # k and v as a KV cache hands them over: the first positions of a longer buffer
    cache = mx.random.normal((2, batch, kv_heads, keys + 5, dim), key=mx.random.key(seed + 1))
    mx.eval(q, cache)
    return q, cache[0][..., :keys, :], cache[1][..., :keys, :]


def test_the_attention_is_one_node_close_to_mlxs() -> None:
    for batch, heads, kv_heads, length, keys, dim in [
        (1, 16, 8, 1, 37, 128),
        (3, 4, 2, 5, 5, 16),
        (2, 2, 2, 3, 9, 12),
        (1, 8, 4, 40, 40, 64),
    ]:
        q, k, v = _qkv(batch, heads, kv_heads, length, keys, dim, dim)
        picks = mx.random.uniform(shape=(batch, 1, length, keys), key=mx.random.key(3)) > 0.3
        masks: list[object] = [None, "causal", picks, (1.0 - picks.astype(mx.float32)) * -1e9]
        for mask in masks:
            got = fused.attention(q, k, v, 0.125, mask)  # type: ignore[arg-type]
            what = f"{q.shape} {k.shape} {type(mask).__name__ if mask is not None else None}"
            assert _nodes(got)["Attention"] == 1 and got.shape == (batch, length, heads * dim)
            assert mx.allclose(got, _mlx_attention(q, k, v, mask), rtol=1e-5, atol=1e-6).item(), (
                what
            )


def test_a_query_row_is_the_row_alone_whatever_the_batch_and_its_padding() -> None:
    """The decode batch left-pads shorter rows' caches with zeros and masks them (-1e9 added):
    each row's output must be its output alone, unpadded, bit for bit."""
    heads, kv_heads, dim, longest = 4, 2, 32, 11
    lengths = [11, 4, 7]
    rows = [_qkv(1, heads, kv_heads, 1, n, dim, 10 * n) for n in lengths]
    padded_k = mx.concatenate(
        [mx.pad(k, [(0, 0), (0, 0), (longest - k.shape[2], 0), (0, 0)]) for _, k, _ in rows]
    )
    padded_v = mx.concatenate(
        [mx.pad(v, [(0, 0), (0, 0), (longest - v.shape[2], 0), (0, 0)]) for _, _, v in rows]
    )
    real = mx.array([[0] * (longest - n) + [1] * n for n in lengths])
    mask = (1 - real[:, None, None, :].astype(mx.float32)) * -1e9
    batch = fused.attention(
        mx.concatenate([q for q, _, _ in rows]), padded_k, padded_v, 0.125, mask
    )
    for r, (q, k, v) in enumerate(rows):
        assert _same_bits(batch[r : r + 1], fused.attention(q, k, v, 0.125)), r


def test_the_attention_is_differentiable_as_mlxs() -> None:
    q, k, v = _qkv(2, 4, 2, 3, 6, 16, 4)

    def loss(fn: object, *args: mx.array) -> mx.array:
        return (fn(*args, "causal") * mx.arange(2 * 3 * 64).reshape(2, 3, 64)).sum()  # type: ignore[operator]

    ours = mx.grad(
        lambda *a: loss(lambda *b: fused.attention(*b[:3], 0.125, b[3]), *a), argnums=(0, 1, 2)
    )(q, k, v)
    theirs = mx.grad(lambda *a: loss(_mlx_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_the_attention_takes_mlxs_op_without_the_extension(monkeypatch) -> None:
    q, k, v = _qkv(1, 4, 2, 2, 5, 16, 8)
    half = fused.attention(q, k, v.astype(mx.bfloat16), 0.125)
    assert "Attention" not in _nodes(half)
    monkeypatch.setattr(primitives, "load", lambda: None)
    got = fused.attention(q, k, v, 0.125, "causal")
    assert "Attention" not in _nodes(got) and _same_bits(got, _mlx_attention(q, k, v, "causal"))
