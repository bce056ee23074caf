"""Tiny Qwen3-TTS checkpoints load through mlx-audio's real path and generate."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.hf_layout import speech_tokenizer_to_hf
from finetune.families.qwen3_tts.tiny import BUILTIN_SPEAKERS, make_tiny_qwen3_tts
from finetune.loading import CheckpointError

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

REF = (0.3 * np.sin(np.linspace(0, 2400, 36_000))).astype(np.float32)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_is_the_real_one(tiny_qwen3_base: Path):
    files = set(_files(tiny_qwen3_base))
    assert {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "speech_tokenizer/config.json",
        "speech_tokenizer/preprocessor_config.json",
        "speech_tokenizer/model.safetensors",
    } <= files
    config = json.loads((tiny_qwen3_base / "config.json").read_text())
    talker = config["talker_config"]
    assert talker["vocab_size"] == 3072 and talker["num_code_groups"] == 16
    assert "spk_id" in talker and config["tts_model_type"] == "base"
    weights = mx.load(str(tiny_qwen3_base / "model.safetensors"))
    assert weights["talker.model.codec_embedding.weight"].shape[0] == 3072
    assert weights["talker.model.codec_embedding.weight"].dtype == mx.bfloat16
    assert any(k.startswith("speaker_encoder.") for k in weights)
    speech = mx.load(str(tiny_qwen3_base / "speech_tokenizer" / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in speech) and any(
        k.startswith("decoder.") for k in speech
    )
    assert any(k.endswith("_codebook.embedding_sum") for k in speech)
    # PyTorch conv layout on disk: [out, in, kernel].
    first_tdnn = weights["speaker_encoder.blocks.0.conv.weight"]
    assert first_tdnn.shape[1:] == (128, 5)


def test_mlx_audio_loads_it_offline_and_clones_from_ref_audio(tiny_qwen3_base, monkeypatch):
    from mlx_audio.tts.utils import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(tiny_qwen3_base)
    assert model.tokenizer is not None and model.speech_tokenizer is not None
    results = list(
        model.generate("Hello from a tiny model.", ref_audio=mx.array(REF), max_tokens=6)
    )
    audio = np.array(results[0].audio)
    assert audio.ndim == 1 and audio.size > 0 and np.isfinite(audio).all()


def test_codec_round_trip_through_the_speech_tokenizer(loaded_qwen3_base):
    tokenizer = loaded_qwen3_base.model.speech_tokenizer
    codes = tokenizer.encode(mx.array(REF)[None, None, :])
    assert codes.shape == (1, 16, int(np.ceil(REF.size / 1920)))
    # Randomised codebooks: frames do not all collapse onto code 0.
    assert len(np.unique(np.array(codes[0, 0]))) > 1


def test_custom_voice_variant_made_by_the_cli_speaks_builtin_speakers(tmp_path):
    out = tmp_path / "custom"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from server.cli import main; sys.exit(main())",
            "make-tiny",
            "qwen3_tts",
            str(out),
            "--variant",
            "custom_voice",
            "--seed",
            "3",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    loaded = load_qwen3_tts(out)
    model = loaded.model
    assert model.speaker_encoder is None
    assert sorted(model.get_supported_speakers()) == sorted(BUILTIN_SPEAKERS)
    results = list(model.generate_custom_voice("Good morning.", speaker="Ryan", max_tokens=5))
    assert np.array(results[0].audio).size > 0


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny_qwen3_tts(tmp_path / "a", seed=11)
    b = make_tiny_qwen3_tts(tmp_path / "b", seed=11)
    c = make_tiny_qwen3_tts(tmp_path / "c", seed=12)
    names = _files(a)
    assert names == _files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)


def test_hf_layout_is_the_exact_inverse_of_mlx_audio_sanitize():
    from finetune.families.qwen3_tts.tiny import (
        PRESETS,
        _random_parameters,
        speech_tokenizer_config,
        st_config_for_mlx,
    )

    from mlx_audio.tts.models.qwen3_tts.config import Qwen3TTSTokenizerConfig
    from mlx_audio.tts.models.qwen3_tts.speech_tokenizer import Qwen3TTSSpeechTokenizer

    cfg = Qwen3TTSTokenizerConfig(**st_config_for_mlx(speech_tokenizer_config(PRESETS["tiny"])))
    module = Qwen3TTSSpeechTokenizer(cfg)
    params = _random_parameters(module, np.random.default_rng(0))
    for key in [k for k in params if k.endswith(".codebook.embed.weight")]:
        params[key[: -len("embed.weight")] + "cluster_usage"] = np.full(
            params[key].shape[:1], 1.5, np.float32
        )
    hf = {k: mx.array(v) for k, v in speech_tokenizer_to_hf(params).items()}
    back = Qwen3TTSSpeechTokenizer.sanitize(hf)
    expected = {
        k for k, _ in tree_flatten(module.parameters()) if not k.endswith("codebook.initialized")
    }
    assert set(back) == expected
    for key in expected:
        np.testing.assert_allclose(np.array(back[key]), params[key], rtol=1e-5, atol=1e-6)


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_speech_tokenizer_weights_fail_loudly(tiny_qwen3_base, tmp_path):
    broken = _broken_copy(tiny_qwen3_base, tmp_path / "m")
    (broken / "speech_tokenizer" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"speech_tokenizer/ holds no \.safetensors"):
        load_qwen3_tts(broken)


def test_unloadable_speech_tokenizer_config_fails_loudly_where_mlx_audio_only_warns(
    tiny_qwen3_base, tmp_path, capsys
):
    from mlx_audio.tts.utils import load_model

    broken = _broken_copy(tiny_qwen3_base, tmp_path / "m")
    (broken / "speech_tokenizer" / "config.json").write_text("{not json")
    model = load_model(broken)  # mlx-audio: a printed warning, and no speech tokenizer
    assert model.speech_tokenizer is None
    assert "Could not load speech tokenizer" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="speech tokenizer did not load"):
        load_qwen3_tts(broken)


def test_partial_speech_tokenizer_weights_are_reported(tiny_qwen3_base, tmp_path):
    broken = _broken_copy(tiny_qwen3_base, tmp_path / "m")
    file = broken / "speech_tokenizer" / "model.safetensors"
    weights = mx.load(str(file))
    dropped = sorted(k for k in weights if k.startswith("decoder.decoder.2."))
    for key in dropped:
        del weights[key]
    mx.save_safetensors(str(file), weights)
    with pytest.raises(CheckpointError, match=r"decoder: .* weights missing"):
        load_qwen3_tts(broken)


def test_missing_text_tokenizer_fails_loudly(tiny_qwen3_base, tmp_path):
    broken = _broken_copy(tiny_qwen3_base, tmp_path / "m")
    (broken / "vocab.json").unlink()
    (broken / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="text tokenizer"):
        load_qwen3_tts(broken)


def test_unknown_directory_and_hub_id_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_qwen3_tts(tmp_path / "nope")
    os.environ.setdefault("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="local hub cache"):
        load_qwen3_tts("Qwen/Qwen3-TTS-12Hz-0.6B-Base")


def test_loaded_model_runs_fp32_with_fast_modules(loaded_qwen3_base):
    assert loaded_qwen3_base.runtime.fast_cpu is True
    assert loaded_qwen3_base.runtime.swapped.get("FastConvTranspose1d", 0) > 0
    dtypes = {v.dtype for _, v in tree_flatten(loaded_qwen3_base.model.parameters())}
    assert mx.bfloat16 not in dtypes
