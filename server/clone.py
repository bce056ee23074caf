"""`POST /voices` with `strategy=clone`: a voice from one reference clip, no training.

The upload is read as fine-tune uploads are (server/uploads.py) and its clip checked by the job
intake's own rules (server/jobs/intake.py: an audio file, decodable, refused from its header when
too long), within the clone's 2-30 s. With the clip's transcript (`ref_text`) the model clones in
context (ICL), else from the clip's speaker embedding; whether a model can clone either way is
its family's answer (`SpeechModel.prepare_clone`), and the voice's `meta.clone` says which.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from litestar.datastructures import State
from msgspec import Meta

from server.errors import Unprocessable
from server.jobs.intake import checked_audio
from server.registry import Voice, validate_name
from server.uploads import Upload

CLONE_STRATEGY = "clone"
MIN_REF_S, MAX_REF_S = 2.0, 30.0
MAX_REF_TEXT_CHARS = 2000
CLONE_FIELDS = frozenset({"name", "strategy", "base_model", "language", "ref_text"})


def clone_form_fields() -> list[tuple[str, Any]]:
    """The clone's own multipart fields beyond the job form's (its clip is the form's `ref`)."""
    ref_text = Annotated[
        str,
        Meta(
            max_length=MAX_REF_TEXT_CHARS,
            description="strategy=clone: the reference clip's transcript (in-context cloning)",
        ),
    ]
    return [("ref_text", ref_text)]


async def create_clone_voice(state: State, upload: Upload) -> Voice:
    """Check the upload, then register and prepare the voice; every refusal a 4xx."""
    fields = upload.fields
    name = validate_name(fields.get("name", ""))
    await anyio.to_thread.run_sync(state.jobs.intake.check_name_free, name)
    stray = sorted(set(fields) - CLONE_FIELDS) + sorted({f.field for f in upload.files} - {"ref"})
    if stray:
        raise Unprocessable(
            f"the clone strategy takes one clip 'ref' and the fields "
            f"{', '.join(sorted(CLONE_FIELDS))}; not: {', '.join(stray)}"
        )
    refs = upload.files_of("ref")
    if len(refs) != 1:
        raise Unprocessable(
            f"the clone strategy takes exactly one reference clip 'ref' ({len(refs)} sent)"
        )
    base_model = _base_model(state, fields.get("base_model") or "")
    ref_text = (fields.get("ref_text") or "").strip() or None
    if ref_text is not None and len(ref_text) > MAX_REF_TEXT_CHARS:
        raise Unprocessable(f"ref_text is longer than {MAX_REF_TEXT_CHARS} characters")
    wav = await anyio.to_thread.run_sync(checked_audio, refs[0])
    seconds = len(wav) / 24_000
    if not MIN_REF_S <= seconds <= MAX_REF_S:
        raise Unprocessable(
            f"{refs[0].filename}: {seconds:.2f} s; a clone's reference clip is "
            f"{MIN_REF_S:g}-{MAX_REF_S:g} s"
        )
    clip = await anyio.to_thread.run_sync(refs[0].path.read_bytes)
    try:
        return await state.voices.add_clone(
            name, base_model, clip, fields.get("language") or None, ref_text=ref_text
        )
    except ValueError as exc:  # the family cannot clone (that way)
        raise Unprocessable(str(exc)) from exc


def _base_model(state: State, wanted: str) -> str:
    models = state.engine.models
    if not wanted:
        if len(models) != 1:
            raise Unprocessable(
                "several speech models are loaded: name base_model "
                f"(one of {', '.join(sorted(models))})"
            )
        return str(next(iter(models)))
    if wanted not in models:
        raise Unprocessable(
            f"unknown speech base model {wanted!r}; loaded: {', '.join(sorted(models)) or 'none'}"
        )
    return wanted
