"""The demo mode's duplex part: a tiny PersonaPlex and one duplex voice, built offline once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from server.registry import Voice
from server.voices import VoiceService, pack_directory

DEMO_DUPLEX_MODEL = "personaplex-tiny"
DEMO_DUPLEX_VOICE = "demo-duplex"
DEMO_TEXT_PROMPT = "You are a friendly assistant. Answer briefly."


def ensure_demo_duplex_model(data: Path) -> Path:
    from server.demo import _finetune

    path = data / "models" / DEMO_DUPLEX_MODEL
    if not (path / "config.json").is_file():
        _finetune("make-tiny", "personaplex", str(path), "--seed", "0")
    return path


async def ensure_demo_duplex_voice(voices: VoiceService) -> Voice | None:
    """A voice prompt (a gliding tone) and a default text prompt; no adapter."""
    if voices.registry.exists(DEMO_DUPLEX_VOICE):
        return None
    from finetune.audio import write_wav

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp)
        t = np.arange(24_000 * 2) / 24_000
        write_wav(package / "voice_prompt.wav", (0.2 * np.sin(2 * np.pi * (180 + 40 * t) * t)))
        meta = {
            "format": "voicefoundry.voice/1",
            "family": "personaplex",
            "kind": "duplex",
            "strategy": "duplex",
            "name": DEMO_DUPLEX_VOICE,
            "adapter": None,
            "voice_prompt": "voice_prompt.wav",
            "text_prompt": DEMO_TEXT_PROMPT,
            "source": "demo",
        }
        (package / "voice.json").write_text(json.dumps(meta))
        return await voices.import_package(
            pack_directory(package), name=DEMO_DUPLEX_VOICE, base_model=DEMO_DUPLEX_MODEL
        )
