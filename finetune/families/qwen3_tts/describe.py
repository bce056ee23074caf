"""Which Qwen3-TTS distribution a directory holds, read from its files (`voicefoundry doctor`).

- layout: `official` (the QwenLM release: HF names, PyTorch conv layout, safetensors `format: pt`)
  or `mlx-community` (mlx-audio's converter: MLX names, `format: mlx`, quantised ones too);
- variant: `tts_model_type` (Base / CustomVoice / VoiceDesign) and the 0.6B / 1.7B shape from the
  talker's width;
- quantisation (config.json's `quantization`) and the dtype the weights are stored in.

Every problem seen on the way is listed; loading (the loader's own checks) comes after.
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
from finetune.identity import quantization

VARIANT_NAMES = {"base": "Base", "custom_voice": "CustomVoice", "voice_design": "VoiceDesign"}
# The talker's hidden size of each released shape (the code predictor is 1024 wide in both).
SHAPES = {1024: "0.6B", 2048: "1.7B"}
LAYOUT_BY_FORMAT = {"pt": "official", "mlx": "mlx-community"}
TEXT_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def describe(path: Path) -> CheckpointDescription | None:
    config, _ = read_json(path / "config.json")
    if config is None or config.get("model_type") != "qwen3_tts":
        return None
    problems: list[str] = []
    talker = config.get("talker_config")
    if not isinstance(talker, dict):
        problems.append("config.json has no talker_config object")
        talker = {}
    files, index_problems = weight_files(path)
    headers, file_problems = read_tensor_files(files, path)
    problems += index_problems + file_problems
    formats = sorted({h.format or "none" for h in headers})
    quant = quantization_summary(quantization(path))
    layout = _layout(formats, quant)
    if layout.startswith("unknown") and headers:  # unreadable weights are listed already
        problems.append(f"cannot tell the layout: model weights have format {formats}")
    elif layout == "official" and quant is not None:
        problems.append("config.json says quantised but the weights are in the official layout")

    model_type = str(config.get("tts_model_type", "base"))
    variant = VARIANT_NAMES.get(model_type)
    if variant is None:
        problems.append(f"tts_model_type {model_type!r} is none of {', '.join(VARIANT_NAMES)}")
        variant = model_type
    problems += _speech_tokenizer_problems(path / "speech_tokenizer")
    if not any(all((path / f).is_file() for f in group) for group in TEXT_TOKENIZER_FILES):
        problems.append("no text tokenizer (vocab.json + merges.txt, or tokenizer.json)")

    dtypes = stored_dtypes(headers)
    details: dict[str, Any] = {
        "tts_model_size": config.get("tts_model_size"),
        "talker": {
            "hidden_size": talker.get("hidden_size"),
            "layers": talker.get("num_hidden_layers"),
        },
        "config_dtype": config.get("torch_dtype"),
        "stored_dtypes": dtypes,
        "weight_files": [h.path.name for h in headers],
    }
    speakers = talker.get("spk_id")
    if isinstance(speakers, dict) and speakers:
        details["speakers"] = sorted(speakers)
    return CheckpointDescription(
        family="qwen3_tts",
        layout=layout,
        variant=variant,
        size=_size(talker),
        dtype=main_float_dtype(dtypes) or _str_or_none(config.get("torch_dtype")),
        quantization=quant,
        details=details,
        problems=problems,
    )


def _layout(formats: list[str], quant: dict[str, Any] | None) -> str:
    layouts = {LAYOUT_BY_FORMAT.get(f) for f in formats}
    if len(layouts) == 1 and None not in layouts:
        return str(layouts.pop())
    if quant is not None:
        return "mlx-community"  # only the converter writes quantised Qwen3-TTS weights
    return f"unknown (weights formats {formats})" if formats else "unknown (no readable weights)"


def _size(talker: dict[str, Any]) -> str:
    hidden, layers = talker.get("hidden_size"), talker.get("num_hidden_layers")
    if hidden in SHAPES and layers == 28:
        return SHAPES[hidden]
    return f"custom (talker hidden {hidden}, {layers} layers)"


def _speech_tokenizer_problems(speech_dir: Path) -> list[str]:
    if not speech_dir.is_dir():
        return ["speech_tokenizer/ is missing"]
    problems = []
    _, problem = read_json(speech_dir / "config.json")
    if problem is not None:
        problems.append(f"speech_tokenizer/{problem}")
    files = sorted(speech_dir.glob("*.safetensors"))
    if not files:
        problems.append("speech_tokenizer/ holds no .safetensors weights")
    _, file_problems = read_tensor_files(files, speech_dir.parent)
    return problems + file_problems


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def load_problems(path: Path) -> list[str]:
    """Every problem `load_qwen3_tts` (the server's and the trainer's loader) finds."""
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.loading import CheckpointError

    try:
        load_qwen3_tts(path)
    except CheckpointError as exc:
        return list(exc.problems)
    return []
