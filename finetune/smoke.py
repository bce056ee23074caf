"""What `train --smoke-test` changes in any family's config: a few fast steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig, TrainerSection

import msgspec

SMOKE_STEPS = 5


def smoke_trainer(section: TrainerSection) -> TrainerSection:
    return msgspec.structs.replace(
        section,
        batch_size=2,
        grad_accumulation=1,
        max_steps=SMOKE_STEPS,
        eval_every=0,
        save_every=0,
        learning_rate=max(section.learning_rate, 1e-3),
        warmup_steps=0,
    )


def smoke_run(
    config: TrainConfig,
    workdir: Path,
    *,
    model: Path,
    train_jsonl: Path,
    keep_output: bool,
    **data: Any,
) -> TrainConfig:
    """`config` pointed at a tiny model and synthetic clips (`val.jsonl` beside `train_jsonl`
    when there is one), with the smoke trainer; `data` overrides other data fields."""
    val_jsonl = train_jsonl.with_name("val.jsonl")
    return msgspec.structs.replace(
        config,
        model=msgspec.structs.replace(config.model, path=str(model)),
        data=msgspec.structs.replace(
            config.data,
            train=[str(train_jsonl)],
            val=[str(val_jsonl)] if val_jsonl.exists() else [],
            **data,
        ),
        trainer=smoke_trainer(config.trainer),
        output_dir=config.output_dir if keep_output else str(Path(workdir) / "out"),
    )
