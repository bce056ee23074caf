"""What OpenAI-compatible clients read besides the audio itself.

- `stream_format: "sse"` on `POST /v1/audio/speech` (the handler lives in server/app.py): the
  audio in the requested format, continuous as with `stream_format: "audio"`, cut into OpenAI's
  `speech.audio.delta` events (base64), then one `speech.audio.done` with the usage.
- `GET /v1/models` (and `/v1/models/{model}`): the loaded speech models in OpenAI's list shape.
- `GET /v1/audio/voices`: the voices those models speak, in the shapes the OpenAI-compatible
  speech servers answer (`voices`: names, as Kokoro-FastAPI and vllm-omni; `data`: objects, as
  mlx-audio), optionally for one `model`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Stream

from server import admission, audio_formats
from server.errors import NotFound, ServiceError
from server.registry import Voice

if TYPE_CHECKING:  # server.app imports this module
    from server.app import Synthesis


OWNER = "voicefoundry"
DEFAULT_FRAME_RATE = 12.5  # codec frames a second of every served family


class SpeechUsage(msgspec.Struct):
    """`speech.audio.done`'s usage: `input_tokens` are the input's characters (what the
    service meters per key: its models' text tokenizers differ), `output_tokens` the codec
    frames generated (12.5 a second)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


class ModelOut(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelOut]
    object: str = "list"


class OpenAIVoice(msgspec.Struct):
    id: str
    name: str
    model: str
    kind: str
    created_at: int | None = None
    object: str = "audio.voice"


class OpenAIVoiceList(msgspec.Struct):
    voices: list[str]
    data: list[OpenAIVoice]
    object: str = "list"


# --- stream_format: "sse" ------------------------------------------------------------------
def _event(payload: dict[str, Any]) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()


def _delta(audio: bytes) -> bytes:
    return _event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})


def sse_response(
    synthesis: Synthesis,
    fmt: str,
    characters: int,
    sample_rate: int,
    *,
    metered: admission.Metered,
) -> Stream:
    """The speech as Server-Sent Events. The synthesis must be prepared and not yet submitted.
    A failure after the events began (a budget the engine stopped the request over) ends the
    stream with `speech.audio.error` instead of `speech.audio.done`."""
    encoder = audio_formats.stream_encoder(fmt, sample_rate)
    model = synthesis.engine.models.get(synthesis.job.voicing.model)
    frame_rate = model.frame_rate if model is not None else DEFAULT_FRAME_RATE
    synthesis.submit()

    async def events() -> AsyncIterator[bytes]:
        frames = 0
        try:
            async for chunk in synthesis.chunks():
                metered.add("audio_seconds", len(chunk) / sample_rate)
                frames += len(chunk)
                data = encoder.encode_chunk(chunk)
                if data:
                    yield _delta(data)
            tail = encoder.finish()
            if tail:
                yield _delta(tail)
            output = round(frames / sample_rate * frame_rate)
            usage = SpeechUsage(characters, output, characters + output)
            yield _event({"type": "speech.audio.done", "usage": msgspec.to_builtins(usage)})
        except ServiceError as exc:
            yield _event(
                {
                    "type": "speech.audio.error",
                    "error": {"message": exc.detail, "type": exc.title, "code": exc.status},
                }
            )
        finally:
            encoder.close()
            metered.end()

    iterator = events()
    metered.watch(iterator)  # a body never iterated still frees the slot
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Stream(iterator, media_type="text/event-stream", headers=headers)


# --- discovery -------------------------------------------------------------------------------
def _created(model: Any) -> int:
    """When the checkpoint was written (its directory's mtime); 0 when it has no path."""
    path = getattr(getattr(model, "loaded", None), "path", None)
    try:
        return int(Path(path).stat().st_mtime) if path else 0
    except OSError:
        return 0


def _models(state: State) -> dict[str, ModelOut]:
    models = state.engine.models
    return {name: ModelOut(name, _created(models[name]), OWNER) for name in sorted(models)}


@get("/v1/models", guards=[admission.guard("speak")], summary="The speech models (OpenAI shape)")
async def list_models(state: State) -> ModelList:
    return ModelList(data=list(_models(state).values()))


@get(
    "/v1/models/{model:str}",
    guards=[admission.guard("speak")],
    summary="One speech model (OpenAI shape)",
)
async def get_model(state: State, model: Annotated[str, Parameter()]) -> ModelOut:
    found = _models(state).get(model)
    if found is None:
        raise NotFound(f"unknown model {model!r}; loaded: {', '.join(_models(state)) or 'none'}")
    return found


def _created_at(voice: Voice) -> int | None:
    try:
        return int(datetime.fromisoformat(voice.created_at).timestamp())
    except (TypeError, ValueError):
        return None


@get(
    "/v1/audio/voices",
    guards=[admission.guard("speak")],
    summary="The voices /v1/audio/speech speaks (names and objects)",
)
async def list_openai_voices(
    state: State,
    model: Annotated[
        str | None, Parameter(description="only the voices of this loaded model")
    ] = None,
) -> OpenAIVoiceList:
    loaded = state.engine.models
    if model is not None and model not in loaded:
        raise NotFound(f"unknown model {model!r}; loaded: {', '.join(sorted(loaded)) or 'none'}")
    voices = await anyio.to_thread.run_sync(state.voices.list)
    unavailable = state.voices.unavailable
    speaking = [
        v
        for v in voices
        if v.base_model in loaded
        and v.name not in unavailable
        and (model is None or v.base_model == model)
    ]
    data = [OpenAIVoice(v.name, v.name, v.base_model, v.kind, _created_at(v)) for v in speaking]
    return OpenAIVoiceList(voices=[v.id for v in data], data=data)


ROUTES = (list_models, get_model, list_openai_voices)
