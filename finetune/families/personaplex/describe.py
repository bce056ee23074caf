"""Which PersonaPlex distribution a directory holds, read from its files (`voicefoundry doctor`).

NVIDIA's release (`nvidia/personaplex-7b-v1`) is one layout: the LM in PyTorch Moshi names
(`model.safetensors`), Kyutai's Mimi file, the SentencePiece model, and a `config.json` in
Kyutai's flat keys (or none: the real 7B dims). A directory is PersonaPlex's when its config says
so (`model_type: personaplex`), or, without one, when it holds the release's Mimi and tokenizer
files by their names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.checkpoint_info import (
    CheckpointDescription,
    main_float_dtype,
    quantization_summary,
    read_json,
    read_tensor_files,
    stored_dtypes,
)
from finetune.families.personaplex.layout import (
    CONFIG_NAME,
    MIMI_NAME,
    MOSHI_NAME,
    TEXT_TOKENIZER_NAME,
    real_lm_config_dict,
)
from finetune.identity import quantization

MODEL_TYPE = "personaplex"


def describe(path: Path) -> CheckpointDescription | None:
    config, config_problem = read_json(path / CONFIG_NAME)
    release_files = (path / MIMI_NAME).is_file() or (path / TEXT_TOKENIZER_NAME).is_file()
    if config is not None and config.get("model_type") not in (None, MODEL_TYPE):
        return None
    if not release_files and (config is None or config.get("model_type") != MODEL_TYPE):
        return None
    problems: list[str] = []
    if config is None and (path / CONFIG_NAME).exists():
        problems.append(str(config_problem))
    dims = real_lm_config_dict()
    if config is not None and "dim" in config:
        dims = config
    files = [
        path / str(dims.get("moshi_name", MOSHI_NAME)),
        path / str(dims.get("mimi_name", MIMI_NAME)),
    ]
    headers, file_problems = read_tensor_files(files, path)
    problems += file_problems
    spm = path / str(dims.get("tokenizer_name", TEXT_TOKENIZER_NAME))
    if not spm.is_file():
        problems.append(f"{spm.name} is missing")
    lm_headers = [h for h in headers if h.path == files[0]]
    dtypes = stored_dtypes(lm_headers)
    real = real_lm_config_dict()
    shape_keys = ("dim", "num_layers", "depformer_dim", "depformer_num_layers")
    shape = {k: dims.get(k) for k in shape_keys}
    size = "7B" if all(shape[k] == real[k] for k in shape_keys) else f"custom ({_dims(shape)})"
    details: dict[str, Any] = {
        "config": "config.json" if config is not None else "none (the real 7B dims)",
        "dep_q": dims.get("dep_q"),
        **shape,
        "stored_dtypes": dtypes,
        "weight_files": [h.path.name for h in headers],
    }
    preset = (config or {}).get("model_id")
    if isinstance(preset, dict) and "preset" in preset:
        details["make_tiny_preset"] = preset["preset"]
    return CheckpointDescription(
        family="personaplex",
        layout="release",
        variant="duplex",
        size=size,
        dtype=main_float_dtype(dtypes),
        quantization=quantization_summary(quantization(path)) if config else None,
        details=details,
        problems=problems,
    )


def _dims(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def load_problems(path: Path) -> list[str]:
    """Every problem `load_personaplex` (the server's and the trainer's loader) finds."""
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.loading import CheckpointError

    try:
        load_personaplex(path)
    except CheckpointError as exc:
        return list(exc.problems)
    return []
