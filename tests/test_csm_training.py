"""CSM fine-tuning: teacher-forced forward vs generation, LoRA scope, loss, fuse, CLI, job."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from finetune.config import (
    CsmSection,
    DataSection,
    LoRASection,
    ModelSection,
    TrainConfig,
    TrainerSection,
)
from finetune.data import DataError, read_jsonl, synthetic_dataset
from finetune.families.csm.checkpoint import LoadedCsm, load_csm
from finetune.families.csm.generate import text_frames
from finetune.families.csm.training import (
    CsmBatch,
    clip_speakers,
    collate,
    example_frames,
    prepare_lora,
    prepare_run,
    teacher_forced_logits,
)
from finetune.lora import LoRALinear, fuse_lora, load_adapters
from finetune.progress import ProgressWriter

import mlx.core as mx
import msgspec
import numpy as np
import pytest
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parents[1]


def _config(model: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    config = TrainConfig(
        model=ModelSection(path=str(model), family="csm", strategy="speaker"),
        data=DataSection(train=[str(data)]),
        lora=LoRASection(rank=8, alpha=16.0),
        trainer=TrainerSection(
            batch_size=2,
            max_steps=20,
            learning_rate=3e-3,
            schedule="constant",
            weight_decay=0.0,
            prefetch=0,
        ),
        csm=CsmSection(train_decoder=True, speaker_id=4),
        output_dir=str(out),
    )
    return msgspec.structs.replace(config, **changes)


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("csm_data")
    return synthetic_dataset(out, 2, seed=1, with_ref=False, min_s=0.8, max_s=1.2)


@pytest.fixture(scope="module")
def trained(tiny_csm: Path, two_clips: Path, tmp_path_factory: pytest.TempPathFactory):
    """20 LoRA steps (backbone + depth decoder) overfitting two clips; the progress lines."""
    out = tmp_path_factory.mktemp("csm_run")
    stream = io.StringIO()
    run = prepare_run(_config(tiny_csm, two_clips, out), progress=ProgressWriter(stream=stream))
    result = run.trainer.train()
    steps = [json.loads(line) for line in stream.getvalue().splitlines()]
    return run, result, [s for s in steps if s["event"] == "step"]


def _forced_generation_logits(loaded: LoadedCsm, text: str, speaker: int, codes: np.ndarray):
    """Logits of mlx-audio's frame step (KV caches) when it is made to emit `codes` + EOS."""
    sesame = loaded.backbone
    sesame.reset_caches()
    frames = np.concatenate([codes, np.zeros((1, codes.shape[1]), np.int32)])
    recorded: list[np.ndarray] = []
    prompt = text_frames(loaded, text, speaker)
    tokens, mask = mx.array(prompt.tokens)[None], mx.array(prompt.mask)[None]
    width = codes.shape[1] + 1
    for frame in frames:
        chosen = iter(frame.tolist())

        def forced(logits: mx.array, chosen=chosen) -> mx.array:
            recorded.append(np.asarray(logits[0]))
            return mx.array([next(chosen)])

        out = sesame.generate_frame(tokens, mask, None, forced)
        assert np.array_equal(np.asarray(out[0]), frame)
        tokens = mx.array(np.append(frame, 0).astype(np.int32))[None, None]
        mask = mx.array(np.arange(width) < width - 1)[None, None]
    return np.stack(recorded).reshape(len(frames), codes.shape[1], -1)


