"""`bake` and `--export`: the language and the embedding training used, fusing by default,
new-language rows in exports, and re-baking an export that already holds baked speakers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.cli import main
from finetune.config import DataSection, ModelSection, SpeakerSection, TrainConfig
from finetune.data import synthetic_dataset
from finetune.families.qwen3_tts.bake import BakeError, bake
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.families.qwen3_tts.tiny import BUILTIN_SPEAKERS, CODEC_LANGUAGES, DIALECT_SPEAKERS
from finetune.families.qwen3_tts.training import speaker_embedding
from finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    apply_lora,
    lora_state,
    save_adapters,
)

import mlx.core as mx
import msgspec
import numpy as np
import pytest
import yaml
from mlx.utils import tree_unflatten

TARGETS = [r"model\.layers\.\d+\.self_attn\.(q|v)_proj"]
HINDI_ROW = 3040
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _adapter(model_path: Path, out: Path, *, seed: int, languages: dict[str, int] | None = None):
    """A hand-made speaker adapter (random non-zero LoRA) in the layout training writes, with
    new-language rows as the trainer stores them when `languages` is given."""
    talker = load_qwen3_tts(model_path).model.talker
    mx.random.seed(seed)
    lcfg = LoRAConfig(rank=2, alpha=4.0, targets=TARGETS)
    apply_lora(talker, lcfg)
    rng = np.random.default_rng(seed)
    randomised = [
        (k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
        for k, v in lora_state(talker).items()
    ]
    talker.update(tree_unflatten(randomised))
    meta = {"family": "qwen3_tts", "module": "talker", "strategy": "speaker"}
    save_adapters(out, talker, lcfg, meta)
    if languages:
        width = talker.model.codec_embedding.weight.shape[1]
        vectors = rng.normal(0, 0.5, (len(languages), width)).astype(np.float32)
        weights = dict(mx.load(str(out / ADAPTER_WEIGHTS)))
        weights["language_rows.weight"] = mx.array(vectors)
        mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        cfg = json.loads((out / ADAPTER_CONFIG).read_text())
        cfg["language_rows"] = [{"name": n, "row": r} for n, r in languages.items()]
        cfg["trained_tensors"] = ["language_rows.weight"]
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return out


def _lines(path: Path, clips: Path, rows: list[tuple[str, str, str | None]]) -> Path:
    """A train.jsonl of (audio, ref_audio, language) rows over the wav files in `clips`."""
    lines = []
    for audio, ref, language in rows:
        line = {"audio": str(clips / audio), "text": "Hello there.", "ref_audio": str(clips / ref)}
        if language is not None:
            line["language"] = language
        lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(model: Path, train: Path, *, name: str = "narrator", slot: int = 3000):
    return TrainConfig(
        model=ModelSection(path=str(model), strategy="speaker"),
        data=DataSection(train=[str(train)]),
        speaker=SpeakerSection(name=name, slot=slot),
        output_dir=str(train.parent / "run"),
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """clip_000..003.wav, val_000..001.wav and ref.wav."""
    return synthetic_dataset(tmp_path_factory.mktemp("bake_clips"), 4, seed=7, with_ref=True).parent


@pytest.fixture(scope="module")
def base(tiny_qwen3_base, tmp_path_factory) -> Path:
    """A Base checkpoint that names the custom-voice variant's built-in speakers (dialects too)."""
    path = tmp_path_factory.mktemp("bake_base") / "base"
    shutil.copytree(tiny_qwen3_base, path)
    config = json.loads((path / "config.json").read_text())
    config["talker_config"]["spk_id"] = dict(BUILTIN_SPEAKERS)
    config["talker_config"]["spk_is_dialect"] = {
        n: DIALECT_SPEAKERS.get(n, False) for n in BUILTIN_SPEAKERS
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return _adapter(base, tmp_path_factory.mktemp("bake_adapter") / "a", seed=1)


def test_baked_embedding_is_the_mean_over_the_training_lines(
    base, adapter, clips, loaded_qwen3_base, tmp_path
):
    rows = [(f"clip_{i:03d}.wav", "ref.wav", "english") for i in range(3)]
    train = _lines(
        clips / "unbalanced.jsonl", clips, [*rows, ("clip_003.wav", "val_000.wav", "english")]
    )
    result = bake(_config(base, train), adapter, tmp_path / "pkg")

    first = speaker_embedding(loaded_qwen3_base.model, clips / "ref.wav")
    second = speaker_embedding(loaded_qwen3_base.model, clips / "val_000.wav")
    per_line = (3 * first + second) / 4
    per_file = (first + second) / 2
    assert np.abs(per_line - per_file).max() > 1e-3 * np.abs(per_line).max()
    np.testing.assert_allclose(result.embedding, per_line, rtol=1e-5, atol=1e-6)
    stored = mx.load(str(tmp_path / "pkg" / "speaker_embedding.safetensors"))["embedding"]
    np.testing.assert_allclose(np.array(stored), per_line, rtol=1e-5, atol=1e-6)


def test_bake_records_the_language_training_used(base, adapter, clips, tmp_path):
    def baked_language(rows, **kwargs) -> str | None:
        train = _lines(tmp_path / "train.jsonl", clips, rows)
        out = tmp_path / f"pkg{len(list(tmp_path.iterdir()))}"
        result = bake(_config(base, train), adapter, out, **kwargs)
        assert json.loads((out / "voice.json").read_text())["language"] == result.language
        return result.language

    english = [(f"clip_{i:03d}.wav", "ref.wav", "English") for i in range(2)]
    assert baked_language(english) == "english"
    assert baked_language([(a, r, None) for a, r, _ in english]) is None

    mixed = [english[0], ("clip_002.wav", "ref.wav", "german")]
    with pytest.raises(BakeError, match=r"mix languages \(english, german\).*--language"):
        baked_language(mixed)
    assert baked_language(mixed, language="German") == "german"
    with pytest.raises(BakeError, match="no training line is in it"):
        baked_language(mixed, language="hindi")


def test_no_fuse_must_be_explicit_and_never_claims_a_custom_voice(base, adapter, clips, tmp_path):
    train = _lines(tmp_path / "t.jsonl", clips, [("clip_000.wav", "ref.wav", "english")])
    config = _config(base, train)
    with pytest.raises(BakeError, match="--no-fuse would export a custom_voice checkpoint"):
        bake(config, adapter, tmp_path / "pkg", export=tmp_path / "cv", fuse=False)
    with pytest.raises(BakeError, match="--no-fuse describes an exported checkpoint"):
        bake(config, adapter, tmp_path / "pkg", fuse=False)
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "cv").exists()

    bake(config, adapter, tmp_path / "p1", export=tmp_path / "kept", fuse=False, keep_cloning=True)
    bake(config, adapter, tmp_path / "p2", export=tmp_path / "fused", keep_cloning=True)
    base_q = _q_proj(load_qwen3_tts(base).model)
    kept = load_qwen3_tts(tmp_path / "kept")
    assert kept.tts_model_type == "base" and "narrator" in kept.model.get_supported_speakers()
    np.testing.assert_array_equal(_q_proj(kept.model), base_q)
    fused = _q_proj(load_qwen3_tts(tmp_path / "fused").model)
    expected = base_q + _delta(adapter)
    np.testing.assert_allclose(fused, expected, atol=_bf16_step(expected))
    assert np.abs(_delta(adapter)).max() > 20 * _bf16_step(base_q)


