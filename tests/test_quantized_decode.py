"""Quantised checkpoints on MLX's CPU backend: each QuantizedLinear takes our packed product up to
a row limit and a dequantised fp32 copy above it (finetune/runtime/quantized.py); the packed
parameters stay.

Tolerance: the packed kernel and the copy multiply by exactly the values `quantized_matmul` does,
so the three paths differ only in the order of float sums: layer outputs within 1e-5 relative,
and greedy codes identical frame for frame (a flip would need two logits within ~1e-5 of each
other; none is here, and a wrong dequantisation -- scales off, groups shifted, values unpacked in
the wrong order -- changes outputs at the 1e-1 level, which the layer test catches first)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.arrays import flat_items
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import Conditioning
from finetune.families.qwen3_tts.serving import Qwen3BatchGenerator, Qwen3Prompter, Row
from finetune.runtime import fast_cpu_active, packed
from finetune.runtime.quantized import (
    DENSE_ENV,
    PACKED_MAX_ROWS,
    UNLIMITED,
    CpuQuantizedLinear,
    dense_bytes,
    dequantised_weight,
)
from finetune.sampling import Sampling

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.personaplex_helpers import live, run_alone

TEXTS = ("Hello quantised world.", "A second, longer row of text to speak.")


GREEDY = Sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_tokens=8)


def _layers(model: nn.Module) -> list[CpuQuantizedLinear]:
    return [m for _, m in model.named_modules() if isinstance(m, CpuQuantizedLinear)]


PATHS = ("mlx", "packed", "dense")


def _force(model: nn.Module, path: str) -> None:
    """Every quantised layer through one path: MLX's kernel, our packed product, the fp32 copy."""
    for layer in _layers(model):
        _force_layer(layer, path)


def _force_layer(layer: CpuQuantizedLinear, path: str) -> None:
    layer.__class__ = nn.QuantizedLinear if path == "mlx" else CpuQuantizedLinear
    layer._packed_max_rows = UNLIMITED if path == "packed" else 0


def _restore(model: nn.Module) -> None:
    for _, layer in model.named_modules():
        if isinstance(layer, nn.QuantizedLinear) and "_dense" in layer:
            layer.__class__ = CpuQuantizedLinear
            layer._packed_max_rows = PACKED_MAX_ROWS


@pytest.fixture(scope="module", params=[8, 4], ids=["q8", "q4"])
def loaded(request: pytest.FixtureRequest, tiny_qwen3_q8: Path, tiny_qwen3_q4: Path):
    assert fast_cpu_active(), "these tests are about MLX's CPU backend with the fast paths on"
    path = {8: tiny_qwen3_q8, 4: tiny_qwen3_q4}[request.param]
    assert DENSE_ENV not in os.environ  # on by default (finetune/runtime/quantized.py)
    return request.param, load_qwen3_tts(path)


def test_every_quantised_layer_gets_the_packed_product_and_an_fp32_copy(loaded) -> None:
    bits, checkpoint = loaded
    model = checkpoint.model
    quantised = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    layers = _layers(model)
    assert quantised and len(layers) == len(quantised)
    assert packed.load() is not None, packed.problem()  # an AVX2 CPU with a C++ compiler
    assert checkpoint.runtime.swapped[CpuQuantizedLinear.__name__] == len(layers)
    assert checkpoint.runtime.swapped["CpuQuantizedLinear.packed"] == len(layers)
    for layer in layers:
        assert layer.bits == bits and layer["weight"].dtype == mx.uint32
        assert layer._packed_max_rows == PACKED_MAX_ROWS
        assert layer["_dense"].dtype == mx.float32
        assert layer["_dense"].shape == (
            layer["weight"].shape[0],
            layer["weight"].shape[1] * 32 // bits,
        )
    # The copy is no parameter: never saved, trained, or counted in the weights' identity.
    keys = [k for k, _ in flat_items(model.parameters())]
    assert not [k for k in keys if "_dense" in k]
    assert dense_bytes(model) == sum(4 * layer["_dense"].size for layer in layers)


def test_the_packed_product_and_the_fp32_copy_give_the_quantised_product(loaded) -> None:
    _, checkpoint = loaded
    layer = checkpoint.model.talker.model.layers[0].mlp.down_proj
    assert isinstance(layer, CpuQuantizedLinear)
    assert mx.array_equal(layer["_dense"], dequantised_weight(layer)).item()
    in_dims = layer["_dense"].shape[1]
    try:
        for rows in (1, 2, 3, 5, 8):
            x = mx.random.normal((rows, in_dims), key=mx.random.key(rows))
            outputs = {}
            for path in PATHS:
                _force_layer(layer, path)
                outputs[path] = layer(x)
            quantised = outputs["mlx"]
            for path in ("packed", "dense"):
                error = (
                    mx.abs(outputs[path] - quantised).max().item() / mx.abs(quantised).max().item()
                )
                assert error < 1e-5, f"{path}, {rows} rows: {error:.2e}"
            # A row of a batch is the row alone, bit for bit (the sums' order is fixed).
            _force_layer(layer, "packed")
            assert mx.array_equal(layer(x[-1:]), outputs["packed"][-1:]).item()
    finally:
        _force_layer(layer, "packed")
        layer._packed_max_rows = PACKED_MAX_ROWS


