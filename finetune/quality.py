"""The quality report of a fine-tune, for every family: at step 0 (the untrained voice) and at
every saved checkpoint, a short preview in the voice's own conditioning and its speaker
similarity to the uploaded clips.

similarity = cosine(speaker-encoder embedding of the preview,
                    mean speaker-encoder embedding of the uploaded clips)

A family that can make a preview and embed audio passes a `Previewer`; one that cannot (no
speaker encoder in the training process) reports `similarity: null` with its reason, never a
made-up number. Each report is a `quality` progress event {step, similarity, preview, reason?};
the preview WAV is `<previews_dir>/step-NNNNNN.wav` (`preview_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune.audio import write_wav
from finetune.config import TrainConfig
from finetune.progress import ProgressWriter, Quality
from finetune.trainer import CheckpointHook

import numpy as np

NO_SPEAKER_ENCODER = "no Qwen3 speaker encoder loaded in the training process"


class Previewer(Protocol):
    sample_rate: int

    def preview(self) -> np.ndarray | None:
        """A short utterance in the voice, as it is now (mono float audio); None if empty."""
        ...

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """The speaker-encoder embedding of mono float audio at `sample_rate`."""
        ...


def preview_name(step: int) -> str:
    return f"step-{step:06d}.wav"


def previews_dir(config: TrainConfig) -> Path:
    if config.quality.previews_dir:
        return Path(config.quality.previews_dir)
    return Path(config.output_dir) / "previews"


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        raise ValueError("cosine similarity of a zero vector")
    return float(np.dot(a, b) / norm)


def mean_embedding(vectors: list[np.ndarray]) -> np.ndarray:
    if not vectors:
        raise ValueError("no embeddings to average")
    return np.mean(np.stack([np.asarray(v, np.float32) for v in vectors]), axis=0)


@dataclass
class QualityReporter:
    """The trainer's `on_checkpoint` hook: one report (and `quality` event) per call."""

    progress: ProgressWriter
    folder: Path
    previewer: Previewer | None = None
    reference: np.ndarray | None = None  # mean embedding of the uploaded clips
    reason: str | None = None  # why there is no similarity (previewer is None)

    def __call__(self, step: int, checkpoint: Path | None) -> dict[str, Any]:
        del checkpoint  # the report is on the live weights, the ones that checkpoint holds
        report = self.measure(step)
        self.progress.emit(Quality(**report))
        return report

    def measure(self, step: int) -> dict[str, Any]:
        if self.previewer is None or self.reference is None:
            return {"step": step, "similarity": None, "preview": None, "reason": self.reason}
        audio = self.previewer.preview()
        if audio is None or audio.size == 0:
            reason = "the preview was empty (the model ended the utterance at once)"
            return {"step": step, "similarity": None, "preview": None, "reason": reason}
        path = self.folder / preview_name(step)
        write_wav(path, audio, self.previewer.sample_rate)
        similarity = cosine_similarity(self.previewer.embed(audio), self.reference)
        return {"step": step, "similarity": round(similarity, 6), "preview": str(path)}


def unavailable_hook(
    config: TrainConfig, progress: ProgressWriter, reason: str = NO_SPEAKER_ENCODER
) -> CheckpointHook | None:
    """The hook of a family that cannot measure similarity: honest nulls (None when off)."""
    if not config.quality.enabled:
        return None
    return QualityReporter(progress, previews_dir(config), reason=reason)
