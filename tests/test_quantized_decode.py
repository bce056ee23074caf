"""Quantised checkpoints on MLX's CPU backend: each QuantizedLinear gets a dequantised fp32 copy
(finetune/runtime/quantized.py) used above its shape's row limit; the packed parameters stay.

Tolerance: the copy holds exactly the values `quantized_matmul` multiplies by, so the two paths
differ only in the order of float sums: layer outputs within 1e-5 relative, and greedy codes
identical frame for frame (a flip would need two logits within ~1e-5 of each other; none is here,
and a wrong dequantisation -- scales off, groups shifted -- changes outputs at the 1e-1 level,
which the layer test catches first)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.arrays import flat_items
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import Conditioning
from finetune.families.qwen3_tts.serving import Qwen3BatchGenerator, Qwen3Prompter, Row
from finetune.runtime import fast_cpu_active
from finetune.runtime.quantized import (
    DENSE_ENV,
    CpuQuantizedLinear,
    dense_bytes,
    dequantised_weight,
)
from finetune.sampling import Sampling

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

TEXTS = ("Hello quantised world.", "A second, longer row of text to speak.")


GREEDY = Sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_tokens=8)


def _layers(model: nn.Module) -> list[CpuQuantizedLinear]:
    return [m for _, m in model.named_modules() if isinstance(m, CpuQuantizedLinear)]


def _force_quantised(model: nn.Module, on: bool) -> None:
    for layer in _layers(model):
        layer._quant_max_rows = 1 << 30 if on else 0


@pytest.fixture(scope="module", params=[8, 4], ids=["q8", "q4"])
def loaded(request: pytest.FixtureRequest, tiny_qwen3_q8: Path, tiny_qwen3_q4: Path):
    assert fast_cpu_active(), "these tests are about MLX's CPU backend with the fast paths on"
    path = {8: tiny_qwen3_q8, 4: tiny_qwen3_q4}[request.param]
    assert DENSE_ENV not in os.environ  # on by default (finetune/runtime/quantized.py)
    return request.param, load_qwen3_tts(path)


def test_every_quantised_layer_gets_an_fp32_copy_and_keeps_its_parameters(loaded) -> None:
    bits, checkpoint = loaded
    model = checkpoint.model
    quantised = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    layers = _layers(model)
    assert quantised and len(layers) == len(quantised)
    assert checkpoint.runtime.swapped[CpuQuantizedLinear.__name__] == len(layers)
    for layer in layers:
        assert layer.bits == bits and layer["weight"].dtype == mx.uint32
        assert layer["_dense"].dtype == mx.float32
        assert layer["_dense"].shape == (
            layer["weight"].shape[0],
            layer["weight"].shape[1] * 32 // bits,
        )
    # The copy is no parameter: never saved, trained, or counted in the weights' identity.
    keys = [k for k, _ in flat_items(model.parameters())]
    assert not [k for k in keys if "_dense" in k]
    assert dense_bytes(model) == sum(4 * layer["_dense"].size for layer in layers)


def test_the_fp32_copy_gives_the_quantised_product(loaded) -> None:
    _, checkpoint = loaded
    layer = checkpoint.model.talker.model.layers[0].mlp.down_proj
    assert isinstance(layer, CpuQuantizedLinear)
    assert mx.array_equal(layer["_dense"], dequantised_weight(layer)).item()
    in_dims = layer["_dense"].shape[1]
    for rows in (1, 2, 8):
        x = mx.random.normal((rows, in_dims), key=mx.random.key(rows))
        quantised = nn.QuantizedLinear.__call__(layer, x)
        layer._quant_max_rows = 0
        dense = layer(x)
        layer._quant_max_rows = rows  # at the limit: the quantised kernel itself
        assert mx.array_equal(layer(x), quantised).item()
        layer._quant_max_rows = 0
        error = mx.abs(dense - quantised).max().item() / mx.abs(quantised).max().item()
        assert error < 1e-5, f"{rows} rows: {error:.2e}"


def test_greedy_codes_equal_the_plain_quantised_path(loaded) -> None:
    _, checkpoint = loaded
    model = checkpoint.model
    prompter = Qwen3Prompter(model)
    prompts = [prompter.prompt(text, Conditioning(), None) for text in TEXTS]

    def codes(quantised: bool, batch: list[mx.array]) -> list[np.ndarray]:
        _force_quantised(model, quantised)
        rows = [Row(p, GREEDY) for p in batch]
        try:
            Qwen3BatchGenerator(model, lambda _: None).run(rows)
        finally:
            _force_quantised(model, False)
        assert all(row.frames for row in rows)
        return [np.array(row.frames) for row in rows]

    # Both paths really run: the talker's prefill logits differ, by float rounding only.
    _force_quantised(model, True)
    plain_logits, _ = model.talker(prompts[0][None])
    _force_quantised(model, False)
    our_logits, _ = model.talker(prompts[0][None])
    error = mx.abs(our_logits - plain_logits).max().item() / mx.abs(plain_logits).max().item()
    assert 0 < error < 1e-5, error

    # One row (prefill and one-row decode) and a batch of two rows.
    for batch in ([prompts[0]], prompts):
        for ours, plain in zip(codes(False, batch), codes(True, batch), strict=True):
            np.testing.assert_array_equal(ours, plain)


def test_the_copies_can_be_turned_off(tiny_qwen3_q8: Path) -> None:
    """Turned off, a quantised model keeps only its packed weights (its memory win)."""
    os.environ[DENSE_ENV] = "0"
    try:
        model = load_qwen3_tts(tiny_qwen3_q8).model
    finally:
        del os.environ[DENSE_ENV]
    assert not _layers(model)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