def _q_proj(model) -> np.ndarray:
    return np.array(model.talker.model.layers[0].self_attn.q_proj.weight.astype(mx.float32))


def _delta(adapter_dir: Path) -> np.ndarray:
    weights = mx.load(str(adapter_dir / ADAPTER_WEIGHTS))
    lora = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["lora"]
    a = np.array(weights[f"{Q_PROJ}.lora_a"].astype(mx.float32))
    b = np.array(weights[f"{Q_PROJ}.lora_b"].astype(mx.float32))
    return (lora["alpha"] / lora["rank"]) * (a @ b).T


def _bf16_step(values: np.ndarray) -> float:
    return float(np.abs(values).max()) * 2.0**-7


def _rows(model, rows: list[int]) -> np.ndarray:
    weight = model.talker.model.codec_embedding.weight
    return np.array(weight[mx.array(rows)].astype(mx.float32))


def test_export_reimport_keeps_speakers_and_generates_in_the_new_language(
    base, adapter, clips, tmp_path, monkeypatch
):
    english = [(f"clip_{i:03d}.wav", "ref.wav", "english") for i in range(2)]
    first_cfg = _config(base, _lines(tmp_path / "first.jsonl", clips, english), name="First")
    bake(first_cfg, adapter, tmp_path / "first", export=tmp_path / "exp1", keep_cloning=True)

    # Re-import: the Base export (built-ins + "first") is the base of the next voice, whose
    # adapter trained a language the checkpoint had no id for.
    hindi_adapter = _adapter(tmp_path / "exp1", tmp_path / "hi", seed=2, languages={"hindi": 3040})
    hindi = [(a, r, "hindi") for a, r, _ in english]
    second_cfg = _config(
        tmp_path / "exp1", _lines(tmp_path / "hi.jsonl", clips, hindi), name="second"
    )
    with pytest.raises(BakeError, match="already holds speaker 'first'"):
        bake(second_cfg, hindi_adapter, tmp_path / "x")
    with pytest.raises(BakeError, match="'hindi' at row 3040: the speaker is baked into"):
        bake(second_cfg, hindi_adapter, tmp_path / "x", slot=HINDI_ROW)
    result = bake(second_cfg, hindi_adapter, tmp_path / "second", slot=3001, export=tmp_path / "cv")
    assert result.language == "hindi"
    assert json.loads((tmp_path / "second" / "voice.json").read_text())["language"] == "hindi"

    exp1 = load_qwen3_tts(tmp_path / "exp1").model
    exported = load_qwen3_tts(tmp_path / "cv")  # mlx-audio's own loader underneath
    model = exported.model
    talker = exported.config["talker_config"]
    assert exported.tts_model_type == "custom_voice" and model.speaker_encoder is None
    assert talker["codec_language_id"] == {**CODEC_LANGUAGES, "hindi": HINDI_ROW}
    assert model.config.talker_config.codec_language_id["hindi"] == HINDI_ROW
    assert "hindi" in model.get_supported_languages()
    assert talker["spk_id"] == {**BUILTIN_SPEAKERS, "first": 3000, "second": 3001}
    assert talker["spk_is_dialect"]["dylan"] == "beijing_dialect"

    trained = np.array(mx.load(str(hindi_adapter / ADAPTER_WEIGHTS))["language_rows.weight"][0])
    row = _rows(model, [HINDI_ROW])[0]
    np.testing.assert_allclose(row, trained, atol=_bf16_step(trained))
    kept = [*BUILTIN_SPEAKERS.values(), 3000, *CODEC_LANGUAGES.values()]
    np.testing.assert_array_equal(_rows(model, kept), _rows(exp1, kept))
    np.testing.assert_allclose(
        _rows(model, [3001])[0], result.embedding, atol=_bf16_step(result.embedding)
    )
    expected = _q_proj(exp1) + _delta(hindi_adapter)
    np.testing.assert_allclose(_q_proj(model), expected, atol=_bf16_step(expected))

    prepared = []
    original = model._prepare_generation_inputs

    def spy(*args, **kwargs):
        prepared.append((kwargs, original(*args, **kwargs)))
        return prepared[-1][1]

    monkeypatch.setattr(model, "_prepare_generation_inputs", spy)
    audio = list(
        model.generate("Namaste.", voice="second", lang_code="hindi", temperature=0, max_tokens=4)
    )
    assert np.array(audio[0].audio).size > 0
    kwargs, (embeds, _, tts_pad) = prepared[0]
    assert kwargs["language"] == "hindi" and kwargs["speaker"] == "second"
    # role (3) + [think, think_bos, LANG, think_eos, speaker, pad] each over tts_pad
    table = model.talker.get_input_embeddings()
    for position, codec_row in ((5, HINDI_ROW), (7, 3001)):
        expected = tts_pad[0, 0] + table(mx.array([codec_row]))[0]
        np.testing.assert_allclose(
            np.array(embeds[0, position].astype(mx.float32)),
            np.array(expected.astype(mx.float32)),
            atol=1e-6,
        )
    for name in ("vivian", "dylan", "first"):
        out = list(model.generate("Hi.", voice=name, temperature=0, max_tokens=2))
        assert np.array(out[0].audio).size > 0


