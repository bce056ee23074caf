"""One fine-tuning job as the server runs it: `python -m finetune run-job --spec job.json`.

validate -> preprocess -> train -> bake (speaker) / package (language), reporting JSON lines on
stdout. A job started again with the same spec resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.progress import ProgressWriter

import msgspec


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    config: dict[str, Any]  # a TrainConfig as a mapping
    package_dir: str
    ref_clip: str | None = None  # language voices: the clip that gives them a voice
    language: str | None = None


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint a restarted job continues from: last (SIGTERM) or the newest periodic."""
    output_dir = Path(output_dir)
    candidates = []
    for path in output_dir.glob("checkpoint-*"):
        state = path / "trainer_state.json"
        if path.name.startswith(".") or not state.is_file():
            continue
        if re.fullmatch(r"checkpoint-(\d+|last|final)", path.name):
            candidates.append((json.loads(state.read_text())["step"], path))
    return max(candidates)[1] if candidates else None


def run_job(spec_path: Path, progress: ProgressWriter) -> int:
    from finetune.families.qwen3_tts import training
    from finetune.families.qwen3_tts.bake import bake, write_package

    spec = msgspec.json.decode(Path(spec_path).read_bytes(), type=JobSpec)
    config = msgspec.convert(spec.config, TrainConfig)
    output = Path(config.output_dir)
    final = output / "checkpoint-final"
    if not (final / "trainer_state.json").is_file():
        resume = newest_checkpoint(output)
        result = training.train(config, progress=progress, resume=resume)
        if result.status != "finished":
            return 0  # stopped on SIGTERM: the checkpoint is saved, the server decides
    progress.emit("phase", phase="baking")
    package = Path(spec.package_dir)
    if config.model.strategy == "speaker":
        bake(config, final, package, name=spec.name, slot=config.speaker.slot, force=True)
    else:
        from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
        from finetune.lora import read_adapter_config

        base = load_qwen3_tts(config.model.path)
        write_package(
            package,
            name=spec.name,
            slot=None,
            embedding=None,
            adapter_dir=final,
            adapter_cfg=read_adapter_config(final),
            base=base,
            language=spec.language,
        )
    progress.emit("package", path=str(package))
    return 0
