"""PersonaPlex LoRA fine-tuning on the tiny checkpoint: forward == inference, scope, training,
fuse, resume, the smoke CLI, the duplex job and its voice package."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from finetune.audio import load_audio, write_wav
from finetune.config import (
    DataSection,
    LoRASection,
    ModelSection,
    PersonaPlexSection,
    TrainConfig,
    TrainerSection,
)
from finetune.families.personaplex import data as duplex_data
from finetune.families.personaplex.checkpoint import load_personaplex
from finetune.families.personaplex.forward import (
    StreamLayout,
    delay_streams,
    stepwise_logits,
    teacher_forced,
)
from finetune.families.personaplex.training import prepare_lm, prepare_run
from finetune.lora import ADAPTER_WEIGHTS, LoRALinear, fuse_lora, load_adapters
from finetune.progress import ProgressWriter

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parents[1]


def _config(model: Path, train: Path, out: Path, **trainer) -> TrainConfig:
    lora = trainer.pop("lora", LoRASection(rank=8, alpha=16.0))
    personaplex = trainer.pop("personaplex", PersonaPlexSection())
    return TrainConfig(
        model=ModelSection(path=str(model), family="personaplex", strategy="duplex"),
        data=DataSection(train=[str(train)]),
        lora=lora,
        personaplex=personaplex,
        trainer=TrainerSection(**{"batch_size": 2, "prefetch": 0, **trainer}),
        output_dir=str(out),
    )


def _random_codes(lm, batch: int, frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = rng.integers(0, lm.cfg.text_out_vocab_size, (batch, 1, frames))
    audio = rng.integers(0, lm.cfg.audio_vocab_size - 1, (batch, lm.cfg.audio_codebooks, frames))
    return np.concatenate([text, audio], axis=1).astype(np.int32)


def _adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(directory / ADAPTER_WEIGHTS)).items()}


@pytest.fixture(scope="module")
def paired_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short paired lines (one with a silent user, one with a user file)."""
    return duplex_data.synthetic_dataset(
        tmp_path_factory.mktemp("duplex_two"), 2, seed=5, min_s=1.0, max_s=1.3
    )


# --------------------------------------------------------------------------- forward


def test_teacher_forced_forward_matches_mlx_audio_stepwise_inference(loaded_personaplex):
    lm = loaded_personaplex.lm
    codes = _random_codes(lm, batch=2, frames=6, seed=0)
    codes[1, :, 4:] = duplex_data.PAD_CODE  # a shorter second row: batch padding
    text_steps, audio_steps = stepwise_logits(lm, codes)
    forced = teacher_forced(lm, codes)
    assert forced.text_logits.shape == text_steps.shape == (2, 7, lm.cfg.text_out_vocab_size)
    assert forced.audio_logits.shape == audio_steps.shape == (2, 16, 7, 2048)
    np.testing.assert_allclose(np.array(forced.text_logits), np.array(text_steps), atol=1e-4)
    np.testing.assert_allclose(np.array(forced.audio_logits), np.array(audio_steps), atol=1e-4)

    # Without the causal mask (mlx-audio's layers called as they are) every step sees the
    # future: the first step's logits already differ.
    unmasked = teacher_forced(lm, codes, causal=False)
    assert np.abs(np.array(unmasked.text_logits)[:, 0] - np.array(text_steps)[:, 0]).max() > 1e-2
    assert np.abs(np.array(unmasked.audio_logits) - np.array(audio_steps)).max() > 1e-2


def test_delays_shift_the_acoustic_codebooks_by_one_step(loaded_personaplex):
    codes = _random_codes(loaded_personaplex.lm, batch=1, frames=3, seed=1)
    seq = delay_streams(codes, StreamLayout.from_lm(loaded_personaplex.lm))
    # text and both semantic codebooks (rows 0, 1, 9) are undelayed, the others one step late
    for row in (0, 1, 9):
        np.testing.assert_array_equal(seq.targets[0, row, :3], codes[0, row])
        assert not seq.valid[0, row, 3]
    for row in (2, 8, 10, 16):
        assert seq.targets[0, row, 0] == 2048 and not seq.valid[0, row, 0]
        np.testing.assert_array_equal(seq.targets[0, row, 1:], codes[0, row])
    assert seq.inputs[0, 0, 0] == 32000  # the text initial token
    np.testing.assert_array_equal(seq.inputs[0, :, 1:], seq.targets[0, :, :-1])


# --------------------------------------------------------------------------- LoRA scope


