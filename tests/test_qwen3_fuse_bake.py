"""Fusing adapters, baking speakers, exporting checkpoints: on tiny models."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from finetune.config import DataSection, LoRASection, ModelSection, TrainConfig, TrainerSection
from finetune.families.qwen3_tts.bake import BakeError, bake
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.conditioning import Conditioning, SpecialIds
from finetune.families.qwen3_tts.forward import input_embeddings
from finetune.families.qwen3_tts.layout import build_sequence, chat_text, pack
from finetune.families.qwen3_tts.training import (
    prepare_run,
    quantize_targets,
    speaker_embedding,
)
from finetune.lora import LoRAConfig, apply_lora, fuse_lora, lora_state
from finetune.progress import ProgressWriter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

BUILTINS = {"vivian": 3065, "ryan": 3061}


def _talker_logits(model) -> mx.array:
    ids = SpecialIds.from_config(model.config)
    codes = np.random.default_rng(0).integers(0, 2048, (5, 16)).astype(np.int32)
    seq = build_sequence(
        ids,
        model.tokenizer.encode(chat_text("Fuse me.")),
        codes,
        Conditioning(language=None, speaker=False),
    )
    logits, _ = model.talker(input_embeddings(model.talker, pack([seq], ids), None))
    return logits


def _randomise_lora(talker: nn.Module) -> None:
    rng = np.random.default_rng(0)
    talker.update(
        _unflat(
            {
                k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
                for k, v in lora_state(talker).items()
            }
        )
    )


def _unflat(flat: dict[str, mx.array]):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_model_equals_unfused_model_plus_adapter(tiny_qwen3_base, quantized):
    loaded = load_qwen3_tts(tiny_qwen3_base)
    talker = loaded.model.talker
    config = LoRAConfig(
        rank=4,
        alpha=8.0,
        targets=[
            r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
            r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
        ],
    )
    if quantized:
        quantize_targets(talker, config, bits=4, group_size=32)
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in talker.named_modules())
    apply_lora(talker, config)
    _randomise_lora(talker)
    unfused = _talker_logits(loaded.model)
    fused_paths = fuse_lora(talker)
    assert len(fused_paths) == 14
    fused = _talker_logits(loaded.model)
    assert mx.abs(fused - unfused).max().item() < 1e-4


def _speaker_config(model: Path, train: Path, out: Path, **speaker) -> TrainConfig:
    from finetune.config import SpeakerSection

    return TrainConfig(
        model=ModelSection(path=str(model), strategy="speaker"),
        data=DataSection(train=[str(train)]),
        lora=LoRASection(rank=4, alpha=8.0),
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=1e-3, prefetch=0),
        speaker=SpeakerSection(**speaker),
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def base_with_builtins(tiny_qwen3_base, tmp_path_factory) -> Path:
    """A Base checkpoint that already names built-in speakers (as real checkpoints can)."""
    path = tmp_path_factory.mktemp("builtins") / "base"
    shutil.copytree(tiny_qwen3_base, path)
    config = json.loads((path / "config.json").read_text())
    config["talker_config"]["spk_id"] = dict(BUILTINS)
    config["talker_config"]["spk_is_dialect"] = {k: False for k in BUILTINS}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trained_speaker(base_with_builtins, speaker_dataset, tmp_path_factory) -> TrainConfig:
    out = tmp_path_factory.mktemp("speaker_run")
    config = _speaker_config(base_with_builtins, speaker_dataset, out, name="Narrator")
    run = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()))
    assert run.trainer.train().status == "finished"
    return config


def test_bake_exports_a_custom_voice_checkpoint_that_speaks_the_new_name(trained_speaker, tmp_path):
    checkpoint = Path(trained_speaker.output_dir) / "checkpoint-final"
    result = bake(trained_speaker, checkpoint, tmp_path / "pkg", export=tmp_path / "cv")
    assert result.name == "narrator" and result.slot == 3000

    base = load_qwen3_tts(trained_speaker.model.path)
    train = Path(trained_speaker.data.train[0])
    lines = [json.loads(line) for line in train.read_text().splitlines()]
    # One speaker vector per training line, as training used them.
    vectors = [speaker_embedding(base.model, train.parent / x["ref_audio"]) for x in lines]
    expected = np.mean(vectors, axis=0)
    np.testing.assert_allclose(result.embedding, expected, rtol=1e-5, atol=1e-6)

    package = json.loads((tmp_path / "pkg" / "voice.json").read_text())
    assert package["name"] == "narrator" and package["slot"] == 3000 and package["adapter"]
    stored = mx.load(str(tmp_path / "pkg" / package["embedding"]))["embedding"]
    np.testing.assert_allclose(np.array(stored), expected, rtol=1e-5, atol=1e-6)

    exported = load_qwen3_tts(tmp_path / "cv")
    config = json.loads((tmp_path / "cv" / "config.json").read_text())
    assert config["tts_model_type"] == "custom_voice"
    assert config["talker_config"]["spk_id"] == {**BUILTINS, "narrator": 3000}
    assert exported.model.speaker_encoder is None
    row = np.array(exported.model.talker.model.codec_embedding.weight[3000])
    np.testing.assert_allclose(row, expected, atol=2e-2 * np.abs(expected).max())
    for name in ("narrator", "Vivian", "ryan"):
        audio = list(exported.model.generate_custom_voice("Hello.", speaker=name, max_tokens=4))
        assert np.array(audio[0].audio).size > 0


def test_keep_cloning_export_serves_the_name_and_still_clones(trained_speaker, tmp_path):
    checkpoint = Path(trained_speaker.output_dir) / "checkpoint-final"
    bake(trained_speaker, checkpoint, tmp_path / "pkg", export=tmp_path / "base", keep_cloning=True)
    loaded = load_qwen3_tts(tmp_path / "base")
    assert loaded.tts_model_type == "base" and loaded.model.speaker_encoder is not None
    assert "narrator" in loaded.model.get_supported_speakers()
    named = list(loaded.model.generate("Hi.", voice="narrator", max_tokens=3))
    ref = mx.array((0.2 * np.sin(np.linspace(0, 900, 24_000))).astype(np.float32))
    cloned = list(loaded.model.generate("Hi.", ref_audio=ref, max_tokens=3))
    assert np.array(named[0].audio).size > 0 and np.array(cloned[0].audio).size > 0


def test_occupied_rows_and_bad_names_are_refused(trained_speaker, tmp_path):
    checkpoint = Path(trained_speaker.output_dir) / "checkpoint-final"
    with pytest.raises(BakeError, match="already holds speaker 'vivian'"):
        bake(trained_speaker, checkpoint, tmp_path / "p1", slot=3065)
    assert not (tmp_path / "p1").exists()
    with pytest.raises(BakeError, match="special codec token"):
        bake(trained_speaker, checkpoint, tmp_path / "p2", slot=2150)
    with pytest.raises(BakeError, match="not a speaker row"):
        bake(trained_speaker, checkpoint, tmp_path / "p3", slot=100)
    with pytest.raises(BakeError, match="must match"):
        bake(trained_speaker, checkpoint, tmp_path / "p4", name="../evil")
    forced = bake(
        trained_speaker, checkpoint, tmp_path / "p5", slot=3065, force=True, name="vivian"
    )
    assert forced.slot == 3065
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
