"""The duplex voice package: what the server hot-loads for a PersonaPlex voice.

    <package>/voice.json          {"format": "voicefoundry.voice/1", "family": "personaplex",
                                   "kind": "duplex", "strategy": "duplex", "name", "adapter",
                                   "voice_prompt", "text_prompt", "base_model", "created_at"}
    <package>/adapter/            adapters.safetensors + adapter_config.json (no optimizer state)
    <package>/voice_prompt.wav    24 kHz mono 16-bit: streamed through Mimi as agent tokens

Written whole or not at all (`atomic_directory`).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from finetune.audio import TARGET_SAMPLE_RATE, load_audio, write_wav
from finetune.fsutil import atomic_directory
from finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

PACKAGE_FORMAT = "voicefoundry.voice/1"
VOICE_FILE = "voice.json"
ADAPTER_DIR = "adapter"
VOICE_PROMPT_FILE = "voice_prompt.wav"


class PackageError(ValueError):
    """A duplex voice package cannot be written from what was given."""


def write_duplex_package(
    out_dir: Path,
    *,
    name: str,
    adapter_dir: Path | None,
    voice_prompt: Path | None,
    text_prompt: str | None,
    base: Any,
) -> Path:
    """Write the package for `base` (a LoadedPersonaPlex); returns `out_dir`.

    `adapter_dir` is a trainer checkpoint or adapter directory (only the adapter files are
    copied); `voice_prompt` any audio file (stored as 24 kHz mono); `text_prompt` the default
    role prompt. Raises PackageError / AdapterError / AudioError on bad inputs.
    """
    from finetune.families.personaplex.training import base_model_info

    if not name or not name.strip():
        raise PackageError("a duplex voice needs a non-empty name")
    if text_prompt is not None and not text_prompt.strip():
        text_prompt = None
    if adapter_dir is not None:
        adapter_cfg = read_adapter_config(adapter_dir)  # AdapterError if it is not an adapter
        if adapter_cfg.get("family") not in (None, "personaplex"):
            raise PackageError(
                f"{adapter_dir}: adapter of family {adapter_cfg.get('family')!r}, not personaplex"
            )
        if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
            raise PackageError(f"{adapter_dir}: {ADAPTER_WEIGHTS} is missing")
    prompt_audio = None
    if voice_prompt is not None:
        prompt_audio = load_audio(voice_prompt, TARGET_SAMPLE_RATE)  # AudioError if unusable

    with atomic_directory(Path(out_dir)) as staging:
        if adapter_dir is not None:
            (staging / ADAPTER_DIR).mkdir()
            for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                shutil.copy2(Path(adapter_dir) / file, staging / ADAPTER_DIR / file)
        if prompt_audio is not None:
            write_wav(staging / VOICE_PROMPT_FILE, prompt_audio, TARGET_SAMPLE_RATE)
        meta = {
            "format": PACKAGE_FORMAT,
            "family": "personaplex",
            "kind": "duplex",
            "strategy": "duplex",
            "name": name.strip(),
            "adapter": ADAPTER_DIR if adapter_dir is not None else None,
            "voice_prompt": VOICE_PROMPT_FILE if prompt_audio is not None else None,
            "text_prompt": text_prompt,
            "base_model": base_model_info(Path(base.path), base.lm),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (staging / VOICE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
