"""QLoRA end to end below HTTP: a quantised base made by mlx-audio's converter loads, trains,
serves its adapter through the bank exactly as trained, and is told apart by its identity."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import Conditioning
from finetune.families.qwen3_tts.serving import Qwen3BatchGenerator, Qwen3Prompter, Row
from finetune.identity import same_base, weights_identity
from finetune.loading import CheckpointError
from finetune.lora import (
    LoRAConfig,
    QLoRALinear,
    apply_lora,
    fuse_lora,
    linear_dims,
    load_adapters,
    lora_state,
    save_adapters,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from server.engine.bank import AdapterBank, AdapterTensors
from server.engine.family import BankLimits, load_speech_model

TEXT = "Hello quantised world."


@dataclass
class Greedy:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 6


def _quantised_layers(model: nn.Module) -> dict[str, nn.QuantizedLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose config.json / weights can be edited; the big speech tokenizer is linked."""
    dst.mkdir()
    for item in src.iterdir():
        if item.is_dir():
            (dst / item.name).symlink_to(item)
        else:
            shutil.copy2(item, dst / item.name)
    return dst


# --- the converter's checkpoint loads ------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_converted_checkpoint_loads_quantised(bits, tiny_qwen3_q8, tiny_qwen3_q4):
    path = {8: tiny_qwen3_q8, 4: tiny_qwen3_q4}[bits]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}

    loaded = load_qwen3_tts(path)
    assert loaded.quantization == config["quantization"]
    talker = loaded.model.talker
    layers = _quantised_layers(talker)
    # The converter quantises the talker's and the code predictor's projections...
    q_proj = talker.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits
    assert isinstance(talker.code_predictor.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert all(layer.bits == bits and layer.group_size == 64 for layer in layers.values())
    # ...but not the embeddings nor the speaker encoder (mlx-audio's model_quant_predicate).
    assert type(talker.model.codec_embedding) is nn.Embedding
    assert not _quantised_layers(loaded.model.speaker_encoder)
    assert loaded.model.speech_tokenizer is not None and loaded.model.tokenizer is not None


def test_quantised_talker_stays_close_to_full_precision(
    loaded_qwen3_base, tiny_qwen3_q8, tiny_qwen3_q4
):
    prompt = Qwen3Prompter(loaded_qwen3_base.model).prompt(TEXT, Conditioning(), None)[None]
    reference, _ = loaded_qwen3_base.model.talker(prompt)
    errors = {}
    for bits, path in ((8, tiny_qwen3_q8), (4, tiny_qwen3_q4)):
        logits, _ = load_qwen3_tts(path).model.talker(prompt)
        errors[bits] = mx.abs(logits - reference).max().item() / mx.abs(reference).max().item()
    assert 0 < errors[8] < 0.05
    assert errors[8] < errors[4] < 0.5


def test_quantisation_that_does_not_match_the_config_is_reported(
    tmp_path, tiny_qwen3_base, tiny_qwen3_q8
):
    # Full-precision weights under a config that says 8-bit: nothing would load quantised.
    fp = _linked_copy(tiny_qwen3_base, tmp_path / "fp")
    config = json.loads((fp / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 8, "mode": "affine"}
    (fp / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no layer loaded quantised"):
        load_qwen3_tts(fp)

    # Quantised weights under a config that lost its quantization key: mlx-audio refuses them
    # (the packed weights and scales do not fit Linear layers), and we report it.
    q8 = _linked_copy(tiny_qwen3_q8, tmp_path / "q8")
    config = json.loads((q8 / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (q8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="scales"):
        load_qwen3_tts(q8)


# --- identity ------------------------------------------------------------------------------


def test_weights_identity(tmp_path, tiny_qwen3_base, tiny_qwen3_q8):
    base = weights_identity(tiny_qwen3_base)
    assert base == weights_identity(tiny_qwen3_base)
    assert base["quantization"] is None and len(base["weights_sha256"]) == 64
    q8 = weights_identity(tiny_qwen3_q8)
    assert q8["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q8["weights_sha256"] != base["weights_sha256"]
    assert same_base(base, base) == []
    assert len(same_base(base, q8)) == 2 and "8-bit" in same_base(base, q8)[1]

    # One byte of the weights changed (in place, so the cache must notice the new mtime).
    copy = _linked_copy(tiny_qwen3_base, tmp_path / "copy")
    assert weights_identity(copy) == base
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    changed = weights_identity(copy)
    assert changed["weights_sha256"] != base["weights_sha256"]
    assert changed["quantization"] is None


# --- the bank over QuantizedLinear, unit level ----------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_banked_quantised_layer_equals_qlora_layer(bits, tmp_path):
    mx.random.seed(bits)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.QuantizedLinear(128, 96, bias=True, group_size=64, bits=bits)

        def __call__(self, x: mx.array) -> mx.array:
            return self.proj(x)

    trained, served = Net(), Net()
    served.update(trained.parameters())
    assert linear_dims(trained.proj) == (128, 96)
    config = LoRAConfig(rank=4, alpha=8.0, targets=["proj"])
    apply_lora(trained, config)
    assert isinstance(trained.proj, QLoRALinear)
    rng = np.random.default_rng(bits)
    trained.update(
        tree_unflatten(
            [
                (k, mx.array(rng.normal(0, 0.2, v.shape), mx.float32))
                for k, v in lora_state(trained).items()
            ]
        )
    )
    save_adapters(tmp_path / "a", trained, config, {"module": "talker"})
    bank = AdapterBank(served, ["proj"], slots=3, max_rank=8, max_bytes=1 << 20)
    assert bank.layers["proj"].lora_a.shape == (3, 128, 8)
    slot = bank.ensure(AdapterTensors.read(tmp_path / "a"))
    x = mx.random.normal((2, 5, 128))
    bare = served(x)
    bank.set_rows([slot, 0])
    out = served(x)
    bank.set_rows(None)
    assert mx.allclose(out[0], trained(x)[0], atol=1e-5).item()
    assert mx.array_equal(out[1], bare[1]).item()
    assert mx.abs(out[0] - bare[0]).max().item() > 1e-2


# --- train on the q8 checkpoint, serve through the bank, generate -----------------------------


@pytest.fixture(scope="module")
def q8_trained(tiny_qwen3_q8, speaker_dataset, tmp_path_factory):
    """Two QLoRA steps on the converter's 8-bit checkpoint (no `lora.quantize`)."""
    from finetune.config import (
        DataSection,
        LoRASection,
        ModelSection,
        SpeakerSection,
        TrainConfig,
        TrainerSection,
    )
    from finetune.families.qwen3_tts.training import prepare_run
    from finetune.progress import ProgressWriter

    work = tmp_path_factory.mktemp("q8_run")
    config = TrainConfig(
        model=ModelSection(path=str(tiny_qwen3_q8), strategy="speaker"),
        data=DataSection(train=[str(speaker_dataset)]),
        lora=LoRASection(rank=4, alpha=8.0),
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=2e-2, prefetch=0),
        speaker=SpeakerSection(name="q8voice", slot=3000),
        output_dir=str(work / "run"),
    )
    run = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()))
    result = run.trainer.train()
    run.loaded.model.talker.eval()
    run.trainer_data = speaker_dataset  # what bake reads back
    return run, result


def test_training_on_the_quantised_checkpoint(q8_trained):
    run, result = q8_trained
    assert result.status == "finished" and result.step == 2
    assert result.last_loss is not None and np.isfinite(result.last_loss)
    talker = run.loaded.model.talker
    wrapped = talker.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, QLoRALinear) and isinstance(wrapped.linear, nn.QuantizedLinear)
    assert isinstance(talker.code_predictor.model.layers[0].mlp.up_proj, QLoRALinear)
    saved = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert saved["module"] == "talker"
    assert (result.final_dir / "adapters.safetensors").is_file()


def test_served_q8_bank_equals_the_trained_qlora_model(q8_trained, tiny_qwen3_q8):
    run, result = q8_trained
    trained = run.loaded.model
    served = load_speech_model("q8", "qwen3_tts", tiny_qwen3_q8, BankLimits(4, 8, 1 << 24))
    # The bank wraps the quantised layers themselves: the base is not swapped for fp weights.
    banked = served.bank.layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(banked.base, nn.QuantizedLinear) and banked.base.bits == 8
    slot = served.bank.ensure(AdapterTensors.read(result.final_dir))

    prompt = Qwen3Prompter(trained).prompt(TEXT, Conditioning(), None)
    want, _ = trained.talker(prompt[None])
    bare, _ = served.model.talker(prompt[None])
    assert mx.abs(want - bare).max().item() > 1e-3  # the adapter changes the talker's output
    served.bank.set_rows([slot, 0])
    try:
        got, _ = served.model.talker(mx.stack([prompt, prompt]))
    finally:
        served.bank.set_rows(None)
    # Both within float rounding: the fp32 copies' prefill of 2 x L rows goes to OpenBLAS's
    # sgemm, whose sums depend on the row count (decode steps of up to 16 rows are bit-exact).
    assert mx.allclose(got[0], want[0], atol=1e-4, rtol=1e-4).item()
    assert mx.allclose(got[1], bare[0], atol=1e-5, rtol=1e-5).item()

    # Greedy generation through the server's batched generator: the adapter row makes the
    # codes the trained model makes, the row without one the bare base's.
    served_rows = [Row(prompt, Greedy(), slot=slot), Row(prompt, Greedy(), slot=0)]
    served.generator.run(served_rows)
    trained_row = Row(prompt, Greedy())
    Qwen3BatchGenerator(trained, lambda _: None).run([trained_row])
    bare_row = Row(prompt, Greedy())
    served.generator.run([bare_row])
    assert trained_row.frames and bare_row.frames
    np.testing.assert_array_equal(np.array(served_rows[0].frames), np.array(trained_row.frames))
    np.testing.assert_array_equal(np.array(served_rows[1].frames), np.array(bare_row.frames))


# --- fusing a QLoRA layer ------------------------------------------------------------------


@pytest.mark.parametrize("requantize", [False, True], ids=["fp32", "requantised"])
def test_fuse_over_a_q8_base(requantize, q8_trained, tiny_qwen3_q8):
    _, result = q8_trained
    model = load_qwen3_tts(tiny_qwen3_q8).model
    load_adapters(model.talker, result.final_dir)
    layer = model.talker.model.layers[0].mlp.gate_proj
    assert isinstance(layer, QLoRALinear)
    base = layer.linear
    x = mx.random.normal((3, linear_dims(base)[0]))
    unfused = layer(x)
    fused = layer.fuse(requantize=requantize)
    error = mx.abs(fused(x) - unfused).max().item() / mx.abs(unfused).max().item()
    if requantize:
        assert isinstance(fused, nn.QuantizedLinear)
        assert (fused.bits, fused.group_size, fused.mode) == (base.bits, base.group_size, base.mode)
        assert fused.weight.dtype == mx.uint32 and fused.scales.dtype == base.scales.dtype
        assert 0 < error < 0.02  # a fresh 8-bit rounding of the fused weight: close, not exact
    else:
        assert type(fused) is nn.Linear and fused.weight.dtype == mx.float32
        assert error < 1e-5

    prompt = Qwen3Prompter(model).prompt(TEXT, Conditioning(), None)[None]
    before, _ = model.talker(prompt)
    paths = fuse_lora(model.talker, requantize=requantize)
    modules = dict(model.talker.named_modules())
    kinds = {type(modules[p]) for p in paths}
    assert kinds == ({nn.QuantizedLinear} if requantize else {nn.Linear})
    assert not lora_state(model.talker)
    after, _ = model.talker(prompt)
    error = mx.abs(after - before).max().item() / mx.abs(before).max().item()
    assert error < (0.05 if requantize else 1e-4)


def test_a_voice_exported_from_a_q8_base_stays_quantised(q8_trained, tiny_qwen3_q8, tmp_path):
    """bake --export from a quantised base: the adapter is fused and re-quantised like the base,
    the packed weights are written untouched, and the export loads quantised with the voice."""
    from finetune.config import DataSection, ModelSection, SpeakerSection, TrainConfig
    from finetune.families.qwen3_tts.bake import bake
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    run, result = q8_trained
    config = TrainConfig(
        model=ModelSection(path=str(tiny_qwen3_q8), strategy="speaker"),
        data=DataSection(train=[str(run.trainer_data)]),
        speaker=SpeakerSection(name="q8voice", slot=3000),
    )
    out = bake(config, result.final_dir, tmp_path / "pkg", export=tmp_path / "export")
    exported = load_qwen3_tts(out.export)
    assert exported.quantization == load_qwen3_tts(tiny_qwen3_q8).quantization
    layers = _quantised_layers(exported.model.talker)
    assert layers and all(layer.bits == 8 for layer in layers.values())
    # LoRA targets were fused, then re-quantised (not left as full-precision Linear layers).
    assert "model.layers.0.self_attn.q_proj" in layers
    assert "code_predictor.model.layers.0.mlp.up_proj" in layers
    assert "q8voice" in (exported.model.config.talker_config.spk_id or {})
    # The fused voice is what the trained QLoRA model computes (within 8-bit re-quantisation).
    prompt = Qwen3Prompter(run.loaded.model).prompt(TEXT, Conditioning(), None)
    want, _ = run.loaded.model.talker(prompt[None])
    got, _ = exported.model.talker(prompt[None])
    assert mx.abs(got - want).max().item() < 0.1 * mx.abs(want).max().item()


def test_a_voice_exported_with_dequantize_is_full_precision(q8_trained, tiny_qwen3_q8, tmp_path):
    """bake --export --dequantize: no QuantizedLinear and no quantization key left; the export
    loads as a full-precision checkpoint and still computes the trained voice."""
    from finetune.config import DataSection, ModelSection, SpeakerSection, TrainConfig
    from finetune.families.qwen3_tts.bake import BakeError, bake
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    run, result = q8_trained
    config = TrainConfig(
        model=ModelSection(path=str(tiny_qwen3_q8), strategy="speaker"),
        data=DataSection(train=[str(run.trainer_data)]),
        speaker=SpeakerSection(name="q8plain", slot=3001),
    )
    with pytest.raises(BakeError, match="--dequantize"):
        bake(config, result.final_dir, tmp_path / "nopkg", dequantize=True)
    out = bake(
        config, result.final_dir, tmp_path / "pkg", export=tmp_path / "export", dequantize=True
    )
    saved = json.loads((out.export / "config.json").read_text())
    assert "quantization" not in saved and "quantization_config" not in saved
    exported = load_qwen3_tts(out.export)
    assert exported.quantization is None
    assert not _quantised_layers(exported.model)
    assert "q8plain" in (exported.model.config.talker_config.spk_id or {})
    prompt = Qwen3Prompter(run.loaded.model).prompt(TEXT, Conditioning(), None)
    want, _ = run.loaded.model.talker(prompt[None])
    got, _ = exported.model.talker(prompt[None])
    # bf16 storage of the dequantised weights: close to the trained QLoRA model, not exact.
    assert mx.abs(got - want).max().item() < 0.1 * mx.abs(want).max().item()
