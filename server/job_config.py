"""A fine-tune job's training config: the family's tested recipe (configs/*.yaml), with the
request's fields applied within the service's bounds.

The recipe's effective batch (batch_size x grad_accumulation) is kept when a request changes
the batch size, unless the request also names grad_accumulation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from finetune.families import get_family

# Checkpoints a job keeps (for resume after a restart, and the quality report): a save every
# this many steps at most, whatever the recipe says for long offline runs.
JOB_SAVE_EVERY = 50
JOB_KEEP_CHECKPOINTS = 2


def job_train_config(
    *,
    family: str,
    strategy: str,
    model_path: str | Path,
    train_jsonl: Path,
    output_dir: Path,
    voice_name: str,
    hyper: dict[str, Any],
    clip_seconds: tuple[float, float],
) -> dict[str, Any]:
    config = copy.deepcopy(get_family(family).recipe(strategy))
    config["model"] = {"path": str(model_path), "family": family, "strategy": strategy}
    recipe_data = config.get("data") or {}
    config["data"] = {
        "train": [str(train_jsonl)],
        "min_duration_s": max(clip_seconds[0], recipe_data.get("min_duration_s", 0.0)),
        "max_duration_s": min(clip_seconds[1], recipe_data.get("max_duration_s", clip_seconds[1])),
    }
    lora = config.setdefault("lora", {})
    if "lora_rank" in hyper:
        lora["rank"] = hyper["lora_rank"]
        lora["alpha"] = 2.0 * hyper["lora_rank"]
    if "lora_dropout" in hyper:
        lora["dropout"] = hyper["lora_dropout"]
    if "train_code_predictor" in hyper:
        lora["train_code_predictor"] = hyper["train_code_predictor"]
    csm = config.get("csm")
    if csm is not None:  # the recipe has a depth decoder: CSM's counterpart of the predictor
        if "train_code_predictor" in hyper:
            csm["train_decoder"] = hyper["train_code_predictor"]
        if "decoder_frame_fraction" in hyper:
            csm["decoder_frame_fraction"] = hyper["decoder_frame_fraction"]
    trainer = config.setdefault("trainer", {})
    effective = trainer.get("batch_size", 1) * trainer.get("grad_accumulation", 1)
    if "batch_size" in hyper:
        trainer["batch_size"] = hyper["batch_size"]
        trainer["grad_accumulation"] = max(1, round(effective / hyper["batch_size"]))
    if "grad_accumulation" in hyper:
        trainer["grad_accumulation"] = hyper["grad_accumulation"]
    for field, key in (
        ("learning_rate", "learning_rate"),
        ("epochs", "num_epochs"),
        ("max_steps", "max_steps"),
        ("label_smoothing", "label_smoothing"),
    ):
        if field in hyper:
            trainer[key] = hyper[field]
    trainer["save_every"] = hyper.get(
        "save_every", min(trainer.get("save_every") or JOB_SAVE_EVERY, JOB_SAVE_EVERY)
    )
    trainer["keep_checkpoints"] = JOB_KEEP_CHECKPOINTS
    trainer["eval_every"] = 0  # a job has no validation split
    if "speaker" in config or strategy == "speaker":
        config["speaker"] = {**(config.get("speaker") or {}), "name": voice_name}
    config["output_dir"] = str(output_dir)
    return config
