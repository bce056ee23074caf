"""Qwen3-TTS behind the family surface described in `finetune.families`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.families.qwen3_tts.family import FAMILY
from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts
from finetune.progress import Package, Phase, ProgressWriter

DEFAULT_TARGETS = list(FAMILY.default_targets)
PRESETS = FAMILY.presets
VARIANTS = FAMILY.variants

__all__ = [
    "DEFAULT_TARGETS",
    "PRESETS",
    "make_tiny",
    "quantize",
    "run_job",
    "smoke_config",
    "train",
]


def make_tiny(
    out_dir: Path,
    *,
    seed: int = 0,
    preset: str = "tiny",
    variant: str = "base",
    layout: str = "official",
) -> Path:
    return make_tiny_qwen3_tts(out_dir, variant=variant, seed=seed, preset=preset, layout=layout)


def quantize(src: Path, dst: Path, variant: str) -> Path:
    from finetune.families.qwen3_tts.quantize import quantize_variant

    return quantize_variant(src, dst, variant)


def train(config: TrainConfig, *, progress: ProgressWriter, resume: Path | None = None) -> Any:
    from finetune.families.qwen3_tts import training

    return training.train(config, progress=progress, resume=resume)


def smoke_config(config: TrainConfig, workdir: Path, *, keep_output: bool) -> TrainConfig:
    """The same config on a tiny model and synthetic clips, for a few steps."""
    from finetune.data import synthetic_dataset
    from finetune.smoke import smoke_run

    model = make_tiny_qwen3_tts(workdir / "model", seed=0)
    train_jsonl = synthetic_dataset(
        workdir / "data", 6, seed=0, with_ref=config.model.strategy == "speaker"
    )
    return smoke_run(config, workdir, model=model, train_jsonl=train_jsonl, keep_output=keep_output)


def run_job(spec: Any, config: TrainConfig, progress: ProgressWriter) -> int:
    """Train (resuming), then bake (speaker) or package (language)."""
    from finetune.families.qwen3_tts.bake import bake, write_package
    from finetune.job import train_to_final

    final = train_to_final(config, progress)
    if final is None:
        return 0  # stopped on SIGTERM: the checkpoint is saved, the server decides
    progress.emit(Phase(phase="baking"))
    package = Path(spec.package_dir)
    if config.model.strategy == "speaker":
        bake(config, final, package, name=spec.name, slot=config.speaker.slot, force=True)
    else:
        from finetune.data import read_jsonl
        from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
        from finetune.families.qwen3_tts.training import speaker_ref
        from finetune.lora import read_adapter_config

        base = load_qwen3_tts(config.model.path)
        first = read_jsonl([Path(p) for p in config.data.train], strategy="language")[0]
        write_package(
            package,
            name=spec.name,
            slot=None,
            embedding=None,
            adapter_dir=final,
            adapter_cfg=read_adapter_config(final),
            base=base,
            language=spec.language,
            ref_clip=speaker_ref(first),  # what every line trained on (server/jobs.py)
        )
    progress.emit(Package(path=str(package)))
    return 0


def describe(path: Path) -> Any:
    """The CheckpointDescription of `path` when it is a qwen3_tts checkpoint, else None."""
    from finetune.families.qwen3_tts import describe as checkpoint

    return checkpoint.describe(path)


def load_problems(path: Path) -> list[str]:
    """Every problem the family's loader finds in `path`; [] when it loads."""
    from finetune.families.qwen3_tts import describe as checkpoint

    return checkpoint.load_problems(path)