def test_language_rows_that_collide_are_refused(base, clips, tmp_path):
    train = _lines(tmp_path / "t.jsonl", clips, [("clip_000.wav", "ref.wav", "hindi")])
    config = _config(base, train)
    bad = _adapter(
        base, tmp_path / "bad", seed=3, languages={"hindi": 3065, "tamil": 2150, "english": 3041}
    )
    with pytest.raises(BakeError) as caught:
        bake(config, bad, tmp_path / "pkg", export=tmp_path / "cv")
    message = str(caught.value)
    assert "'hindi' at row 3065: the row holds speaker 'vivian'" in message
    assert "'tamil' at row 2150: the row holds a special codec token" in message
    assert "'english' at row 3041: the model already has it at row 2050" in message
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "cv").exists()


def test_bake_command_fuses_by_default_and_takes_the_language(
    base, adapter, clips, tmp_path, capsys
):
    mixed = [("clip_000.wav", "ref.wav", "english"), ("clip_001.wav", "ref.wav", "german")]
    config = _config(base, _lines(tmp_path / "t.jsonl", clips, mixed))
    config_file = tmp_path / "speaker.yaml"
    config_file.write_text(yaml.safe_dump(msgspec.to_builtins(config)))
    common = ["bake", "--config", str(config_file), "--checkpoint", str(adapter)]

    def vf(*args: str) -> tuple[int, str, str]:
        status = main([*common, *args])
        out, err = capsys.readouterr()
        return status, out, err

    status, _, err = vf(
        "--output", str(tmp_path / "p"), "--export", str(tmp_path / "e"), "--no-fuse"
    )
    assert status == 2 and "error: --no-fuse would export a custom_voice checkpoint" in err
    status, _, err = vf("--output", str(tmp_path / "p"))
    assert status == 2 and "mix languages" in err and "--language" in err
    with pytest.raises(SystemExit):
        vf("--output", str(tmp_path / "p"), "--no-fuse", "--fuse-lora")
    assert "not allowed with" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()

    status, out, err = vf("--output", str(tmp_path / "pkg"), "--language", "German", "--fuse-lora")
    assert status == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["language"] == "german" and report["export"] is None
    assert json.loads((tmp_path / "pkg" / "voice.json").read_text())["language"] == "german"