def test_lora_scope_and_trained_tensors(tiny_personaplex, tmp_path):
    loaded = load_personaplex(tiny_personaplex)
    lm = loaded.lm
    config = _config(tiny_personaplex, tmp_path / "unused.jsonl", tmp_path / "out")
    _, trained = prepare_lm(lm, config)
    lora_paths = {p for p, m in lm.named_modules() if isinstance(m, LoRALinear)}
    layers, slices = lm.cfg.transformer.num_layers, lm.cfg.depformer.num_slices
    expected = {
        f"transformer.layers.{i}.self_attn.{name}"
        for i in range(layers)
        for name in ("in_proj", "out_proj")
    } | {f"depformer.slices.{k}.linear_in" for k in range(slices)}
    assert lora_paths == expected
    assert not any("gating" in p for p in lora_paths)

    trainable = set(dict(tree_flatten(lm.trainable_parameters())))
    full = {k for k in trainable if not k.endswith(("lora_a", "lora_b"))}
    assert full == set(trained)
    assert set(trained) == {f"audio_embs.{i}.weight" for i in range(16)} | {"out_norm.weight"}
    assert not any(k.startswith("text_linear") for k in trainable)

    unfrozen = load_personaplex(tiny_personaplex).lm
    config = _config(
        tiny_personaplex,
        tmp_path / "unused.jsonl",
        tmp_path / "out",
        personaplex=PersonaPlexSection(freeze_text_linear=False, train_audio_embs=False),
    )
    _, trained = prepare_lm(unfrozen, config)
    assert trained == ["out_norm.weight", "text_linear.weight"]
    assert "text_linear.weight" in dict(tree_flatten(unfrozen.trainable_parameters()))


# --------------------------------------------------------------------------- training


def test_loss_falls_then_adapter_round_trips_and_fuses(tiny_personaplex, paired_clips, tmp_path):
    config = _config(
        tiny_personaplex,
        paired_clips,
        tmp_path / "run",
        lora=LoRASection(rank=16, alpha=32.0),
        learning_rate=3e-3,
        weight_decay=0.0,
        schedule="constant",
        max_steps=20,
    )
    buffer = io.StringIO()
    run = prepare_run(config, progress=ProgressWriter(stream=buffer))
    result = run.trainer.train()
    steps = [e for e in map(json.loads, buffer.getvalue().splitlines()) if e["event"] == "step"]
    assert result.status == "finished" and len(steps) == 20
    assert {"loss", "text", "audio", "grad_norm"} <= set(steps[0])
    assert steps[-1]["loss"] <= 0.6 * steps[0]["loss"], (steps[0]["loss"], steps[-1]["loss"])

    final = tmp_path / "run" / "checkpoint-final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["family"] == "personaplex" and adapter_cfg["module"] == "lm"
    assert adapter_cfg["strategy"] == "duplex"
    assert adapter_cfg["trained_tensors"] == run.trained_tensors
    assert adapter_cfg["base_model"]["dep_q"] == 16
    tensors = _adapter_tensors(final)
    lora = {k for k in tensors if k.endswith(("lora_a", "lora_b"))}
    assert set(tensors) == lora | set(run.trained_tensors)
    assert len(lora) == 2 * (2 * run.loaded.lm.cfg.transformer.num_layers + 16)
    assert not any(k.startswith("text_linear") for k in tensors)

    codes = _random_codes(run.loaded.lm, batch=1, frames=5, seed=2)
    trained = teacher_forced(run.loaded.lm, codes)
    fresh = load_personaplex(tiny_personaplex).lm
    before = np.array(teacher_forced(fresh, codes).text_logits)
    load_adapters(fresh, final)
    loaded = teacher_forced(fresh, codes)
    fused_paths = fuse_lora(fresh)
    fused = teacher_forced(fresh, codes)
    assert len(fused_paths) == len(lora) // 2
    for a, b in ((trained, loaded), (loaded, fused)):
        np.testing.assert_allclose(np.array(a.text_logits), np.array(b.text_logits), atol=1e-4)
        np.testing.assert_allclose(np.array(a.audio_logits), np.array(b.audio_logits), atol=1e-4)
    assert np.abs(before - np.array(loaded.text_logits)).max() > 1e-3  # the adapter does act


def test_resumed_run_ends_with_the_same_adapter(tiny_personaplex, paired_clips, tmp_path):
    common = dict(
        lora=LoRASection(rank=4, alpha=8.0, dropout=0.1),
        learning_rate=2e-3,
        max_steps=4,
        warmup_steps=1,
        batch_size=1,
    )
    full = prepare_run(
        _config(tiny_personaplex, paired_clips, tmp_path / "a", save_every=2, **dict(common)),
        progress=ProgressWriter(stream=io.StringIO()),
    )
    assert full.trainer.train().status == "finished"
    buffer = io.StringIO()
    resumed = prepare_run(
        _config(tiny_personaplex, paired_clips, tmp_path / "b", **dict(common)),
        progress=ProgressWriter(stream=buffer),
        resume=tmp_path / "a" / "checkpoint-000002",
    )
    cache = [e for e in map(json.loads, buffer.getvalue().splitlines()) if "encoded" in e]
    assert cache[0]["encoded"] == 0 and cache[0]["skipped"] == 3  # Mimi codes came from cache
    assert resumed.trainer.step == 2
    assert resumed.trainer.train().status == "finished"
    a = _adapter_tensors(tmp_path / "a" / "checkpoint-final")
    b = _adapter_tensors(tmp_path / "b" / "checkpoint-final")
    assert a.keys() == b.keys() and "out_norm.weight" in a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def test_smoke_train_cli_on_the_hindi_config():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "train",
            "--config",
            "configs/personaplex_hindi.yaml",
            "--smoke-test",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sum(e["event"] == "step" for e in events) == 5
    assert events[-1]["event"] == "done"


