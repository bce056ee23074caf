"""PersonaPlex behind the family surface described in `finetune.families`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.families.personaplex.family import FAMILY
from finetune.progress import ProgressWriter

DEFAULT_TARGETS = list(FAMILY.default_targets)
PRESETS = FAMILY.presets
VARIANTS = FAMILY.variants


def make_tiny(out_dir: Path, *, seed: int = 0, preset: str = "tiny", variant: str = "base") -> Path:
    from finetune.families.personaplex.tiny import make_tiny_personaplex

    return make_tiny_personaplex(out_dir, seed=seed, preset=preset)


def quantize(src: Path, dst: Path, variant: str) -> Path:
    from finetune.families.personaplex.quantize import quantize_personaplex

    return quantize_personaplex(src, dst, variant)


def train(config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None) -> Any:
    from finetune.families.personaplex import training

    return training.train(config, progress=progress, resume=resume)


def smoke_config(config: TrainConfig, workdir: Path, *, keep_output: bool) -> TrainConfig:
    from finetune.families.personaplex import training

    return training.smoke_config(config, workdir, keep_output=keep_output)


def run_job(spec: Any, config: TrainConfig, progress: ProgressWriter) -> int:
    from finetune.families.personaplex import job

    return job.run_job(spec, config, progress)


def describe(path: Path) -> Any:
    """The CheckpointDescription of `path` when it is a personaplex checkpoint, else None."""
    from finetune.families.personaplex import describe as checkpoint

    return checkpoint.describe(path)


def load_problems(path: Path) -> list[str]:
    """Every problem the family's loader finds in `path`; [] when it loads."""
    from finetune.families.personaplex import describe as checkpoint

    return checkpoint.load_problems(path)
