"""Tiny PersonaPlex checkpoints: the real layout, byte-stable builds, loud loading, Mimi."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
from finetune.families import family_entry
from finetune.families.personaplex.checkpoint import (
    load_personaplex,
    read_personaplex_config,
    safetensors_header,
)
from finetune.families.personaplex.forward import depformer_logits
from finetune.families.personaplex.kyutai_mimi import kyutai_mimi_config, mimi_section_from_kyutai
from finetune.families.personaplex.layout import (
    MIMI_CONFIG_NAME,
    MIMI_NAME,
    MOSHI_NAME,
    PERSONAPLEX_7B_LM,
    PERSONAPLEX_DELAYS,
    TEXT_TOKENIZER_NAME,
)
from finetune.families.personaplex.mimi_stream import MimiStreamer
from finetune.families.personaplex.tiny import make_tiny_personaplex
from finetune.loading import CheckpointError

import mlx.core as mx
import numpy as np
import pytest


def test_tiny_checkpoint_has_the_real_files_and_key_names(tiny_personaplex: Path) -> None:
    for name in (MOSHI_NAME, MIMI_NAME, TEXT_TOKENIZER_NAME, "config.json"):
        assert (tiny_personaplex / name).is_file(), name
    lm = safetensors_header(tiny_personaplex / MOSHI_NAME)
    dim = 64
    expected = {
        "out_norm.alpha": (1, 1, dim),
        "text_emb.weight": (32001, dim),
        "text_linear.weight": (32000, dim),
        "emb.0.weight": (2049, dim),
        "emb.15.weight": (2049, dim),
        "transformer.layers.1.self_attn.in_proj_weight": (3 * dim, dim),
        "transformer.layers.1.norm1.alpha": (1, 1, dim),
        "depformer_text_emb.weight": (32001, 64),
        "depformer_emb.14.weight": (2049, 64),
        "depformer_in.15.weight": (64, dim),
        "linears.15.weight": (2048, 64),
        "depformer.layers.0.self_attn.in_proj_weight": (16 * 3 * 64, 64),
        "depformer.layers.0.gating.15.linear_in.weight": (2 * 176, 64),
    }
    for key, shape in expected.items():
        assert lm[key] == ("BF16", shape), key
    assert not any(k.startswith(("audio_embs.", "depformer.slices.")) for k in lm)
    mimi = safetensors_header(tiny_personaplex / MIMI_NAME)
    for key in (
        "encoder.model.0.conv.conv.weight",
        "decoder.model.2.convtr.convtr.weight",
        "quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum",
        "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight",
        "upsample.convtr.convtr.convtr.weight",
    ):
        assert mimi[key][0] == "F32", key
    config = json.loads((tiny_personaplex / "config.json").read_text())
    assert config["dep_q"] == 16 and config["n_q"] == 16
    assert config["delays"] == PERSONAPLEX_DELAYS
    assert config["text_card"] == 32000 and config["card"] == 2048


def test_same_seed_gives_identical_bytes(tiny_personaplex: Path, tmp_path: Path) -> None:
    again = make_tiny_personaplex(tmp_path / "again", seed=0)
    names = sorted(p.name for p in tiny_personaplex.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_personaplex / name).read_bytes() == (again / name).read_bytes(), name


def test_loads_through_the_real_path(loaded_personaplex) -> None:
    lm, cfg = loaded_personaplex.lm, loaded_personaplex.lm_config
    assert cfg.depformer.num_slices == 16 and cfg.audio_codebooks == 16
    assert cfg.text_out_vocab_size == 32000 and cfg.audio_vocab_size == 2049
    assert lm.text_linear.weight.dtype == mx.float32
    assert not lm.training
    mimi = loaded_personaplex.mimi
    assert mimi.quantizer._nq == 8 and len(mimi.quantizer.rvq_rest.vq.layers) == 7
    tokenizer = loaded_personaplex.text_tokenizer
    assert tokenizer.id_to_piece(3) == "<pad>" and tokenizer.id_to_piece(0) == "<unk>"
    assert tokenizer.get_piece_size() < cfg.text_out_vocab_size


def test_directory_without_config_means_the_real_7b(tmp_path: Path) -> None:
    config, problems = read_personaplex_config(tmp_path)
    assert problems == []
    assert (config["dim"], config["num_layers"], config["num_heads"]) == (4096, 32, 32)
    assert (config["depformer_dim"], config["depformer_num_layers"], config["dep_q"]) == (
        1024,
        6,
        16,
    )
    with pytest.raises(CheckpointError) as err:
        load_personaplex(tmp_path)
    text = str(err.value)
    for name in (MOSHI_NAME, MIMI_NAME, TEXT_TOKENIZER_NAME):
        assert f"{name} is missing" in text


def test_broken_checkpoint_lists_every_problem(tiny_personaplex: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_personaplex, broken)
    weights = mx.load(str(broken / MOSHI_NAME))
    del weights["emb.3.weight"]
    weights["text_linear.weight"] = weights["text_linear.weight"][:100]
    weights["bogus.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(broken / MOSHI_NAME), weights, metadata={"format": "pt"})
    (broken / MIMI_NAME).write_bytes((broken / MIMI_NAME).read_bytes()[:100])
    (broken / TEXT_TOKENIZER_NAME).write_bytes(b"not a sentencepiece model")

    with pytest.raises(CheckpointError) as err:
        load_personaplex(broken)
    problems = err.value.problems
    text = "\n".join(problems)
    assert "1 tensors missing: emb.3.weight" in text
    assert "1 unexpected tensors: bogus.weight" in text
    assert "text_linear.weight has shape (100, 64), expected (32000, 64)" in text
    assert f"{MIMI_NAME} is not a readable safetensors file" in text
    assert f"{TEXT_TOKENIZER_NAME} is not a readable SentencePiece model" in text
    assert len(problems) == 5


def test_wrong_mimi_shapes_are_reported(tiny_personaplex: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mimi"
    shutil.copytree(tiny_personaplex, broken)
    weights = mx.load(str(broken / MIMI_NAME))
    key = "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"
    weights[key] = weights[key][:, :8]
    mx.save_safetensors(str(broken / MIMI_NAME), weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"embedding_sum has shape \(2048, 8\)"):
        load_personaplex(broken)


def test_mimi_streams_codes_and_1920_sample_frames(loaded_personaplex) -> None:
    streamer = MimiStreamer(loaded_personaplex.mimi)
    encoder, decoder = streamer.new_encoder(), streamer.new_decoder()
    rng = np.random.default_rng(0)
    codes = []
    for _ in range(4):
        frame = mx.array(rng.normal(0.0, 0.3, 1920).astype(np.float32))
        step_codes = streamer.encode(encoder, frame)
        assert step_codes.shape == (1, 8, 1)
        codes.append(np.array(step_codes)[0, :, 0])
        pcm = streamer.decode(decoder, step_codes[0])
        assert pcm.shape == (1920,) and pcm.dtype == mx.float32
        assert np.isfinite(np.array(pcm)).all()
    stacked = np.stack(codes)
    assert stacked.max() > 0 and len(np.unique(stacked)) > 8
    assert ((stacked >= 0) & (stacked < 2048)).all()


def test_family_entry_builds_only_known_presets(tmp_path: Path) -> None:
    entry = family_entry("personaplex")
    assert entry.PRESETS == ("tiny", "width", "real-7b")
    with pytest.raises(ValueError, match="preset must be one of"):
        entry.make_tiny(tmp_path / "x", seed=0, preset="huge")


# Keys Kyutai's `CheckpointInfo.from_hf_repo` pops from config.json; every other key goes to
# `LMModel(**kwargs)`, whose transformer refuses names it does not know (moshi 0.2.13).
KYUTAI_LOADER_KEYS = {
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
}


def test_config_holds_only_keys_kyutais_loader_takes(tiny_personaplex: Path) -> None:
    """Our own `mimi` / `preset` keys made Kyutai's LMModel raise TypeError (the parity test
    loads the directory in `moshi` itself); the Mimi sizes live in Kyutai's `mimi_config.json`."""
    config = json.loads((tiny_personaplex / "config.json").read_text())
    lm_keys = set(PERSONAPLEX_7B_LM)
    assert set(config) - lm_keys - KYUTAI_LOADER_KEYS == set()
    assert config["mimi_config_name"] == MIMI_CONFIG_NAME
    assert config["model_id"] == {"preset": "tiny"}
    kyutai = json.loads((tiny_personaplex / MIMI_CONFIG_NAME).read_text())
    assert kyutai["seanet"]["n_filters"] == 16 and kyutai["quantizer"]["n_q"] == 32
    assert mimi_section_from_kyutai(kyutai) == mimi_section_from_kyutai(
        kyutai_mimi_config(mimi_section_from_kyutai(kyutai))
    )


