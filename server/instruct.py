"""A request's instruct (`/speak` `instruct`, OpenAI `instructions`) against the voice it names.

Which models take one is the family's knowledge (`SpeechModel.instruct_use`): "style" (a
CustomVoice checkpoint: how its speakers speak) or "design" (VoiceDesign: the voice itself,
described, so a request in its voice must send one). Everything else is a 422 naming the voices
that do take one.
"""

from __future__ import annotations

from typing import Any

from server.errors import Unprocessable
from server.registry import Voice

LISTED = 12  # voices named in a refusal; the problem's `voices` field has them all


def instruct_voices(service: Any) -> list[str]:
    """Every voice whose model takes an instruct (`service`: the VoiceService)."""
    models = {
        name for name, model in service.engine.models.items() if model.instruct_use() is not None
    }
    return [v.name for v in service.list() if v.base_model in models]


def checked_instruct(service: Any, voice: Voice, instruct: str | None, field: str) -> str | None:
    """The instruct to condition on (None: none), or a 422 saying why it cannot be.
    Runs off the event loop (it lists the registry)."""
    text = instruct.strip() if instruct is not None else ""
    model = service.engine.models.get(voice.base_model)
    use = model.instruct_use() if model is not None else None
    if use == "design" and not text:
        raise Unprocessable(
            f"voice {voice.name!r} is VoiceDesign model {voice.base_model!r}: describe the "
            f'voice to speak in with {field} (e.g. "a warm, low male voice, speaking slowly")'
        )
    if text and use is None:
        voices = instruct_voices(service)
        named = ", ".join(voices[:LISTED]) + (", ..." if len(voices) > LISTED else "")
        raise Unprocessable(
            f"voice {voice.name!r} (model {voice.base_model!r}) takes no {field}: only "
            "Qwen3-TTS CustomVoice (1.7B) and VoiceDesign models do; "
            + (f"voices that do: {named}" if voices else "none is loaded here"),
            voices=voices,
        )
    return text or None
