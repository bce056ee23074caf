"""A CSM voice package: what the server hot-loads for a fine-tuned CSM speaker.

    voice.json     {"format": "voicefoundry.voice/1", "family": "csm", "kind": "adapter",
                    "strategy", "name", "speaker_id", "adapter": "adapter",
                    "context": [{"audio": "context_00.wav", "text": ...}], "base_model", ...}
    adapter/       adapters.safetensors + adapter_config.json (no optimizer or trainer state)
    context_NN.wav the clips (with their transcripts) training prefixed every example with:
                   Sesame's conversation context, prepended to every prompt of this voice. Copied
                   byte for byte (the source's suffix kept), so the server decodes the very
                   samples whose Mimi codes training used.

Written whole or not at all (built beside the target, then renamed).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.audio import load_audio
from finetune.families.csm.checkpoint import FAMILY
from finetune.fsutil import atomic_directory
from finetune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PACKAGE_FORMAT = "voicefoundry.voice/1"
VOICE_FILE = "voice.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class ContextSource:
    """A clip (any format / rate the audio loader reads) and its transcript."""

    audio: Path
    text: str


def write_package(
    output: Path,
    *,
    name: str,
    speaker_id: int,
    adapter_dir: Path,
    adapter_cfg: dict[str, Any],
    context: list[ContextSource],
) -> Path:
    with atomic_directory(Path(output)) as staging:
        (staging / ADAPTER_DIR).mkdir()
        for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(Path(adapter_dir) / file, staging / ADAPTER_DIR / file)
        clips = []
        for i, source in enumerate(context):
            load_audio(source.audio)  # an unreadable clip fails the package, not the server
            file = f"context_{i:02d}{Path(source.audio).suffix.lower() or '.wav'}"
            shutil.copyfile(source.audio, staging / file)
            clips.append({"audio": file, "text": source.text})
        meta = {
            "format": PACKAGE_FORMAT,
            "family": FAMILY,
            "kind": "adapter",
            "strategy": adapter_cfg.get("strategy", "speaker"),
            "name": name,
            "speaker_id": int(speaker_id),
            "adapter": ADAPTER_DIR,
            "context": clips,
            "base_model": adapter_cfg.get("base_model", {}),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (staging / VOICE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(output)
