"""A CSM fine-tuning job: train (resuming) to `checkpoint-final`, then write the voice package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.families.csm.package import ContextSource, write_package
from finetune.progress import Package, Phase, ProgressWriter


def context_sources(adapter_cfg: dict[str, Any]) -> list[ContextSource]:
    """The context clips training prefixed every example with (recorded in the adapter): the
    voice is served with exactly those."""
    return [
        ContextSource(audio=Path(c["audio"]), text=c["text"])
        for c in adapter_cfg.get("context", [])
    ]


def run_job(spec: Any, config: TrainConfig, progress: ProgressWriter) -> int:
    from finetune.job import train_to_final
    from finetune.lora import read_adapter_config

    final = train_to_final(config, progress)
    if final is None:
        return 0  # stopped on SIGTERM: the checkpoint is saved, the server decides
    progress.emit(Phase(phase="packaging"))
    adapter_cfg = read_adapter_config(final)
    package = write_package(
        Path(spec.package_dir),
        name=spec.name,
        speaker_id=config.csm.speaker_id,
        adapter_dir=final,
        adapter_cfg=adapter_cfg,
        context=context_sources(adapter_cfg),
    )
    progress.emit(Package(path=str(package)))
    return 0
