"""Swap slow MLX conv modules of a loaded model for GEMM-based ones, and run it in fp32.

Modules keep their parameters and their place in the tree; only their class changes to a
subclass whose `__call__` takes the GEMM form that is fastest for the shape (`conv1d_plan`), all
of which give MLX's result, and MLX's own op where none of ours applies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, cast

from finetune.runtime import fused, host_snake
from finetune.runtime.conv import conv1d_im2col, conv1d_taps, conv_transpose1d_taps
from finetune.runtime.elementwise import sin_squared

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Which GEMM form a conv takes, measured per shape on 2-core x86-64 with OpenBLAS
# (tests/bench/bench_foundation.py prints them side by side). MLX's own conv loses to one of
# ours almost everywhere (its dilated conv by 100-1000x, its undilated one by up to 10x on
# short inputs) and ties at best; per-tap `addmm` wins by 1.2-5.7x over im2col once a row has
# at least TAPS_MIN_ROWS_PER_CHANNEL output steps per input channel (each tap's GEMM then has
# enough rows to amortise reading its C_in x C_out slice) and for narrow outputs; im2col wins
# below that. The plan looks at one row's length, never the batch's, so a row takes the same
# path (and gets the same bits) alone or batched.
TAPS_MIN_ROWS_PER_CHANNEL = 8
NARROW_OUTPUT = 32

ConvPlan = Literal["mlx", "taps", "im2col"]


def conv1d_plan(*, kernel: int, groups: int, c_in: int, c_out: int, out_len: int) -> ConvPlan:
    """Any dilation costs ours the same, so it plays no part."""
    if groups != 1:
        return "mlx"
    if kernel == 1:
        return "taps"  # one matmul either way
    if c_in >= 8 and (c_out < NARROW_OUTPUT or out_len >= TAPS_MIN_ROWS_PER_CHANNEL * c_in):
        return "taps"
    return "im2col"


def _out_len(length: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose1d_fast_ok(kernel: int, padding: int, dilation: int, groups: int) -> bool:
    # MLX clamps padding larger than dilation * (kernel - 1); keep its op for that corner.
    return groups == 1 and padding <= dilation * (kernel - 1)


_CONV1D = {"taps": conv1d_taps, "im2col": conv1d_im2col}


# Each fast conv's weights, by name, and the transpose its GEMMs read them through.
_TAPS_LAYOUT: Mapping[str, tuple[int, ...]] = MappingProxyType({"weight": (1, 2, 0)})
_TRANSPOSED_LAYOUT: Mapping[str, tuple[int, ...]] = MappingProxyType({"weight": (2, 1, 0)})


class FastConv1d(nn.Conv1d):
    GEMM_LAYOUT = _TAPS_LAYOUT  # [K, C_in, C_out]

    def __call__(self, x: mx.array) -> mx.array:
        c_out, k, c_in = self.weight.shape
        plan = conv1d_plan(
            kernel=k,
            groups=self.groups,
            c_in=c_in,
            c_out=c_out,
            out_len=_out_len(x.shape[1], k, self.stride, self.padding, self.dilation),
        )
        if plan == "mlx":
            return super().__call__(x)
        bias = self.bias if "bias" in self else None
        return _CONV1D[plan](x, self.weight, self.stride, self.padding, self.dilation, bias)


class FastConvTranspose1d(nn.ConvTranspose1d):
    GEMM_LAYOUT = _TRANSPOSED_LAYOUT  # [C_in, K, C_out]

    def __call__(self, x: mx.array) -> mx.array:
        k = self.weight.shape[1]
        if not conv_transpose1d_fast_ok(k, self.padding, self.dilation, 1):
            return super().__call__(x)
        y = conv_transpose1d_taps(
            x, self.weight, self.stride, self.padding, self.dilation, self.output_padding
        )
        return y + self.bias if "bias" in self else y


def _square_snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: float) -> mx.array:
    """x + sin(x e^alpha)^2 / (e^beta + eps). In float32 on the host (`host_snake`: one
    compiled pass, else numpy's vectorised sin in four), where MLX's CPU backend makes one pass
    over memory per op of the polynomial (numpy alone was 3.8x faster on the vocoder's last
    stage, [48000, 96], the kernel 4x faster again); its gradient is the polynomial's
    (`_host_snake`'s vjp)."""
    if x.dtype == mx.float32:
        try:
            return cast(mx.array, _host_snake(x, alpha, beta, mx.array(eps, mx.float32)))
        except ValueError:  # traced (compile, vmap): no values to take to the host
            pass
    return _snake(x, alpha, beta, mx.array(eps, x.dtype))


def _snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    return x + (1.0 / (mx.exp(beta) + eps)) * sin_squared(x * mx.exp(alpha))


@mx.custom_function
def _host_snake(x: mx.array, alpha: mx.array, beta: mx.array, eps: mx.array) -> mx.array:
    scale = np.exp(np.asarray(alpha, dtype=np.float32))
    gain = (1.0 / (np.exp(np.asarray(beta, dtype=np.float32)) + eps.item())).astype(np.float32)
    return mx.array(host_snake.snake(np.asarray(x), scale, gain))


@_host_snake.vjp
def _host_snake_vjp(
    primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array
) -> tuple[mx.array, ...]:
    _, vjps = mx.vjp(_snake, list(primals), [cotangent])
    return tuple(vjps)


class FastRMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        return fused.rms_norm(x, self["weight"], self.eps)


def _mimi_classes() -> dict[type, type]:
    from mlx_audio.codec.models.mimi.modules import conv as mimi_conv

    class FastMimiConv1d(mimi_conv.Conv1d):
        GEMM_LAYOUT = _TAPS_LAYOUT

        def __call__(self, xs: mx.array) -> mx.array:
            c_out, k, c_in = self.weight.shape
            plan = conv1d_plan(
                kernel=k,
                groups=self._groups,
                c_in=c_in,
                c_out=c_out,
                out_len=_out_len(xs.shape[-1], k, self._stride, self._padding, self._dilation),
            )
            if plan == "mlx":
                return super().__call__(xs)
            y = _CONV1D[plan](
                xs.swapaxes(-1, -2),
                self.weight,
                self._stride,
                self._padding,
                self._dilation,
                self.bias,
            )
            return y.swapaxes(-1, -2)

    class FastMimiConvTranspose1d(mimi_conv.ConvTranspose1d):
        GEMM_LAYOUT = MappingProxyType({"_expanded_weight": (2, 1, 0)})

        def __call__(self, xs: mx.array) -> mx.array:
            k = self._expanded_weight.shape[1]
            if not conv_transpose1d_fast_ok(k, self._padding, 1, self._expanded_groups):
                return super().__call__(xs)
            y = conv_transpose1d_taps(
                xs.swapaxes(-1, -2), self._expanded_weight, self._stride, self._padding
            )
            if self.bias is not None:
                y = y + self.bias
            return y.swapaxes(-1, -2)

    return {
        mimi_conv.Conv1d: FastMimiConv1d,
        mimi_conv.ConvTranspose1d: FastMimiConvTranspose1d,
    }


def _qwen3_snake_classes() -> dict[type, type]:
    from mlx_audio.tts.models.qwen3_tts import speech_tokenizer as st

    class FastSnakeBeta(st.SnakeBeta):
        def __call__(self, x: mx.array) -> mx.array:
            return _square_snake(x, self.alpha, self.beta, self.eps)

    class FastOutputSnake(st.DecoderOutputSnake):
        def __call__(self, x: mx.array) -> mx.array:
            return _square_snake(x, self.alpha, self.beta, self.eps)

    return {st.SnakeBeta: FastSnakeBeta, st.DecoderOutputSnake: FastOutputSnake}


def _swiglu_mlp(base: type) -> type:
    """`base` (gate_proj, up_proj, down_proj: down(silu(gate(x)) * up(x))) on `fused.swiglu`."""

    def __call__(self: Any, x: mx.array) -> mx.array:
        return self.down_proj(fused.swiglu(self.gate_proj(x), self.up_proj(x)))

    return type(f"Fast{base.__name__}", (base,), {"__call__": __call__})


def _swiglu_mlp_classes() -> dict[type, type]:
    """The SwiGLU MLPs of Qwen3-TTS's talker, code predictor and vocoder and of the Llama
    blocks CSM is built from (mlx-audio's `lm.models.llama`)."""
    from mlx_audio.lm.models import llama
    from mlx_audio.tts.models.qwen3_tts import speech_tokenizer, talker

    bases = (talker.TalkerMLP, talker.CodePredictorMLP, speech_tokenizer.DecoderMLP, llama.MLP)
    return {base: _swiglu_mlp(base) for base in bases}


def _qwen3_attention(base: type) -> type:
    """`base` (Qwen3-TTS's talker or code-predictor attention) with its query and key each
    normed, laid out per head and rotated in one node (`fused.norm_rope`, the same values), and
    the attention itself one node (`fused.attention`: each query row alone, so a row of a batch
    is still the row alone bit for bit; within float rounding of MLX's)."""

    def __call__(
        self: Any,
        x: mx.array,
        position_embeddings: tuple[mx.array, mx.array],
        mask: mx.array | None = None,
        cache: Any = None,
    ) -> mx.array:
        batch, length, _ = x.shape
        cos, sin = position_embeddings
        q = fused.norm_rope(
            self.q_proj(x), self.q_norm.weight, cos, sin, self.num_heads, self.q_norm.eps
        )
        k = fused.norm_rope(
            self.k_proj(x), self.k_norm.weight, cos, sin, self.num_kv_heads, self.k_norm.eps
        )
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.o_proj(fused.attention(q, k, v, self.scale, mask))

    return type(f"Fast{base.__name__}", (base,), {"__call__": __call__})


def _qwen3_attention_classes() -> dict[type, type]:
    from mlx_audio.tts.models.qwen3_tts import talker

    bases = (talker.TalkerAttention, talker.CodePredictorAttention)
    return {base: _qwen3_attention(base) for base in bases}


_swaps: dict[type, type] | None = None


def swap_table() -> dict[type, type]:
    global _swaps
    if _swaps is None:
        _swaps = {
            nn.Conv1d: FastConv1d,
            nn.ConvTranspose1d: FastConvTranspose1d,
            nn.RMSNorm: FastRMSNorm,
        }
        _swaps.update(_mimi_classes())
        _swaps.update(_qwen3_snake_classes())
        _swaps.update(_swiglu_mlp_classes())
        _swaps.update(_qwen3_attention_classes())
    return _swaps


def install_fast_modules(model: nn.Module) -> Counter[str]:
    """Re-class every conv / snake / RMSNorm / SwiGLU MLP / Qwen3-TTS attention module with a fast
    twin; returns counts by class name.

    Each conv's weight is also laid out the way its GEMMs read it (`GEMM_LAYOUT`): checkpoint
    loaders transpose PyTorch's conv layout lazily, leaving strided views that every call would
    gather again (10x the time of the GEMM itself for the Qwen3-TTS vocoder's first conv). The
    parameter keeps its shape; only the order of its memory changes.
    """
    table = swap_table()
    swapped: Counter[str] = Counter()
    relaid: list[mx.array] = []
    for _, module in model.named_modules():
        fast = table.get(type(module))
        if fast is not None:
            module.__class__ = fast
            swapped[fast.__name__] += 1
            for name, order in getattr(fast, "GEMM_LAYOUT", {}).items():
                module[name] = _stored_as(module[name], order)
                relaid.append(module[name])
    mx.eval(relaid)
    return swapped


def _stored_as(weight: mx.array, order: tuple[int, ...]) -> mx.array:
    """`weight`, unchanged in value and shape, whose `transpose(*order)` is row-major."""
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return mx.contiguous(weight.transpose(order)).transpose(inverse)


def to_float32(model: nn.Module) -> None:
    """On CPU only fp32 matmuls go through BLAS: cast every floating parameter up, but for the
    weights of layers kept in bf16 (`half.CpuBf16Linear`: our kernel reads them as bf16), which
    are never copied to fp32, so a served bf16 model never holds both copies at once."""
    from finetune.runtime.half import CpuBf16Linear

    kept = [
        (layer, layer.pop("weight"))
        for _, layer in model.named_modules()
        if isinstance(layer, CpuBf16Linear)
    ]
    try:
        model.set_dtype(mx.float32, predicate=lambda dt: mx.issubdtype(dt, mx.floating))
    finally:
        for layer, weight in kept:
            layer["weight"] = weight


def is_cpu_backend() -> bool:
    device: Any = mx.default_device()
    return device.type == mx.cpu
