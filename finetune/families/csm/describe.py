"""Which CSM distribution a directory holds, read from its files (`voicefoundry doctor`).

The layout `load_csm` reads is mlx-community's (`model.backbone.*` / `model.decoder.*` names,
Sesame's config keys), with a local `mimi/` or Kyutai's Mimi from the hub cache. transformers'
`CsmForConditionalGeneration` layout (`backbone_model.*`, `depth_decoder.*`, the codec inside the
same file) is recognised and reported as one mlx-audio does not load.
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
    weight_files,
)
from finetune.families.csm.checkpoint import MODEL_TYPES
from finetune.families.csm.mimi import MIMI_DIR, MIMI_FILENAME
from finetune.identity import quantization

# Sesame's llama-1B backbone: the one released shape.
RELEASED: dict[tuple[Any, Any], str] = {(2048, 16): "1B"}
TRANSFORMERS_PREFIXES = ("backbone_model.", "depth_decoder.", "codec_model.")


def describe(path: Path) -> CheckpointDescription | None:
    config, _ = read_json(path / "config.json")
    if config is None or config.get("model_type") not in MODEL_TYPES:
        return None
    problems: list[str] = []
    files, index_problems = weight_files(path)
    headers, file_problems = read_tensor_files(files, path)
    problems += index_problems + file_problems
    names = [n for h in headers for n in h.tensors]
    if any(n.startswith(TRANSFORMERS_PREFIXES) for n in names):
        layout = "transformers"
        problems.append(
            "transformers' CsmForConditionalGeneration layout: mlx-audio (and so voicefoundry) "
            "loads the mlx-community layout (model.backbone.* / model.decoder.*) only"
        )
    elif not names or any(n.startswith(("model.backbone.", "backbone.")) for n in names):
        layout = "mlx-community"
    else:
        layout = "unknown"
        problems.append(f"unrecognised weight names, e.g. {', '.join(sorted(names)[:3])}")

    mimi_dir = path / MIMI_DIR
    if mimi_dir.exists():
        mimi = f"{MIMI_DIR}/ (local)"
        _, mimi_problems = read_tensor_files([mimi_dir / MIMI_FILENAME], path)
        problems += mimi_problems
    else:
        mimi = "Kyutai's Mimi from the local hub cache"
    dtypes = stored_dtypes(headers)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    size = RELEASED.get((hidden, layers), f"custom (backbone hidden {hidden}, {layers} layers)")
    details: dict[str, Any] = {
        "backbone_flavor": config.get("backbone_flavor"),
        "decoder_flavor": config.get("decoder_flavor"),
        "audio_num_codebooks": config.get("audio_num_codebooks"),
        "mimi": mimi,
        "text_tokenizer": config.get("text_tokenizer"),
        "config_dtype": config.get("torch_dtype"),
        "stored_dtypes": dtypes,
        "weight_files": [h.path.name for h in headers],
    }
    return CheckpointDescription(
        family="csm",
        layout=layout,
        variant="Base",  # Sesame released one CSM variant
        size=size,
        dtype=main_float_dtype(dtypes),
        quantization=quantization_summary(quantization(path)),
        details=details,
        problems=problems,
    )


def load_problems(path: Path) -> list[str]:
    """Every problem `load_csm` (the server's and the trainer's loader) finds; [] when it loads."""
    from finetune.families.csm.checkpoint import load_csm
    from finetune.loading import CheckpointError

    try:
        load_csm(path)
    except CheckpointError as exc:
        return list(exc.problems)
    return []
