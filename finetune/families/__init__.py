"""One package per model family: checkpoint loading, tiny models, layout, loss, LoRA scope, bake.

Each family package has an `entry` module with the same small surface, so the CLI, the job
runner and the trainer dispatch on `model.family` without knowing any family:

- `DEFAULT_TARGETS`: LoRA target patterns used when a config names none;
- `PRESETS`: the `make-tiny --preset` names;
- `make_tiny(out_dir, *, seed, preset, variant) -> Path`;
- `train(config, *, progress, resume) -> TrainResult`;
- `smoke_config(config, workdir, *, keep_output) -> TrainConfig` (tiny model + synthetic data);
- `run_job(spec, config, progress) -> int` (what `python -m finetune run-job` runs).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = ("qwen3_tts", "csm", "personaplex")


def family_entry(family: str) -> ModuleType:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"finetune.families.{family}.entry")
