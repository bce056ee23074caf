"""A bf16 checkpoint served on MLX's CPU backend keeps the Linear weights of its frame-by-frame
decode path in bf16 (finetune/runtime/half.py): Qwen3-TTS's talker, CSM's backbone and depth
decoder, PersonaPlex's temporal transformer and depformer. Our kernel reads 2 bytes a weight
where the fp32 cast read 4.

Exactness: the bf16 -> fp32 widening is exact and the kernel uses the few-row kernel's ISA,
blocks and order of sums, so every output is the fp32 path's bit for bit (one row to the few-row
kernel's limit, 64 on AVX2 and 16 on AVX-512; above, both take the same fp32 product), and greedy
codes are identical. A wrong widening (a byte
order, a shift) or a wrong block changes outputs at the 1e-2 level: caught by the layer test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.families.csm.checkpoint import load_csm
from finetune.families.csm.generate import generate_codes
from finetune.families.personaplex.checkpoint import load_personaplex
from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import Conditioning
from finetune.families.qwen3_tts.serving import Qwen3BatchGenerator, Qwen3Prompter, Row
from finetune.runtime import blas, fast_cpu_active, packed
from finetune.runtime.half import KEEP_BF16_ENV, CpuBf16Linear
from finetune.sampling import Sampling

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.personaplex_helpers import Trace, live, run_alone

GREEDY = Sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_tokens=8)
TEXTS = ("Hello half precision.", "A second, longer row of text to speak.")


@pytest.fixture(scope="module")
def served(tiny_qwen3_base: Path):
    assert fast_cpu_active(), "these tests are about MLX's CPU backend with the fast paths on"
    return load_qwen3_tts(tiny_qwen3_base, serving=True)


@pytest.fixture(scope="module")
def trained(tiny_qwen3_base: Path):
    return load_qwen3_tts(tiny_qwen3_base)


def _halves(model: nn.Module) -> list[CpuBf16Linear]:
    return [m for _, m in model.named_modules() if isinstance(m, CpuBf16Linear)]


def test_served_talker_layers_stay_bf16_and_training_keeps_fp32(served, trained) -> None:
    assert packed.load() is not None, packed.problem()
    halves = _halves(served.model)
    plain = [m for _, m in served.model.talker.named_modules() if type(m) is nn.Linear]
    assert halves and not plain  # every talker Linear of a bf16 checkpoint
    assert served.runtime.swapped[CpuBf16Linear.__name__] == len(halves)
    assert all(layer["weight"].dtype == mx.bfloat16 for layer in halves)
    assert {layer._half_max_rows for layer in halves} == {blas.few_rows_max()} != {0}
    # The vocoder keeps fp32 (its products have many rows), and so does a model for training.
    assert not _halves(served.model.speech_tokenizer)
    assert not _halves(trained.model)
    assert {p.dtype for _, p in _flat(trained.model.talker)} == {mx.float32}


def _flat(module: nn.Module) -> list[tuple[str, mx.array]]:
    from finetune.arrays import flat_items

    return list(flat_items(module.parameters()))


def test_each_layer_gives_the_fp32_paths_bits_at_every_row_count(served) -> None:
    layers = _halves(served.model)
    with_bias = [layer for layer in layers if "bias" in layer]
    for layer in [layers[0], layers[-1], *with_bias[:1]]:
        weight32 = layer["weight"].astype(mx.float32)
        in_dims = weight32.shape[1]
        most = layer._half_max_rows
        for rows in sorted({1, 2, 5, 16, 17, 33, most, most + 1}):
            x = mx.random.normal((rows, in_dims), key=mx.random.key(rows))
            fp32 = nn.Linear.__call__(_as_fp32(layer, weight32), x)
            ours = layer(x)
            assert ours.dtype == mx.float32
            assert mx.array_equal(ours, fp32).item(), (rows, mx.abs(ours - fp32).max().item())
        # The leading axes of a batch are rows too.
        x3 = mx.random.normal((2, 3, in_dims), key=mx.random.key(9))
        assert mx.array_equal(layer(x3), layer(x3.reshape(6, in_dims)).reshape(2, 3, -1)).item()


def _as_fp32(layer: CpuBf16Linear, weight32: mx.array) -> nn.Linear:
    twin = nn.Linear(weight32.shape[1], weight32.shape[0], bias="bias" in layer)
    twin.weight = weight32
    if "bias" in layer:
        twin.bias = layer["bias"]
    return twin


def test_greedy_codes_equal_the_fp32_models(served, trained) -> None:
    def codes(loaded, batch_texts: tuple[str, ...]) -> list[np.ndarray]:
        prompter = Qwen3Prompter(loaded.model)
        rows = [Row(prompter.prompt(t, Conditioning(), None), GREEDY) for t in batch_texts]
        Qwen3BatchGenerator(loaded.model, lambda _: None).run(rows)
        assert all(row.frames for row in rows)
        return [np.array(row.frames) for row in rows]

    for batch in (TEXTS[:1], TEXTS):
        for ours, theirs in zip(codes(served, batch), codes(trained, batch), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_the_bf16_product_is_differentiable_in_input_and_weight(served) -> None:
    layer = _halves(served.model)[0]
    weight = layer["weight"]
    x = mx.random.normal((2, 3, weight.shape[1]), key=mx.random.key(4))
    cotangent = mx.random.normal((2, 3, weight.shape[0]), key=mx.random.key(5))

    def ours(v: mx.array, w: mx.array) -> mx.array:
        return (packed.bf16_matmul(v, w) * cotangent).sum()

    def plain(v: mx.array, w: mx.array) -> mx.array:
        return ((v @ w.astype(mx.float32).T) * cotangent).sum()

    got = mx.grad(ours, argnums=(0, 1))(x, weight)
    want = mx.grad(plain, argnums=(0, 1))(x, weight)
    assert mx.allclose(got[0], want[0], atol=1e-4).item()
    assert got[1].dtype == mx.bfloat16
    assert mx.allclose(got[1].astype(mx.float32), want[1].astype(mx.float32), atol=1e-2).item()
    with pytest.raises(ValueError, match="bfloat16"):
        packed.bf16_matmul(x, weight.astype(mx.float32))


def test_keeping_bf16_can_be_turned_off(tiny_qwen3_base: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEEP_BF16_ENV, "0")
    loaded = load_qwen3_tts(tiny_qwen3_base, serving=True)
    assert not _halves(loaded.model)
    assert CpuBf16Linear.__name__ not in loaded.runtime.swapped


@pytest.fixture(scope="module")
def bf16_csm(tiny_csm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CSM stored in bf16, as Sesame's checkpoint is (the tiny preset is fp32)."""
    out = tmp_path_factory.mktemp("csm_bf16") / "csm"
    shutil.copytree(tiny_csm, out)
    weights, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    halved = {
        k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }
    mx.save_safetensors(str(out / "model.safetensors"), halved, metadata=metadata)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return out


