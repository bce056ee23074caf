"""Request bodies in the OpenAPI document, for the routes that read their own bodies.

`/speak` and `/v1/audio/speech` read JSON through a bounded reader (413 as soon as a body passes
`max_json_bytes`, while it streams) and `POST /voices`, `POST /voices/import` stream multipart to
disk. Declaring `data: SpeakRequest` would make Litestar read the body whole before our cap, so
the handlers keep reading and each names an `operation_class` from here: it puts the body's
JSON schema, generated from the same msgspec types the handler decodes with (bounds included),
into the served document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from finetune.families import all_strategies

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody
from msgspec import UNSET, Meta, UnsetType

from server.clone import CLONE_STRATEGY, clone_form_fields
from server.design import DESIGN_STRATEGY, design_form_fields
from server.jobs.intake import BOUNDS, FLAGS, MAX_TEXT_PROMPT_CHARS
from server.schemas import VoiceName

# A multipart file part: OpenAPI's binary string (msgspec's `bytes` would say base64 text).
File = Annotated[str, Meta(extra_json_schema={"format": "binary"})]
Flag = Annotated[str, Meta(extra_json_schema={"enum": ["true", "false"]})]
Transcripts = Annotated[str, Meta(description="JSON object: clip file name -> its text")]


class VoiceImportForm(msgspec.Struct, kw_only=True):
    """`POST /voices/import`: a voice package made by `voicefoundry bake`."""

    package: Annotated[File, Meta(description="the .tar.gz / .zip package")]
    name: VoiceName | UnsetType = UNSET
    base_model: str | UnsetType = UNSET
    ref_clip: File | UnsetType = UNSET


def _job_form() -> type[msgspec.Struct]:
    """`POST /voices`: fields and files of a fine-tune job; the overrides carry their bounds
    from the job intake's own table, so the document cannot drift from what it checks."""
    strategies = [*all_strategies(), DESIGN_STRATEGY, CLONE_STRATEGY]
    strategy = Annotated[str, Meta(extra_json_schema={"enum": strategies})]
    clips = Annotated[
        list[File], Meta(description="audio clips (and .txt transcripts): the fine-tune strategies")
    ]
    text_prompt = Annotated[str, Meta(max_length=MAX_TEXT_PROMPT_CHARS)]
    fields: list[Any] = [("name", VoiceName)]
    optional: list[tuple[str, Any]] = [
        ("clips", clips),
        ("base_model", str),
        ("strategy", strategy),
        ("language", str),
        ("transcripts", Transcripts),
        ("ref", list[File]),
        ("user_clips", list[File]),
        ("text_prompt", text_prompt),
    ]
    optional += [(k, Annotated[kind, Meta(ge=lo, le=hi)]) for k, (kind, lo, hi) in BOUNDS.items()]
    optional += [(key, Flag) for key in FLAGS]
    optional += design_form_fields()  # strategy=design: no training (server/design.py)
    optional += clone_form_fields()  # strategy=clone: no training (server/clone.py)
    fields += [(key, kind | UnsetType, UNSET) for key, kind in optional]
    return msgspec.defstruct("VoiceJobForm", fields, kw_only=True)


VoiceJobForm = _job_form()


def inline_schema(kind: Any) -> dict[str, Any]:
    """`kind`'s JSON schema with every `$defs` reference resolved in place."""
    schema = msgspec.json.schema(kind)
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def body_operation(kind: Any, media_type: str, description: str) -> type[Operation]:
    """An `operation_class` whose document shows `kind` as the required request body."""
    body = RequestBody(
        content={media_type: OpenAPIMediaType(schema=inline_schema(kind))},  # type: ignore[arg-type]
        description=description,
        required=True,
    )

    @dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    BodyOperation.__name__ = f"{getattr(kind, '__name__', 'Body')}Operation"
    return BodyOperation


def json_body(kind: Any) -> type[Operation]:
    return body_operation(
        kind,
        "application/json",
        "JSON; a body over the server's max_json_bytes is a 413 before it is read whole",
    )


def multipart_body(kind: Any) -> type[Operation]:
    return body_operation(
        kind,
        "multipart/form-data",
        "multipart/form-data, streamed to disk; over the server's max_upload_bytes: 413",
    )
