"""`make-tiny qwen3_tts --layout`: the official release layout and mlx-community's both load.

What each layout must hold is taken from the code that reads it: `qwen_tts` (transformers'
Mimi names for the encoder codebooks, `position_id_per_seconds`; the parity test in
tests/parity/test_qwen3_parity.py loads it there) and mlx-audio's converter (MLX names and
layout, the config's dtype, an index file, speech_tokenizer/ copied as released).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from finetune.arrays import flat_items
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts
from finetune.loading import CheckpointError

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open


@pytest.fixture(scope="module")
def mlx_community(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "qwen3_mlx_community"
    return make_tiny_qwen3_tts(out, seed=0, layout="mlx-community")


def test_official_speech_tokenizer_has_the_released_codebook_names(tiny_qwen3_base: Path):
    speech = mx.load(str(tiny_qwen3_base / "speech_tokenizer" / "model.safetensors"))
    encoder = sorted(k for k in speech if k.startswith("encoder.quantizer."))
    assert not [k for k in encoder if ".vq." in k]
    for side in ("semantic", "acoustic"):
        prefix = f"encoder.quantizer.{side}_residual_vector_quantizer.layers.0.codebook"
        assert speech[f"{prefix}.embed_sum"].shape == (2048, 64)
        assert speech[f"{prefix}.cluster_usage"].shape == (2048,)
        assert speech[f"{prefix}.initialized"].tolist() == [1.0]
    layers = {k.split(".layers.")[1].split(".")[0] for k in encoder if ".layers." in k}
    assert len(layers) == 15  # acoustic side: 15 of the 16 quantizers (semantic: 1)
    config = json.loads((tiny_qwen3_base / "config.json").read_text())
    assert config["talker_config"]["position_id_per_seconds"] == 13


def test_mlx_community_layout_is_what_the_converter_writes(mlx_community: Path):
    index = json.loads((mlx_community / "model.safetensors.index.json").read_text())
    with safe_open(str(mlx_community / "model.safetensors"), "numpy") as handle:
        assert handle.metadata() == {"format": "mlx"}
        keys = set(handle.keys())
    assert set(index["weight_map"]) == keys
    weights = mx.load(str(mlx_community / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    # MLX conv layout on disk: [out, kernel, in] (official: [out, in, kernel]).
    assert weights["speaker_encoder.blocks.0.conv.weight"].shape[1:] == (5, 128)
    text = (mlx_community / "config.json").read_text()
    config = json.loads(text)
    assert list(config) == sorted(config) and text.startswith('{\n    "')
    # The speech tokenizer is copied from the release untouched.
    speech = mx.load(str(mlx_community / "speech_tokenizer" / "model.safetensors"))
    assert "encoder.quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum" in (
        speech
    )


def test_both_layouts_load_to_the_same_model(loaded_qwen3_base, mlx_community: Path):
    other = load_qwen3_tts(mlx_community)
    ours = dict(flat_items(loaded_qwen3_base.model.parameters()))
    theirs = dict(flat_items(other.model.parameters()))
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert np.array_equal(np.array(value), np.array(theirs[key])), key


def test_every_problem_of_an_mlx_community_copy_is_reported_at_once(
    mlx_community: Path, tmp_path: Path
):
    broken = shutil.copytree(mlx_community, tmp_path / "m")
    (broken / "vocab.json").unlink()
    (broken / "merges.txt").unlink()
    file = broken / "speech_tokenizer" / "model.safetensors"
    weights = mx.load(str(file))
    for key in [k for k in weights if k.startswith("decoder.decoder.2.")]:
        del weights[key]
    mx.save_safetensors(str(file), weights)
    with pytest.raises(CheckpointError) as info:
        load_qwen3_tts(broken)
    message = str(info.value)
    assert "text tokenizer" in message and "decoder:" in message and "missing" in message


def _make_tiny(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune", "make-tiny", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_layout_flag_is_checked_per_family(tmp_path: Path):
    bad = _make_tiny("qwen3_tts", str(tmp_path / "q"), "--layout", "gguf")
    assert bad.returncode == 2 and "official, mlx-community" in bad.stderr
    assert not (tmp_path / "q").exists()
    from finetune.families import FAMILIES

    for family in [f for f in FAMILIES.values() if not f.layouts]:  # one layout: no flag
        other = _make_tiny(family.name, str(tmp_path / family.name), "--layout", "official")
        assert other.returncode == 2 and "--layout does not apply" in other.stderr
        assert not (tmp_path / family.name).exists()
