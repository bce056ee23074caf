"""The demo mode's duplex part: a tiny PersonaPlex and its duplex voices (`demo-duplex` and
PersonaPlex's prompt names), built offline once."""

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
# NVIDIA's voice prompt set (its web client offers `NAME.pt`; natural / variety, female / male).
PROMPT_VOICES = (
    *(f"NATF{i}" for i in range(4)),
    *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)),
    *(f"VARM{i}" for i in range(5)),
)


def ensure_demo_duplex_model(data: Path) -> Path:
    from server.demo import _finetune

    path = data / "models" / DEMO_DUPLEX_MODEL
    if not (path / "config.json").is_file():
        _finetune("make-tiny", "personaplex", str(path), "--seed", "0")
    return path


async def ensure_demo_duplex_voice(voices: VoiceService) -> list[Voice]:
    """`demo-duplex` and PersonaPlex's prompt names (NATF0..., see PROMPT_VOICES), each a voice
    prompt (a gliding tone at its own pitch) and a default text prompt; no adapter. The
    PersonaPlex web client's default `voice_prompt=NATF0.pt` finds `natf0`."""
    made = []
    names = [DEMO_DUPLEX_VOICE, *(n.lower() for n in PROMPT_VOICES)]
    for index, name in enumerate(names):
        if voices.registry.exists(name):
            continue
        made.append(await _import_prompt_voice(voices, name, 180.0 + 15.0 * index))
    return made


async def _import_prompt_voice(voices: VoiceService, name: str, pitch: float) -> Voice:
    from finetune.audio import write_wav

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp)
        t = np.arange(24_000 * 2) / 24_000
        write_wav(package / "voice_prompt.wav", (0.2 * np.sin(2 * np.pi * (pitch + 40 * t) * t)))
        meta = {
            "format": "voicefoundry.voice/1",
            "family": "personaplex",
            "kind": "duplex",
            "strategy": "duplex",
            "name": name,
            "adapter": None,
            "voice_prompt": "voice_prompt.wav",
            "text_prompt": DEMO_TEXT_PROMPT,
            "source": "demo",
        }
        (package / "voice.json").write_text(json.dumps(meta))
        return await voices.import_package(
            pack_directory(package), name=name, base_model=DEMO_DUPLEX_MODEL
        )