def _only_halves(module: nn.Module) -> int:
    """How many Linear layers of `module` are bf16-kept; none may be left a plain Linear."""
    assert not [p for p, m in module.named_modules() if type(m) is nn.Linear]
    return len(_halves(module))


def test_a_served_csm_keeps_its_decode_layers_bf16_and_speaks_the_fp32_models_codes(
    bf16_csm: Path,
) -> None:
    served, trained = load_csm(bf16_csm, serving=True), load_csm(bf16_csm)
    kept = _only_halves(served.model.model)
    assert kept == served.runtime.swapped[CpuBf16Linear.__name__] > 0
    assert not _halves(trained.model) and CpuBf16Linear.__name__ not in trained.runtime.swapped
    for seed, temperature, top_k in ((3, 0.0, 0), (4, 0.9, 50)):
        kwargs = dict(speaker=1, seed=seed, max_audio_frames=6, temperature=temperature)
        ours = generate_codes(served, TEXTS[1], top_k=top_k, **kwargs)
        theirs = generate_codes(trained, TEXTS[1], top_k=top_k, **kwargs)
        assert ours.shape == (6, served.num_codebooks)
        np.testing.assert_array_equal(ours, theirs)


def test_a_served_personaplex_keeps_its_lm_bf16_and_steps_as_the_fp32_model(
    tiny_personaplex: Path, loaded_personaplex
) -> None:
    served = load_personaplex(tiny_personaplex, serving=True)
    assert _only_halves(served.lm) == served.runtime.swapped[CpuBf16Linear.__name__] > 0
    assert not _halves(served.mimi) and not _halves(loaded_personaplex.lm)

    def trace(loaded) -> Trace:
        runtime = PersonaPlexRuntime(loaded)
        return run_alone(runtime, live(runtime, 5), stream=0, n=10)

    ours = trace(served)
    assert len({step[0] for step in ours}) > 3  # text tokens move: the lm is really running
    assert ours == trace(loaded_personaplex)


def test_a_kept_weight_is_never_copied_to_fp32_by_the_cast() -> None:
    """`prepare_model` keeps the named layers before its fp32 cast; the cast passes their weight
    by (the same array, still bf16), so a load never holds a bf16 and an fp32 copy at once."""
    from finetune.runtime.accelerate import to_float32
    from finetune.runtime.half import keep_bf16

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    model.set_dtype(mx.bfloat16)
    kept, other = model.layers
    assert keep_bf16([kept])[CpuBf16Linear.__name__] == 1
    weight = kept["weight"]
    to_float32(model)
    assert kept["weight"] is weight and weight.dtype == mx.bfloat16
    assert kept["bias"].dtype == mx.float32 and other["weight"].dtype == mx.float32