def test_the_packed_product_reads_a_batch_of_any_shape_and_is_differentiable(loaded) -> None:
    _, checkpoint = loaded
    layer = checkpoint.model.talker.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CpuQuantizedLinear)
    in_dims = layer["_dense"].shape[1]
    x = mx.random.normal((2, 3, in_dims), key=mx.random.key(7))
    wanted = nn.QuantizedLinear.__call__(layer, x)
    got = packed.matmul(x, layer) + layer.get("bias", 0)
    assert got.shape == wanted.shape
    assert mx.abs(got - wanted).max().item() < 1e-5 * mx.abs(wanted).max().item()
    # Transposed (non-contiguous) input and a compiled graph take the same path.
    xt = mx.random.normal((in_dims, 4), key=mx.random.key(8)).T
    assert mx.allclose(packed.matmul(xt, layer), xt @ layer["_dense"].T, atol=1e-4).item()
    compiled = mx.compile(lambda v: packed.matmul(v, layer) * 2)
    assert mx.allclose(compiled(x), 2 * packed.matmul(x, layer)).item()
    # QLoRA trains through the frozen base: the input's gradient is MLX's.
    grad = mx.grad(lambda v: packed.matmul(v, layer).sum())(x)
    plain = mx.grad(lambda v: (v @ layer["_dense"].T).sum())(x)
    assert mx.allclose(grad, plain, atol=1e-4).item()


def test_a_layout_the_kernel_does_not_take_is_refused_with_a_clear_error(loaded) -> None:
    _, checkpoint = loaded
    layer = checkpoint.model.talker.model.layers[0].mlp.down_proj
    in_dims = layer["_dense"].shape[1]
    x = mx.zeros((1, in_dims))
    half = layer["scales"].astype(mx.float16)
    with pytest.raises(ValueError, match="scales and biases must be float32"):
        packed.matmul(x, _Stub(layer, scales=half))
    with pytest.raises(ValueError, match="last axis"):
        packed.matmul(mx.zeros((1, in_dims + 8)), layer)


class _Stub(dict):
    """A layer's arrays with one replaced (packed.matmul reads them by key)."""

    def __init__(self, layer: nn.QuantizedLinear, **replaced: mx.array) -> None:
        super().__init__(layer.items())
        self.update(replaced)
        self.group_size = layer.group_size
        self.bits = layer.bits


def test_greedy_codes_equal_the_plain_quantised_path(loaded) -> None:
    _, checkpoint = loaded
    model = checkpoint.model
    prompter = Qwen3Prompter(model)
    prompts = [prompter.prompt(text, Conditioning(), None) for text in TEXTS]

    def codes(path: str, batch: list[mx.array]) -> list[np.ndarray]:
        if path != "served":
            _force(model, path)
        rows = [Row(p, GREEDY) for p in batch]
        try:
            Qwen3BatchGenerator(model, lambda _: None).run(rows)
        finally:
            _restore(model)
        assert all(row.frames for row in rows)
        return [np.array(row.frames) for row in rows]

    def logits(path: str) -> mx.array:
        _force(model, path)
        try:
            return model.talker(prompts[0][None])[0]
        finally:
            _restore(model)

    # Every path really runs: the talker's prefill logits differ, by float rounding only.
    plain_logits = logits("mlx")
    for path in ("packed", "dense"):
        error = mx.abs(logits(path) - plain_logits).max().item() / mx.abs(plain_logits).max().item()
        assert 0 < error < 1e-5, (path, error)

    # One row (prefill and one-row decode) and a batch of two rows; and as served (packed for
    # the few-row decode steps, the copy for the prefill).
    for batch in ([prompts[0]], prompts):
        plain = codes("mlx", batch)
        for path in ("packed", "dense", "served"):
            for ours, theirs in zip(codes(path, batch), plain, strict=True):
                np.testing.assert_array_equal(ours, theirs)


