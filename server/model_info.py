"""`GET /models`: what each loaded speech model takes, for clients that build a request form
(the web console's playground): its languages, whether and how it takes an instruct, its
builtin speakers, and the audio formats this server can encode.

`GET /v1/models` answers OpenAI's shape (ids only); this says what a `/speak` request may send.
"""

from __future__ import annotations

import msgspec
from litestar import get
from litestar.datastructures import State

from server import admission, audio_formats
from server.engine.family import SpeechModel


class ModelInfo(msgspec.Struct, kw_only=True):
    name: str
    family: str
    # Language names `/speak` `language` conditions on ([]: the model takes none, e.g. CSM).
    # A voice may bring more (its meta's `language_rows`).
    languages: list[str]
    # What `/speak` `instruct` does: "style" (how its speakers speak), "design" (the voice
    # itself, described: required); None: the model takes none (a request with one is a 422).
    instruct: str | None
    speakers: list[str]
    sample_rate: int


class ModelInfoList(msgspec.Struct, kw_only=True):
    models: list[ModelInfo]
    formats: list[str]  # what this server can encode (`/speak` `format`)
    streamable: list[str]  # of those, what `stream: true` takes


def model_info(name: str, model: SpeechModel) -> ModelInfo:
    return ModelInfo(
        name=name,
        family=model.family,
        languages=model.languages(),
        instruct=model.instruct_use(),
        speakers=list(model.builtin_speakers()),
        sample_rate=int(model.sample_rate),
    )


@get(
    "/models",
    guards=[admission.guard("speak")],
    summary="The loaded speech models: languages, instruct, speakers; the encodable formats",
)
async def list_model_info(state: State) -> ModelInfoList:
    models = state.engine.models
    formats = list(audio_formats.available_formats())
    return ModelInfoList(
        models=[model_info(name, models[name]) for name in sorted(models)],
        formats=formats,
        streamable=[f for f in formats if f in audio_formats.STREAMABLE],
    )
