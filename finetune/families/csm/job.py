"""A CSM fine-tuning job: train (resuming) to `checkpoint-final`, then write the voice package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.families.csm.package import ContextSource, write_package
from finetune.progress import ProgressWriter


def context_sources(config: TrainConfig, ref_clip: str | None) -> list[ContextSource]:
    """Up to `csm.context_clips` training clips of the voice's speaker id, the job's ref clip
    first when it is one of them (its transcript is needed)."""
    from finetune.families.csm.training import clip_speakers, read_clips

    wanted = config.csm.context_clips
    if wanted <= 0:
        return []
    clips = read_clips(config, config.data.train)
    speakers = clip_speakers(clips, config.csm.speaker_id)
    own = [c for c in clips if speakers[(c.source, c.line)] == config.csm.speaker_id]
    if ref_clip is not None:
        ref = Path(ref_clip).resolve()
        own.sort(key=lambda c: Path(c.audio).resolve() != ref)  # stable: the ref clip first
    return [ContextSource(audio=Path(c.audio), text=c.text) for c in own[:wanted]]


def run_job(spec: Any, config: TrainConfig, progress: ProgressWriter) -> int:
    from finetune.job import train_to_final
    from finetune.lora import read_adapter_config

    final = train_to_final(config, progress)
    if final is None:
        return 0  # stopped on SIGTERM: the checkpoint is saved, the server decides
    progress.emit("phase", phase="packaging")
    package = write_package(
        Path(spec.package_dir),
        name=spec.name,
        speaker_id=config.csm.speaker_id,
        adapter_dir=final,
        adapter_cfg=read_adapter_config(final),
        context=context_sources(config, spec.ref_clip),
    )
    progress.emit("package", path=str(package))
    return 0
