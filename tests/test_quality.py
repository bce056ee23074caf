"""Validation in eval mode, `checkpoint-best` by loss and similarity, and the quality report."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from finetune.config import (
    DataSection,
    LoRASection,
    ModelSection,
    QualitySection,
    TrainConfig,
    TrainerSection,
)
from finetune.lora import LoRALinear
from finetune.progress import ProgressWriter
from finetune.quality import (
    NO_SPEAKER_ENCODER,
    cosine_similarity,
    mean_embedding,
    unavailable_hook,
)
from finetune.trainer import BestChoice, Score, Trainer, TrainerConfig

import mlx.core as mx
import mlx.nn as nn
import msgspec
import numpy as np
import pytest
import soundfile as sf


class Toy(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        mx.random.seed(0)
        self.proj = LoRALinear(nn.Linear(16, 16), rank=4, dropout=dropout)
        self.proj.lora_b = mx.random.normal((4, 16))  # a live branch: dropout changes the output
        self.head = nn.Dropout(0.5)


def _loss(module: Toy, batch: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
    return mx.mean(module.head(module.proj(batch)) ** 2), {}


def _batches(epoch: int, index: int):
    while True:
        yield epoch, index, mx.ones((4, 16))
        index += 1


def _save_weights(module: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), {"x": mx.zeros(1)})


def _events(stream: io.StringIO, kind: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [e for e in lines if e["event"] == kind]


def _toy_trainer(tmp_path: Path, **kwargs: Any) -> tuple[Trainer, io.StringIO]:
    stream = io.StringIO()
    module = Toy(dropout=0.5)
    module.freeze()
    module.proj.unfreeze(keys=["lora_a", "lora_b"])
    config = kwargs.pop("config", TrainerConfig(learning_rate=1e-3, max_steps=3))
    trainer = Trainer(
        module=module,
        loss_fn=_loss,
        batches=_batches,
        batches_per_epoch=1,
        save_weights=_save_weights,
        config=config,
        output_dir=tmp_path / "run",
        progress=ProgressWriter(stream=stream),
        **kwargs,
    )
    return trainer, stream


def test_evaluate_runs_without_dropout_and_restores_each_module_mode(tmp_path):
    trainer, _ = _toy_trainer(tmp_path, val_batches=[mx.ones((4, 16))])
    module = trainer.module
    module.train()
    module.head.eval()  # a submodule kept in eval mode by its owner stays so
    # In train mode dropout draws a new mask each time: the same batch, another loss.
    losses = {_loss(module, mx.ones((4, 16)))[0].item() for _ in range(2)}
    assert len(losses) == 2
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second
    assert module.training and module.proj.training and module.proj.dropout.training
    assert not module.head.training


def test_best_choice_is_the_lowest_loss_within_the_similarity_tolerance():
    choice = BestChoice(tolerance=0.05)
    assert choice.offer(Score(1, val=2.0, similarity=0.50))
    assert choice.offer(Score(2, val=1.5, similarity=0.48))  # within 0.05, lower loss
    assert choice.offer(Score(3, val=1.9, similarity=0.70))  # step 2 fell out of tolerance
    assert not choice.offer(Score(4, val=1.0, similarity=0.60))  # low loss, too dissimilar
    assert choice.offer(Score(5, val=1.2, similarity=0.67))
    assert not choice.offer(Score(6, val=0.5, similarity=None))  # no similarity: no candidate
    assert choice.best == Score(5, val=1.2, similarity=0.67)

    by_similarity = BestChoice()  # no validation set
    assert by_similarity.offer(Score(1, similarity=0.3))
    assert by_similarity.offer(Score(2, similarity=0.4))
    assert not by_similarity.offer(Score(3, similarity=0.35))
    assert by_similarity.best.step == 2

    by_loss = BestChoice()  # no similarity (quality off, or CSM / PersonaPlex)
    assert by_loss.offer(Score(1, val=2.0))
    assert not by_loss.offer(Score(2, val=2.5))
    assert by_loss.offer(Score(3, val=1.0))

    restored = BestChoice()
    restored.load(choice.to_dict(), best_val=1.2)
    assert restored.best == choice.best and restored.top_similarity == choice.top_similarity


def test_the_trainer_reports_quality_at_step_0_and_each_checkpoint_and_picks_best(tmp_path):
    similarities = {0: 0.9, 2: 0.3, 4: 0.6, 5: 0.4}
    calls: list[tuple[int, Path | None]] = []

    def hook(step: int, path: Path | None) -> dict[str, Any]:
        calls.append((step, path))
        return {"similarity": similarities[step]}

    config = TrainerConfig(learning_rate=1e-3, max_steps=5, save_every=2, keep_checkpoints=5)
    trainer, _ = _toy_trainer(tmp_path, config=config, on_checkpoint=hook)
    trainer.module.train()
    result = trainer.train()
    run = tmp_path / "run"
    assert calls == [
        (0, None),
        (2, run / "checkpoint-000002"),
        (4, run / "checkpoint-000004"),
        (5, run / "checkpoint-final"),
    ]
    # Step 0 (untrained) is never a candidate; no validation set: the best similarity.
    assert result.best_dir == run / "checkpoint-best"
    state = json.loads((run / "checkpoint-best" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["best_choice"]["best"]["step"] == 4
    final = json.loads((run / "checkpoint-final" / "trainer_state.json").read_text())
    assert final["best_choice"]["top_similarity"] == 0.6


def test_a_family_without_speaker_encoder_reports_null_and_no_best(tmp_path):
    config = TrainConfig(
        model=ModelSection(path="unused", family="csm", strategy="speaker"),
        data=DataSection(train=["unused.jsonl"]),
        quality=QualitySection(enabled=True),
        output_dir=str(tmp_path / "run"),
    )
    off = msgspec.structs.replace(config, quality=QualitySection())
    assert unavailable_hook(off, ProgressWriter(stream=io.StringIO())) is None
    stream = io.StringIO()
    hook = unavailable_hook(config, ProgressWriter(stream=stream))
    trainer, _ = _toy_trainer(
        tmp_path,
        config=TrainerConfig(learning_rate=1e-3, max_steps=2, save_every=1),
        on_checkpoint=hook,
    )
    result = trainer.train()
    events = _events(stream, "quality")
    assert [e["step"] for e in events] == [0, 1, 2]
    assert all(e["similarity"] is None and e["preview"] is None for e in events)
    assert all(e["reason"] == NO_SPEAKER_ENCODER for e in events)
    assert result.best_dir is None and not (tmp_path / "run" / "checkpoint-best").exists()


def test_cosine_similarity_and_mean_embedding():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([-1.0, -1.0])) == pytest.approx(-1.0)
    np.testing.assert_allclose(
        mean_embedding([np.array([1.0, 2.0]), np.array([3.0, 4.0])]), [2.0, 3.0]
    )
    with pytest.raises(ValueError):
        cosine_similarity(np.zeros(3), np.ones(3))


def test_qwen3_quality_report_measures_its_own_preview(tmp_path, tiny_qwen3_base, speaker_dataset):
    from finetune.audio import load_audio
    from finetune.data import read_jsonl
    from finetune.families.qwen3_tts.quality import speaker_embedding
    from finetune.families.qwen3_tts.training import prepare_run

    stream = io.StringIO()
    config = TrainConfig(
        model=ModelSection(path=str(tiny_qwen3_base), strategy="speaker"),
        data=DataSection(train=[str(speaker_dataset)]),
        lora=LoRASection(rank=4, alpha=8.0, dropout=0.3),
        trainer=TrainerSection(batch_size=2, max_steps=2, learning_rate=5e-3, prefetch=0),
        quality=QualitySection(enabled=True, max_frames=12, previews_dir=str(tmp_path / "pv")),
        output_dir=str(tmp_path / "run"),
    )
    run = prepare_run(config, progress=ProgressWriter(stream=stream))
    hook = run.trainer.on_checkpoint
    assert hook is not None
    run.trainer.train()
    events = _events(stream, "quality")
    assert [e["step"] for e in events] == [0, 2]

    model = run.loaded.model
    clips = read_jsonl([speaker_dataset], strategy="speaker")
    reference = mean_embedding(
        [speaker_embedding(model, load_audio(p, 24_000)) for p in sorted({c.audio for c in clips})]
    )
    assert model.talker.training  # the preview switched to eval mode and back
    # The same preview again (fixed seed, same weights) has the reported similarity.
    audio = hook.previewer.preview()
    assert audio is not None and audio.size > 0
    assert len(hook.previewer.frames()) <= 12
    expected = cosine_similarity(speaker_embedding(model, audio), reference)
    last = events[-1]
    assert last["similarity"] == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= events[0]["similarity"] <= 1.0
    for event in events:
        path = Path(event["preview"])
        assert path == tmp_path / "pv" / f"step-{event['step']:06d}.wav"
        written, rate = sf.read(path)
        assert rate == 24_000 and written.size > 0
    # No validation set: checkpoint-best is the final step's, the only trained candidate.
    state = json.loads((tmp_path / "run" / "checkpoint-best" / "trainer_state.json").read_text())
    assert state["best_choice"]["best"]["similarity"] == last["similarity"]