def test_the_copies_can_be_turned_off(tiny_qwen3_q8: Path) -> None:
    """Turned off, a quantised model keeps only its packed weights (its memory win), and every
    call takes the packed product."""
    os.environ[DENSE_ENV] = "0"
    try:
        model = load_qwen3_tts(tiny_qwen3_q8).model
    finally:
        del os.environ[DENSE_ENV]
    layers = _layers(model)
    assert layers and dense_bytes(model) == 0
    assert all("_dense" not in layer and layer._packed_max_rows == UNLIMITED for layer in layers)
    layer = layers[0]
    x = mx.random.normal((40, layer["weight"].shape[1] * 32 // layer.bits), key=mx.random.key(3))
    wanted = nn.QuantizedLinear.__call__(layer, x)
    assert mx.abs(layer(x) - wanted).max().item() < 1e-5 * mx.abs(wanted).max().item()


PACKED_PROBE = """
import json, sys
import finetune
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.runtime import packed
loaded = load_qwen3_tts(sys.argv[1])
print(json.dumps({"problem": packed.problem(), "swapped": dict(loaded.runtime.swapped)}))
"""


def test_without_a_cxx_compiler_quantised_layers_keep_their_fp32_copies(
    tmp_path: Path, tiny_qwen3_q8: Path
) -> None:
    """The packed product is an optimisation: a machine without a C++ compiler (the C one
    present) loads and serves a quantised checkpoint as before, and says why."""
    import json
    import shutil
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"  # a C toolchain (the compiler, its assembler and linker) only
    bin_dir.mkdir()
    for name, tool in (
        ("cc", shutil.which("gcc") or shutil.which("cc")),
        ("as", None),
        ("ld", None),
    ):
        found = tool or shutil.which(name)
        assert found is not None, name
        (bin_dir / name).symlink_to(found)
    env = {
        **os.environ,
        "PATH": str(bin_dir),
        "CC": "",
        "CXX": "",
        "VOICEFOUNDRY_NATIVE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-c", PACKED_PROBE, str(tiny_qwen3_q8)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no C++ compiler" in state["problem"], state
    swapped = state["swapped"]
    assert swapped["CpuQuantizedLinear.dense"] == swapped["CpuQuantizedLinear"] > 0, swapped
    assert "CpuQuantizedLinear.packed" not in swapped, swapped


# --- the other families: their quantised variants take the same paths (runtime.prepare_model) --
@pytest.fixture(scope="module")
def csm_q8(tiny_csm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.csm.quantize import quantize_csm

    return quantize_csm(tiny_csm, tmp_path_factory.mktemp("csm_quantised") / "q8", "8")


@pytest.fixture(scope="module")
def personaplex_q4(tiny_personaplex: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.personaplex.quantize import quantize_personaplex

    out = tmp_path_factory.mktemp("personaplex_quantised") / "q4"
    return quantize_personaplex(tiny_personaplex, out, "4")


def _every_path_agrees(model: nn.Module, codes) -> None:
    """`codes()` (a greedy decode of `model`) is the same through MLX's kernel, the packed
    product, the fp32 copy and as served (packed for few rows, the copy above)."""
    layers = _layers(model)
    assert layers and all("_dense" in layer for layer in layers)
    assert {layer._packed_max_rows for layer in layers} == {PACKED_MAX_ROWS}

    def through(path: str):
        if path != "served":
            _force(model, path)
        try:
            return codes()
        finally:
            _restore(model)

    plain = through("mlx")
    for path in ("packed", "dense", "served"):
        np.testing.assert_array_equal(through(path), plain, err_msg=path)


def test_a_quantised_csm_takes_the_packed_product_with_the_same_greedy_codes(csm_q8) -> None:
    from finetune.families.csm.checkpoint import load_csm
    from finetune.families.csm.generate import generate_codes

    loaded = load_csm(csm_q8, serving=True)
    assert loaded.runtime.swapped["CpuQuantizedLinear.packed"] == len(_layers(loaded.model))

    def codes() -> np.ndarray:
        frames = generate_codes(
            loaded, TEXTS[1], speaker=0, seed=1, max_audio_frames=6, temperature=0.0, top_k=0
        )
        assert frames.shape == (6, loaded.num_codebooks)
        return frames

    _every_path_agrees(loaded.model, codes)


def test_a_quantised_personaplex_takes_the_packed_product_with_the_same_greedy_tokens(
    personaplex_q4,
) -> None:
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.families.personaplex.runtime import PersonaPlexRuntime

    loaded = load_personaplex(personaplex_q4, serving=True)
    assert loaded.runtime.swapped["CpuQuantizedLinear.packed"] == len(_layers(loaded.lm))
    runtime = PersonaPlexRuntime(loaded)

    def codes() -> np.ndarray:
        session = live(runtime, 2, text_temperature=0.0, audio_temperature=0.0)
        # Tokens only: the PCM differs by float rounding between the paths.
        trace = run_alone(runtime, session, stream=0, n=8)
        return np.array([[text, *audio] for text, audio, _ in trace])

    _every_path_agrees(loaded.lm, codes)