# --------------------------------------------------------------------------- job + package


def test_run_job_writes_a_duplex_voice_package(tiny_personaplex, paired_clips, tmp_path):
    from finetune.job import run_job

    prompt = tmp_path / "prompt_16k.wav"
    write_wav(prompt, 0.3 * np.sin(np.linspace(0, 400 * np.pi, 16_000)), 16_000)
    config = _config(tiny_personaplex, paired_clips, tmp_path / "run", max_steps=2)
    spec = {
        "name": "asha",
        "config": json.loads(json.dumps(__import__("msgspec").to_builtins(config))),
        "package_dir": str(tmp_path / "package"),
        "ref_clip": str(prompt),
        "text_prompt": "<system> You are Asha, a helpful assistant. <system>",
    }
    spec_path = tmp_path / "job.json"
    spec_path.write_text(json.dumps(spec))
    buffer = io.StringIO()
    assert run_job(spec_path, ProgressWriter(stream=buffer)) == 0

    package = tmp_path / "package"
    voice = json.loads((package / "voice.json").read_text())
    assert voice["format"] == "voicefoundry.voice/1"
    kind = (voice["family"], voice["kind"], voice["strategy"])
    assert kind == ("personaplex", "duplex", "duplex")
    assert voice["name"] == "asha" and voice["adapter"] == "adapter"
    assert voice["voice_prompt"] == "voice_prompt.wav"
    assert voice["text_prompt"] == spec["text_prompt"]
    assert voice["base_model"]["dep_q"] == 16 and voice["created_at"]
    assert sorted(p.name for p in (package / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
    ]
    info = sf.info(str(package / "voice_prompt.wav"))
    assert (info.samplerate, info.channels) == (24_000, 1)
    assert abs(info.frames - 24_000) <= 2
    np.testing.assert_allclose(
        load_audio(package / "voice_prompt.wav")[:1000], load_audio(prompt)[:1000], atol=2e-3
    )
    fresh = load_personaplex(tiny_personaplex).lm
    adapter_cfg = load_adapters(fresh, package / "adapter")
    assert adapter_cfg["trained_tensors"][-1] == "out_norm.weight"
    events = [json.loads(line)["event"] for line in buffer.getvalue().splitlines()]
    assert events[-1] == "package"


# --------------------------------------------------------------------------- data errors


def test_bad_duplex_lines_are_all_reported(tmp_path):
    write_wav(tmp_path / "short.wav", np.zeros(2400, np.float32), 24_000)
    write_wav(tmp_path / "long.wav", np.zeros(24_000 * 4, np.float32), 24_000)
    write_wav(tmp_path / "ok.wav", np.zeros(24_000, np.float32), 24_000)
    lines = [
        {"agent_audio": "missing.wav", "text": "hello"},
        {"agent_audio": "ok.wav", "text": "   "},
        {"agent_audio": "short.wav", "text": "hello"},
        {"agent_audio": "ok.wav", "user_audio": "long.wav", "text": "hello"},
        {"user_audio": "ok.wav", "text": "hello"},
    ]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(duplex_data.DataError) as caught:
        duplex_data.read_jsonl(jsonl, min_duration_s=0.5, max_duration_s=3.0)
    problems = caught.value.problems
    assert len(problems) == 5
    assert "file not found" in problems[0] and "'text' is empty" in problems[1]
    assert "shorter than the minimum" in problems[2] and "longer than the maximum" in problems[3]
    assert "missing 'agent_audio'" in problems[4]


def test_text_placement_follows_the_voiced_frames():
    voiced = np.array([0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    stream = duplex_data.place_text_tokens([101, 102, 103], voiced, word_starts=[1, 0, 1])
    words = np.flatnonzero(stream > 3)
    assert list(stream[words]) == [101, 102, 103] and all(voiced[words])
    assert stream[words[0] - 1] == duplex_data.TEXT_EPAD  # a word starts after padding
    assert set(stream[~np.isin(np.arange(12), words)]) <= {duplex_data.TEXT_PAD, 0}
    with pytest.raises(ValueError, match="at most one text token per 80 ms frame"):
        duplex_data.place_text_tokens(list(range(100, 113)), voiced)