def test_directory_with_our_older_mimi_section_still_loads(
    tiny_personaplex: Path, tmp_path: Path
) -> None:
    older = tmp_path / "older"
    shutil.copytree(tiny_personaplex, older)
    config = json.loads((older / "config.json").read_text())
    config["mimi"] = mimi_section_from_kyutai(json.loads((older / MIMI_CONFIG_NAME).read_text()))
    del config["mimi_config_name"]
    (older / "config.json").write_text(json.dumps(config))
    (older / MIMI_CONFIG_NAME).unlink()
    loaded = load_personaplex(older)
    assert loaded.mimi.cfg.seanet.nfilters == 16 and loaded.mimi.quantizer._nq == 8


def test_mimi_config_the_codec_cannot_follow_is_reported(
    tiny_personaplex: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "kyutai"
    shutil.copytree(tiny_personaplex, broken)
    kyutai = json.loads((broken / MIMI_CONFIG_NAME).read_text())
    kyutai["transformer"]["gating"] = "silu"
    del kyutai["seanet"]["ratios"]
    (broken / MIMI_CONFIG_NAME).write_text(json.dumps(kyutai))
    with pytest.raises(CheckpointError) as err:
        load_personaplex(broken)
    text = str(err.value)
    assert "transformer.gating is 'silu'" in text and "seanet.ratios is missing" in text
    (broken / MIMI_CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"{MIMI_CONFIG_NAME} is missing"):
        load_personaplex(broken)


def test_last_depformer_slice_sees_the_first_slices(loaded_personaplex) -> None:
    """Kyutai's LMModel ignores `depformer_context` (8): slice 15 attends to slices 0..15.
    mlx-audio's attention would keep only the last 8 keys, so with one depformer layer slice 15
    could not see slice 1's token at all."""
    lm = loaded_personaplex.lm
    assert lm.cfg.depformer.transformer.context == 16
    rng = np.random.default_rng(0)
    temporal = mx.array(rng.normal(0, 1, (1, 1, lm.cfg.transformer.d_model)).astype(np.float32))
    targets = rng.integers(0, 2048, (1, 17, 1)).astype(np.int32)
    changed = targets.copy()
    changed[0, 1, 0] = (targets[0, 1, 0] + 1) % 2048
    base = depformer_logits(lm, temporal, mx.array(targets), 16)[0, 15]
    other = depformer_logits(lm, temporal, mx.array(changed), 16)[0, 15]
    assert float(mx.abs(base - other).max()) > 1e-3