def test_teacher_forced_logits_match_step_by_step_generation(loaded_csm: LoadedCsm) -> None:
    rng = np.random.default_rng(0)
    examples = [("Hello there, friend.", 3, 6), ("Hi.", 1, 3)]  # the second one is padded
    sequences, codes = [], []
    for text, speaker, frames in examples:
        clip_codes = rng.integers(1, 2048, (frames, loaded_csm.num_codebooks)).astype(np.int32)
        codes.append(clip_codes)
        frames_ = example_frames(loaded_csm, text, speaker, clip_codes)
        sequences.append((frames_, len(text_frames(loaded_csm, text, speaker))))
    batch = collate(sequences, decoder_fraction=1.0, rng=rng)
    logits = teacher_forced_logits(loaded_csm.backbone, batch)
    c0, decoder = np.asarray(logits.codebook0), np.asarray(logits.decoder)
    start = 0
    for (text, speaker, frames), clip_codes in zip(examples, codes, strict=True):
        step = _forced_generation_logits(loaded_csm, text, speaker, clip_codes)
        rows = slice(start, start + frames + 1)  # every audio frame and the EOS frame
        np.testing.assert_allclose(c0[rows], step[:, 0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(decoder[rows], step[:, 1:], atol=1e-4, rtol=1e-4)
        start += frames + 1
    assert start == len(batch.target_rows)

    # The depth decoder on a subset of frames computes the same logits for those frames.
    subset = collate(sequences, decoder_fraction=0.3, rng=np.random.default_rng(1))
    assert 0 < len(subset.decoder_rows) < len(subset.target_rows)
    partial = np.asarray(teacher_forced_logits(loaded_csm.backbone, subset).decoder)
    np.testing.assert_allclose(partial, decoder[subset.decoder_rows], atol=1e-5, rtol=1e-5)


def test_a_training_example_is_the_served_prompt_then_the_clip(loaded_csm: LoadedCsm) -> None:
    from finetune.families.csm.conditioning import ContextClip, prompt_frames, training_sequence

    rng = np.random.default_rng(3)
    context = [ContextClip("Before.", 4, codes=rng.integers(1, 2048, (3, 8)).astype(np.int32))]
    codes = rng.integers(1, 2048, (5, 8)).astype(np.int32)
    frames, prompt_rows = training_sequence(loaded_csm, "Say this.", 4, codes, context)
    served = prompt_frames(loaded_csm, "Say this.", 4, context)
    assert prompt_rows == len(served) > len(text_frames(loaded_csm, "Say this.", 4)) + 3
    np.testing.assert_array_equal(frames.tokens[:prompt_rows], served.tokens)
    np.testing.assert_array_equal(frames.mask[:prompt_rows], served.mask)
    np.testing.assert_array_equal(
        frames.tokens[prompt_rows:, :8], np.vstack([codes, 0 * codes[:1]])
    )


def test_lora_scope_is_the_sesame_model_only(tiny_csm: Path, two_clips: Path) -> None:
    loaded = load_csm(tiny_csm)
    config = _config(tiny_csm, two_clips, Path("unused"), csm=CsmSection(train_decoder=False))
    prepare_lora(loaded, config)
    wrapped = sorted(p for p, m in loaded.model.named_modules() if isinstance(m, LoRALinear))
    expected = sorted(
        f"model.{stack}.layers.{i}.{proj}"
        for stack, layers in (("backbone", 2),)
        for i in range(layers)
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    assert wrapped == expected
    trainable = dict(tree_flatten(loaded.model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert all(k.startswith("model.backbone.layers.") for k in trainable)

    with_decoder = load_csm(tiny_csm)
    prepare_lora(with_decoder, _config(tiny_csm, two_clips, Path("unused")))
    paths = [p for p, m in with_decoder.model.named_modules() if isinstance(m, LoRALinear)]
    assert len(paths) == 28 and sum(p.startswith("model.decoder.") for p in paths) == 14
    assert not any(p.startswith("_audio_tokenizer") for p in paths)  # the codec stays as is


def test_loss_falls_when_overfitting_two_clips(trained) -> None:
    _, result, steps = trained
    assert result.status == "finished" and result.step == 20
    first, last = steps[0], steps[-1]
    assert last["loss"] <= 0.6 * first["loss"], (first, last)
    assert last["codebook0"] < first["codebook0"] and last["decoder"] < first["decoder"]


def test_adapter_loads_back_and_fused_equals_unfused(
    trained, tiny_csm: Path, loaded_csm: LoadedCsm
) -> None:
    _, result, _ = trained
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["family"] == "csm" and config["module"] == "model"
    assert config["strategy"] == "speaker" and config["speaker_id"] == 4
    assert config["base_model"]["audio_num_codebooks"] == 8

    rng = np.random.default_rng(2)
    clip_codes = rng.integers(1, 2048, (4, 8)).astype(np.int32)
    frames = example_frames(loaded_csm, "Fuse me.", 4, clip_codes)
    batch: CsmBatch = collate(
        [(frames, len(text_frames(loaded_csm, "Fuse me.", 4)))], decoder_fraction=1.0, rng=rng
    )
    base = teacher_forced_logits(loaded_csm.backbone, batch)

    fresh = load_csm(tiny_csm)
    load_adapters(fresh.backbone, result.final_dir)
    unfused = teacher_forced_logits(fresh.backbone, batch)
    assert not np.allclose(np.asarray(unfused.codebook0), np.asarray(base.codebook0), atol=1e-3)
    fused_paths = fuse_lora(fresh.backbone)
    assert len(fused_paths) == 28
    fused = teacher_forced_logits(fresh.backbone, batch)
    for name in ("codebook0", "decoder"):
        np.testing.assert_allclose(
            np.asarray(getattr(fused, name)),
            np.asarray(getattr(unfused, name)),
            atol=1e-4,
            rtol=1e-4,
        )


def test_resume_continues_exactly(tiny_csm: Path, two_clips: Path, tmp_path: Path) -> None:
    def run(out: Path, steps: int, resume: Path | None = None):
        changes = {
            "trainer": TrainerSection(
                batch_size=1, max_steps=steps, learning_rate=1e-3, prefetch=0, save_every=2
            ),
            "csm": CsmSection(decoder_frame_fraction=0.25),
        }
        config = _config(tiny_csm, two_clips, out, **changes)
        prepared = prepare_run(config, progress=ProgressWriter(stream=io.StringIO()))
        if resume is not None:
            prepared.trainer.resume(resume)
        return prepared.trainer.train()

    straight = run(tmp_path / "straight", 4)  # also saves checkpoint-000002 on the way
    again = run(tmp_path / "again", 4, resume=tmp_path / "straight" / "checkpoint-000002")
    a = mx.load(str(straight.final_dir / "adapters.safetensors"))
    b = mx.load(str(again.final_dir / "adapters.safetensors"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-6)


def test_bad_speaker_ids_are_data_errors(tmp_path: Path) -> None:
    data = synthetic_dataset(tmp_path, 2, seed=0, with_ref=False)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["speaker"] = 2
    rows[1]["speaker"] = "two"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clips = read_jsonl(data, strategy="language")
    with pytest.raises(DataError, match=r"train.jsonl:2: 'speaker' must be an integer"):
        clip_speakers(clips, 0)
    rows[1]["speaker"] = 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    speakers = clip_speakers(read_jsonl(data, strategy="language"), 0)
    assert sorted(speakers.values()) == [2, 3]


def test_smoke_test_cli_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "finetune", "train", "--config", "configs/csm_speaker.yaml"),
            *("--smoke-test", "--output", str(tmp_path / "out")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["step"] == 5
    assert (tmp_path / "out" / "checkpoint-final" / "adapters.safetensors").is_file()


def test_run_job_writes_a_voice_package(tiny_csm: Path, two_clips: Path, tmp_path: Path) -> None:
    from finetune.families.csm.job import run_job
    from finetune.job import JobSpec

    config = _config(
        tiny_csm,
        two_clips,
        tmp_path / "run",
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=1e-3, prefetch=0),
        csm=CsmSection(speaker_id=4, context_clips=1),
    )
    spec = JobSpec(
        name="narrator",
        config=config,
        package_dir=str(tmp_path / "package"),
    )
    stream = io.StringIO()
    assert run_job(spec, config, ProgressWriter(stream=stream)) == 0
    package = tmp_path / "package"
    meta = json.loads((package / "voice.json").read_text())
    assert meta["format"] == "voicefoundry.voice/1"
    assert (meta["family"], meta["kind"], meta["strategy"]) == ("csm", "adapter", "speaker")
    assert meta["name"] == "narrator" and meta["speaker_id"] == 4
    assert meta["adapter"] == "adapter" and meta["base_model"]["audio_num_codebooks"] == 8
    first_clip = read_jsonl(two_clips, strategy="language")[0]
    assert meta["context"] == [{"audio": "context_00.wav", "text": first_clip.text}]
    # The context is the clip training prefixed every example with, byte for byte (so the
    # server encodes the very samples whose codes training used).
    trained_on = json.loads((package / "adapter" / "adapter_config.json").read_text())["context"]
    assert trained_on == [{"audio": str(first_clip.audio), "text": first_clip.text}]
    assert (package / "context_00.wav").read_bytes() == Path(first_clip.audio).read_bytes()
    assert sorted(p.name for p in (package / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
    ]
    assert not list(tmp_path.glob(".package*"))  # no staging left behind
    loaded = load_csm(tiny_csm)
    adapter = load_adapters(loaded.backbone, package / "adapter")
    assert adapter["module"] == "model"
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events[-1] == "package"


def test_unsupported_strategy_is_a_config_error(tiny_csm: Path, two_clips: Path) -> None:
    from finetune.config import ConfigError

    config = _config(tiny_csm, two_clips, Path("unused"))
    # The family registry refuses a strategy CSM does not train as soon as the config is built.
    with pytest.raises(ConfigError, match="not 'duplex'"):
        msgspec.structs.replace(
            config, model=msgspec.structs.replace(config.model, strategy="duplex")
        )
