"""Request and response bodies (msgspec Structs; unknown fields are refused)."""

from __future__ import annotations

from typing import Any

import msgspec


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SpeakRequest(Strict):
    speaker: str
    text: str
    language: str | None = None
    instruct: str | None = None
    format: str = "wav"
    stream: bool = False
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None


class OpenAISpeechRequest(Strict):
    model: str
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str | None = None


class VoiceOut(msgspec.Struct, kw_only=True):
    name: str
    base_model: str
    kind: str
    slot: int | None = None
    has_adapter: bool = False
    has_ref_clip: bool = False
    default_language: str | None = None
    created_at: str | None = None
    meta: dict[str, Any] = {}


class VoiceList(msgspec.Struct):
    voices: list[VoiceOut]


class Health(msgspec.Struct):
    status: str
    models: list[str] = []
