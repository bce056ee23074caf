"""A PersonaPlex fine-tuning job (`strategy: duplex`): train, then write a duplex voice package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.progress import Package, Phase, ProgressWriter


def run_job(spec: Any, config: TrainConfig, progress: ProgressWriter) -> int:
    """Train to `checkpoint-final` (resuming), then package it with the spec's ref clip as the
    voice prompt and its text prompt. 0 also when stopped by SIGTERM (checkpoint saved)."""
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.families.personaplex.package import write_duplex_package
    from finetune.job import train_to_final

    final = train_to_final(config, progress)
    if final is None:
        return 0
    progress.emit(Phase(phase="packaging"))
    package = write_duplex_package(
        Path(spec.package_dir),
        name=spec.name,
        adapter_dir=final,
        voice_prompt=Path(spec.ref_clip) if spec.ref_clip else None,
        text_prompt=spec.text_prompt,
        base=load_personaplex(config.model.path),
    )
    progress.emit(Package(path=str(package)))
    return 0
