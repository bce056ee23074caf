"""Request and response bodies (msgspec Structs; unknown fields are refused)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from server.audio_formats import FORMATS


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# Bounds of the sampling fields: a request outside them is a 422 naming the field (the engine
# keys its PRNG with the seed, which must fit 32 bits; absurd values would stall or crash it).
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Temperature = Annotated[float, Meta(ge=0.0, le=10.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1_000_000)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=1_000_000)]
Speed = Annotated[float, Meta(ge=0.25, le=4.0)]
# What the handlers check themselves, with their own messages, shown in the OpenAPI document:
# the formats ("MP3 " is read as "mp3"; an unknown one is a 422 naming the allowed ones), a voice
# name (registry.validate_name) and text that is not blank.
FormatName = Annotated[str, Meta(extra_json_schema={"enum": list(FORMATS)})]
VoiceName = Annotated[str, Meta(extra_json_schema={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"})]
Text = Annotated[str, Meta(extra_json_schema={"minLength": 1, "pattern": "\\S"})]
# CustomVoice: how to speak; VoiceDesign: the voice, described (server/instruct.py).
Instruct = Annotated[str, Meta(max_length=2000)]


class SpeakRequest(Strict):
    speaker: VoiceName
    text: Text
    language: str | None = None
    instruct: Instruct | None = None
    format: FormatName = "wav"
    stream: bool = False
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    max_tokens: MaxTokens | None = None


class VoiceRef(Strict):
    """The `openai` package's custom-voice form of `voice`: `{"id": NAME}`."""

    id: VoiceName


class OpenAISpeechRequest(Strict):
    model: str
    input: Text
    voice: VoiceName | VoiceRef
    response_format: FormatName = "mp3"
    speed: Speed = 1.0
    instructions: Instruct | None = None
    # None: the whole file; "audio": its bytes streamed; "sse": OpenAI's speech.audio.* events.
    stream_format: Literal["sse", "audio"] | None = None

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


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
    available: bool = True
    unavailable_reason: str | None = None  # why a registered voice could not be restored


class JobOut(msgspec.Struct, kw_only=True):
    """What a client sees of a fine-tune job (never the trainer's pid or server paths)."""

    id: str
    name: str
    state: str
    created_at: str | None = None
    updated_at: str | None = None
    base_model: str | None = None
    strategy: str | None = None
    clips: int | None = None
    step: int = 0
    total_steps: int | None = None
    losses: dict[str, float] = {}
    eta_s: float | None = None
    reason: str | None = None
    note: str | None = None
    voice: str | None = None
    hyper: dict[str, Any] = {}
    log_tail: list[str] = []
    quality: list[dict[str, Any]] = []


class VoiceList(msgspec.Struct):
    voices: list[VoiceOut]


class Health(msgspec.Struct):
    status: str
    models: list[str] = []
