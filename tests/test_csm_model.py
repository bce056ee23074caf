"""Tiny CSM: real layout, loading through mlx-audio's path offline, generation wrapper."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.families.csm.checkpoint import LoadedCsm, load_csm
from finetune.families.csm.generate import (
    ContextClip,
    GenerationError,
    generate_codes,
    stream_audio,
    synthesize,
)
from finetune.families.csm.mimi import MIMI_DIR, MIMI_FILENAME, load_mimi, mimi_config
from finetune.families.csm.tiny import PRESETS, make_tiny_csm
from finetune.loading import CheckpointError

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


def test_tiny_checkpoint_has_the_real_layout(tiny_csm: Path) -> None:
    names = {p.relative_to(tiny_csm).as_posix() for p in tiny_csm.rglob("*") if p.is_file()}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        f"{MIMI_DIR}/config.json",
        f"{MIMI_DIR}/{MIMI_FILENAME}",
    }
    config = json.loads((tiny_csm / "config.json").read_text())
    assert config["model_type"] == "csm"
    assert config["audio_vocab_size"] == config["vocab_size"] == 2051
    assert config["text_vocab_size"] == 128256
    assert config["audio_num_codebooks"] == config["depth_decoder_config"]["num_codebooks"] == 8
    weights = mx.load(str(tiny_csm / "model.safetensors"))
    assert "model.backbone.layers.0.self_attn.q_proj.weight" in weights
    assert "model.decoder.layers.1.mlp.down_proj.weight" in weights
    assert weights["model.audio_head"].shape == (7, 48, 2051)
    assert weights["model.audio_embeddings.weight"].shape == (2051 * 8, 64)
    assert weights["model.text_embeddings.weight"].shape == (128256, 64)
    mimi = mx.load(str(tiny_csm / MIMI_DIR / MIMI_FILENAME))
    # PyTorch names and conv layout, as in Kyutai's file.
    assert mimi["encoder.model.0.conv.conv.weight"].shape == (8, 1, 7)
    assert "quantizer.rvq_rest.vq.layers.6._codebook.embedding_sum" in mimi


def test_same_seed_writes_the_same_bytes(tiny_csm: Path, tmp_path: Path) -> None:
    again = make_tiny_csm(tmp_path / "again", seed=0)
    for file in sorted(p for p in tiny_csm.rglob("*") if p.is_file()):
        assert (again / file.relative_to(tiny_csm)).read_bytes() == file.read_bytes(), file.name


def test_mimi_file_round_trips_through_mlx_audio_loader(tmp_path: Path) -> None:
    from finetune.families.csm.mimi import config_to_dict, to_pytorch_layout
    from finetune.families.csm.tiny import _random_parameters, _save

    from mlx_audio.codec.models.mimi.mimi import Mimi

    cfg = mimi_config(num_codebooks=4, **PRESETS["tiny"].mimi)
    values = _random_parameters(Mimi(cfg), np.random.default_rng(5))
    (tmp_path / MIMI_DIR).mkdir()
    (tmp_path / MIMI_DIR / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    _save(tmp_path / MIMI_DIR / MIMI_FILENAME, to_pytorch_layout(values), mx.float32)
    mimi, problems = load_mimi(tmp_path, 4)
    assert problems == []
    loaded = dict(tree_flatten(mimi.parameters()))
    assert set(loaded) == set(values)
    for key, value in values.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)
    _, problems = load_mimi(tmp_path, 8)
    assert "Mimi has 4 codebooks, audio_num_codebooks is 8" in problems[0]


def test_loads_through_the_real_path_without_the_hub(
    tiny_csm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from mlx_audio.codec.models.mimi import mimi as mimi_module
    from mlx_audio.tts.models.sesame import sesame

    calls: list[str] = []

    def no_hub(*args: object, **kwargs: object) -> None:
        calls.append(str(args))
        raise AssertionError(f"hub access: {args}")

    for module in (huggingface_hub, sesame, mimi_module):
        monkeypatch.setattr(module, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(sesame.Mimi, "from_pretrained", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    loaded = load_csm(tiny_csm)
    assert calls == []
    assert isinstance(loaded.model, sesame.Model)
    assert loaded.model._audio_tokenizer is loaded.mimi
    assert loaded.model.sample_rate == loaded.sample_rate == 24000
    assert loaded.num_codebooks == 8
    assert loaded.tokenizer.encode("[0]Hi.")[0] == 128000
    assert loaded.tokenizer.encode("[0]Hi.")[-1] == 128001
    params = dict(tree_flatten(loaded.model.parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    assert not any(k.startswith("_") for k in params)  # the codec is not a model parameter
    # The patched names are restored and the environment is left as it was.
    assert sesame.Mimi.__name__ == "Mimi"
    assert sesame.AutoTokenizer.__name__ == "AutoTokenizer"
    import os

    assert "HF_HUB_OFFLINE" not in os.environ


def _rewrite_weights(path: Path, change) -> None:
    weights = dict(mx.load(str(path)))
    change(weights)
    mx.save_safetensors(str(path), weights)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / MIMI_DIR / MIMI_FILENAME).unlink(), [f"{MIMI_FILENAME} is missing"]),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), ["is unreadable"]),
        (lambda d: (d / "tokenizer.json").unlink(), ["has no tokenizer.json"]),
        (lambda d: (d / "config.json").write_text("{"), ["not valid JSON"]),
        (
            lambda d: _rewrite_weights(
                d / "model.safetensors",
                lambda w: (
                    w.pop("model.projection.weight"),
                    w.__setitem__("model.codebook0_head.weight", mx.zeros((2051, 32))),
                ),
            ),
            ["1 weights missing, e.g. model.projection.weight", "codebook0_head.weight has shape"],
        ),
    ],
    ids=["no-mimi", "corrupt-weights", "no-tokenizer", "bad-config", "missing-and-misshaped"],
)
def test_broken_checkpoints_raise_checkpoint_error(
    tiny_csm: Path, tmp_path: Path, damage, expected: list[str]
) -> None:
    broken = Path(shutil.copytree(tiny_csm, tmp_path / "broken"))
    damage(broken)
    with pytest.raises(CheckpointError) as info:
        load_csm(broken)
    for text in expected:
        assert any(text in problem for problem in info.value.problems), info.value.problems


def test_synthesize_gives_deterministic_float32_frames(loaded_csm: LoadedCsm) -> None:
    audio = synthesize(loaded_csm, "Hello there.", speaker=0, seed=3, max_audio_frames=6)
    assert audio.dtype == np.float32
    assert audio.ndim == 1 and len(audio) > 0 and len(audio) % 1920 == 0
    assert np.isfinite(audio).all()
    again = synthesize(loaded_csm, "Hello there.", speaker=0, seed=3, max_audio_frames=6)
    np.testing.assert_array_equal(audio, again)
    other_seed = synthesize(loaded_csm, "Hello there.", speaker=0, seed=4, max_audio_frames=6)
    assert not np.array_equal(audio, other_seed)


def test_speaker_and_context_change_the_codes(loaded_csm: LoadedCsm) -> None:
    base = generate_codes(loaded_csm, "Good morning.", speaker=0, seed=1, max_audio_frames=4)
    assert base.shape == (4, 8) and base.dtype == np.int32
    assert base.max() < 2048  # only real Mimi codes are sampled
    other = generate_codes(loaded_csm, "Good morning.", speaker=1, seed=1, max_audio_frames=4)
    assert not np.array_equal(base, other)
    context = [ContextClip(text="Earlier words.", speaker=0, codes=base[:3])]
    with_context = generate_codes(
        loaded_csm, "Good morning.", speaker=0, seed=1, max_audio_frames=4, context=context
    )
    assert not np.array_equal(base, with_context)
    # Context given as audio goes through the model's own Mimi encoder.
    audio = synthesize(loaded_csm, "Earlier words.", speaker=0, seed=2, max_audio_frames=3)
    from_audio = [ContextClip(text="Earlier words.", speaker=0, audio=audio)]
    codes = generate_codes(
        loaded_csm, "Good morning.", speaker=0, seed=1, max_audio_frames=4, context=from_audio
    )
    assert codes.shape == (4, 8) and not np.array_equal(codes, base)


def test_streaming_matches_one_shot(loaded_csm: LoadedCsm) -> None:
    whole = synthesize(loaded_csm, "Stream me.", speaker=2, seed=9, max_audio_frames=5)
    chunks = list(
        stream_audio(
            loaded_csm, "Stream me.", speaker=2, seed=9, max_audio_frames=5, chunk_frames=2
        )
    )
    assert [len(c) for c in chunks] == [3840, 3840, 1920]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "  "}, "text is empty"),
        ({"speaker": -1}, "non-negative"),
        ({"max_audio_frames": 0}, "max_audio_frames"),
        ({"max_audio_frames": 5000}, "window"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_requests_raise_generation_error(
    loaded_csm: LoadedCsm, kwargs: dict, message: str
) -> None:
    args = {"text": "Hi.", "speaker": 0, "seed": 0, "max_audio_frames": 2, **kwargs}
    text = args.pop("text")
    with pytest.raises(GenerationError, match=message):
        generate_codes(loaded_csm, text, **args)