def test_fuse_command_writes_new_language_rows(base, tmp_path, capsys):
    rows = {"hindi": HINDI_ROW, "tamil": HINDI_ROW + 1}
    adapter = _adapter(base, tmp_path / "lang", seed=4, languages=rows)
    status = main(
        ["fuse", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "f")]
    )
    assert status == 0, capsys.readouterr().err
    fused = load_qwen3_tts(tmp_path / "f")
    assert fused.config["talker_config"]["codec_language_id"] == {**CODEC_LANGUAGES, **rows}
    trained = np.array(mx.load(str(adapter / ADAPTER_WEIGHTS))["language_rows.weight"])
    np.testing.assert_allclose(
        _rows(fused.model, list(rows.values())), trained, atol=_bf16_step(trained)
    )
    expected = _q_proj(load_qwen3_tts(base).model) + _delta(adapter)
    np.testing.assert_allclose(_q_proj(fused.model), expected, atol=_bf16_step(expected))


def test_a_trained_new_language_voice_exports_and_speaks_by_name(base, clips, tmp_path):
    """The real trainer's adapter (a language the base has no id for) through bake --export."""
    import io

    from finetune.config import LoRASection, TrainerSection
    from finetune.families.qwen3_tts.training import prepare_run
    from finetune.progress import ProgressWriter

    rows = [(f"clip_{i:03d}.wav", "ref.wav", "Hindi") for i in range(2)]
    config = _config(base, _lines(tmp_path / "hi.jsonl", clips, rows), name="Asha", slot=3001)
    config = msgspec.structs.replace(
        config,
        lora=LoRASection(rank=2, alpha=4.0),
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=1e-2, prefetch=0),
    )
    run = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()))
    assert run.trainer.train().status == "finished"
    checkpoint = Path(config.output_dir) / "checkpoint-final"
    entries = json.loads((checkpoint / ADAPTER_CONFIG).read_text())["language_rows"]
    assert [e["name"] for e in entries] == ["hindi"]
    row = entries[0]["row"]

    result = bake(config, checkpoint, tmp_path / "pkg", export=tmp_path / "cv")
    assert result.language == "hindi"
    exported = load_qwen3_tts(tmp_path / "cv")
    talker = exported.config["talker_config"]
    assert talker["codec_language_id"] == {**CODEC_LANGUAGES, "hindi": row}
    assert talker["spk_id"] == {**BUILTIN_SPEAKERS, "asha": 3001}
    trained = np.array(mx.load(str(checkpoint / ADAPTER_WEIGHTS))["language_rows.weight"][0])
    np.testing.assert_allclose(_rows(exported.model, [row])[0], trained, atol=_bf16_step(trained))
    out = list(
        exported.model.generate(
            "Namaste.", voice="asha", lang_code="hindi", temperature=0, max_tokens=3
        )
    )
    assert np.array(out[0].audio).size > 0
