"""One fine-tuning job as the server runs it: `python -m finetune run-job --spec job.json`.

validate -> preprocess -> train -> bake (speaker) / package (language), reporting JSON lines on
stdout. A job started again with the same spec resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.config import TrainConfig
from finetune.progress import ProgressWriter

import msgspec


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    config: TrainConfig
    package_dir: str
    ref_clip: str | None = None  # language voices: the clip that gives them a voice
    language: str | None = None
    text_prompt: str | None = None  # duplex voices: the default `<system>` prompt


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


def train_to_final(config: TrainConfig, progress: ProgressWriter) -> Path | None:
    """Train until `checkpoint-final` exists (resuming the newest checkpoint); None if stopped."""
    from finetune.families import family_entry

    output = Path(config.output_dir)
    final = output / "checkpoint-final"
    if not (final / "trainer_state.json").is_file():
        entry = family_entry(config.model.family)
        result = entry.train(config, progress=progress, resume=newest_checkpoint(output))
        if result.status != "finished":
            return None
    return final


def run_job(spec_path: Path, progress: ProgressWriter, min_free_bytes: int | None = None) -> int:
    """`min_free_bytes`: the server's floor of free disk space when the job runs (not when it
    was made); a checkpoint that would go below it fails the job."""
    from finetune import distributed
    from finetune.families import family_entry

    spec = msgspec.json.decode(Path(spec_path).read_bytes(), type=JobSpec)
    if min_free_bytes is not None:
        spec.config.trainer.min_free_bytes = min_free_bytes
    if not distributed.is_writer():  # a launched job's other ranks: their shards, then done
        train_to_final(spec.config, progress)
        return 0
    return family_entry(spec.config.model.family).run_job(spec, spec.config, progress)
