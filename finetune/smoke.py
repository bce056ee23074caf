"""What `train --smoke-test` changes in any family's config: a few fast steps."""

from __future__ import annotations

from finetune.config import TrainerSection

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
