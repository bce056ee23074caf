"""`GET /voice-form`: what `POST /voices` accepts on this server, for a form to offer.

The loaded models with the strategies each can fine-tune (its family's tested recipes) and the
least audio a job of each needs, the models an instant clone can start from, the clip lengths,
and every hyper-parameter with its type and bounds: all read from the same tables the intake
(server/jobs/intake.py) and the clone (server/clone.py) check against, so a form built from this
cannot offer what the server would refuse.
"""

from __future__ import annotations

from finetune.families import get_family

import anyio
import msgspec
from litestar import get
from litestar.datastructures import State

from server import admission
from server.clone import MAX_REF_S, MAX_REF_TEXT_CHARS, MIN_REF_S
from server.jobs.intake import BOUNDS, FLAGS, MAX_CLIP_S, MAX_TEXT_PROMPT_CHARS, MIN_CLIP_S


class Bound(msgspec.Struct):
    type: str  # "int" or "float"
    min: float
    max: float


class FormModel(msgspec.Struct):
    name: str
    family: str
    title: str  # the family's name people know
    engine: str  # "speech" (/speak) or "duplex" (/duplex)
    strategies: list[str]  # those it has a tested recipe for
    min_job_seconds: dict[str, float]  # strategy -> the least audio (all clips) a job needs


class CloneForm(msgspec.Struct):
    models: list[str]  # the speech models a clone may start from
    min_seconds: float
    max_seconds: float
    max_text_chars: int


class VoiceForm(msgspec.Struct):
    models: list[FormModel]
    clone: CloneForm
    clip_seconds: tuple[float, float]  # each fine-tune clip
    bounds: dict[str, Bound]
    flags: list[str]  # booleans: "true" / "false"
    max_text_prompt_chars: int
    max_upload_bytes: int


def voice_form(state: State) -> VoiceForm:
    least = state.settings.job_min_total_seconds
    models = []
    for name, model in sorted(state.voices.served_models().items()):
        family = get_family(model.family)
        strategies = [s for s in family.strategies if s in family.recipes]
        models.append(
            FormModel(
                name=name,
                family=family.name,
                title=family.title,
                engine=family.engine,
                strategies=strategies,
                min_job_seconds={
                    s: family.job_seconds(s) if least is None else least for s in strategies
                },
            )
        )
    bounds = {
        key: Bound(type=kind.__name__, min=low, max=high)
        for key, (kind, low, high) in BOUNDS.items()
    }
    return VoiceForm(
        models=models,
        clone=CloneForm(
            models=sorted(state.engine.models),
            min_seconds=MIN_REF_S,
            max_seconds=MAX_REF_S,
            max_text_chars=MAX_REF_TEXT_CHARS,
        ),
        clip_seconds=(MIN_CLIP_S, MAX_CLIP_S),
        bounds=bounds,
        flags=list(FLAGS),
        max_text_prompt_chars=MAX_TEXT_PROMPT_CHARS,
        max_upload_bytes=state.settings.max_upload_bytes,
    )


@get(
    "/voice-form",
    guards=[admission.guard("admin")],
    summary="What POST /voices accepts here: models, strategies, clip lengths, bounds",
)
async def get_voice_form(state: State) -> VoiceForm:
    return await anyio.to_thread.run_sync(voice_form, state)
