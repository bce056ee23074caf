"""The Litestar application: `create_app(settings)`; the lifespan loads models and services."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import msgspec
import numpy as np
from litestar import Litestar, Request, Response, Router, delete, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.params import Parameter
from litestar.response import ServerSentEvent, Stream

from server import admission, audio_formats, console, openai_routes
from server.clone import CLONE_STRATEGY, create_clone_voice
from server.connections import UPLOAD_SLOT, UploadSlot, body_limits
from server.design import DESIGN_STRATEGY, create_design_voice
from server.duplex.routes import duplex_socket
from server.engine.bank import AdapterTensors, BankFull
from server.engine.requests import Sampling
from server.engine.worker import BudgetExceeded, Done, Engine, QueueFull, SpeakJob
from server.errors import (
    BadRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    exception_handler,
    html_errors_as_problems,
)
from server.instruct import checked_instruct
from server.jobs import TERMINAL, JobService
from server.limits import Limiter
from server.logs import redact_request_logs
from server.metrics import Metrics
from server.model_info import list_model_info
from server.openapi_bodies import VoiceImportForm, VoiceJobForm, json_body, multipart_body
from server.registry import Voice
from server.schemas import (
    Health,
    JobOut,
    OpenAISpeechRequest,
    SpeakRequest,
    VoiceList,
    VoiceOut,
)
from server.settings import Settings
from server.speak_stream import speak_stream_socket
from server.text_split import split_text
from server.uploads import receive_multipart
from server.voice_form import get_voice_form
from server.voices import VoiceService

SAMPLE_RATE = 24_000

log = logging.getLogger("voicefoundry.speak")


# --- auth -----------------------------------------------------------------------------------
# Authentication, the key's request rate and its usage: server/admission.py.
speak_guard = admission.guard("speak")
admin_guard = admission.guard("admin")


def _setting_guard(field: str):
    """The key an operational route needs, read from the setting `field` ("none" | scope)."""

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        needed = getattr(connection.app.state.settings, field)
        if needed != "none":
            admission.authenticate(connection, needed)

    return guard


# --- helpers ----------------------------------------------------------------------------------
async def _json_body(request: Request, settings: Settings) -> bytes:
    """A JSON request body, refused with 413 as soon as it passes `max_json_bytes` (never
    read whole: the app-wide body limit is the upload limit)."""
    limit = settings.max_json_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the JSON body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the JSON body is over {limit} bytes")
    return bytes(body)


def _decode(body: bytes, kind: type) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise Unprocessable(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def _voice_out(voice: Voice, unavailable: dict[str, str] | None = None) -> VoiceOut:
    reason = (unavailable or {}).get(voice.name)
    return VoiceOut(
        name=voice.name,
        base_model=voice.base_model,
        kind=voice.kind,
        slot=voice.slot,
        has_adapter=voice.adapter is not None,
        has_ref_clip=voice.ref_clip is not None,
        default_language=voice.default_language,
        created_at=voice.created_at or None,
        meta=voice.meta,
        available=reason is None,
        unavailable_reason=reason,
    )


async def _watch_disconnect(request: Request, job: SpeakJob) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class Synthesis:
    """One request's way through the engine: submit, then audio chunks out."""

    def __init__(
        self,
        state: State,
        voice: Voice,
        text: str,
        language: str | None,
        sampling: Sampling,
        seed: int | None,
        stream: bool,
        instruct: str | None = None,  # checked first: server/instruct.py
    ) -> None:
        settings: Settings = state.settings
        service: VoiceService = state.voices
        self.engine: Engine = state.engine
        self.metrics: Metrics = state.metrics
        self.job = SpeakJob(
            voicing=service.voicing(voice),
            segments=split_text(text),
            language=language or voice.default_language,
            sampling=sampling,
            seed=seed,
            stream=stream,
            instruct=instruct,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            chunk_frames=settings.stream_chunk_frames if stream else settings.whole_chunk_frames,
        )
        self.started = time.perf_counter()

    async def prepare(self) -> None:
        """Read the voice's adapter off the MLX thread; install it between batches."""
        adapter = self.job.voicing.adapter
        model = self.engine.models.get(self.job.voicing.model)
        if adapter is None or model is None or model.bank.slot_of(str(adapter)):
            return
        tensors = await anyio.to_thread.run_sync(
            AdapterTensors.read, adapter, model.adapter_module, model.adapter_riders
        )

        def install() -> None:
            with contextlib.suppress(BankFull):  # every slot busy: the engine installs it later
                model.bank.ensure(tensors)

        await self.engine.run(install)

    def submit(self) -> None:
        try:
            self.engine.submit(self.job)
        except QueueFull as exc:
            raise Overloaded(f"the synthesis queue is full ({exc}); retry shortly") from exc

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        try:
            while True:
                item = await self.job.out.get()
                if isinstance(item, Done):
                    self.metrics.synthesis(item.frames / 12.5, item.seconds)
                    self.metrics.latency(time.perf_counter() - self.started)
                    return
                if isinstance(item, BudgetExceeded):
                    raise _over_budget(self.job, item)
                if isinstance(item, BankFull):  # only when no running row could free a slot
                    raise Overloaded(str(item)) from item
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.job.cancel.set()  # no-op when finished; stops the work if the client left


def _over_budget(job: SpeakJob, exc: BudgetExceeded) -> ServiceError:
    """A request the engine stopped over a budget: 413 (audio) or 503 (time) before the answer
    started; a stream already under way ends without its last chunk (the client sees it
    incomplete). Either way the log says why and /metrics counts it."""
    log.warning("speak request %s stopped over its %s budget: %s", job.id, exc.budget, exc)
    if exc.budget == "audio":
        return PayloadTooLarge(str(exc))
    return Overloaded(str(exc))


def _sampling(settings: Settings, req: SpeakRequest | None) -> Sampling:
    base = Sampling(max_tokens=settings.max_tokens_per_sentence)
    if req is None:
        return base
    values = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "repetition_penalty": req.repetition_penalty,
        "max_tokens": req.max_tokens,
    }
    fields: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
    if "max_tokens" in fields:
        fields["max_tokens"] = min(fields["max_tokens"], settings.max_tokens_per_sentence)
    return dataclasses.replace(base, **fields)  # bounds: the SpeakRequest field types


def _check_text(settings: Settings, text: str) -> str:
    if not text.strip():
        raise Unprocessable("text is empty")
    if len(text) > settings.max_text_chars:
        raise PayloadTooLarge(
            f"text has {len(text)} characters; the limit is {settings.max_text_chars}"
        )
    return text


def _check_format(fmt: str, stream: bool) -> str:
    try:
        name = audio_formats.check_format(fmt)
    except audio_formats.UnsupportedFormat as exc:
        raise Unprocessable(str(exc), allowed=list(audio_formats.FORMATS)) from exc
    if not audio_formats.codec_available(name):
        available = list(audio_formats.available_formats())
        raise Unprocessable(
            f"this server cannot encode {name} (its codec library is not installed); "
            f"available: {', '.join(available)}",
            allowed=available,
        )
    if stream and name not in audio_formats.STREAMABLE:
        raise Unprocessable(
            f"format {name!r} cannot be streamed; use one of "
            f"{', '.join(sorted(audio_formats.STREAMABLE))}"
        )
    return name


async def _respond(
    request: Request,
    synthesis: Synthesis,
    fmt: str,
    stream: bool,
    speed: float = 1.0,
    *,
    metered: admission.Metered,
) -> Response | Stream:
    """`metered` (the key's stream slot and audio seconds) ends with the response: when the
    body is done, fails, or the client disconnects."""
    headers = audio_formats.response_headers(fmt, SAMPLE_RATE)
    await synthesis.prepare()
    if stream:
        encoder = audio_formats.stream_encoder(fmt, SAMPLE_RATE)
        synthesis.submit()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield encoder.header()
                async for chunk in synthesis.chunks():
                    metered.add("audio_seconds", len(chunk) / SAMPLE_RATE)
                    data = encoder.encode_chunk(chunk)
                    if data:
                        yield data
                yield encoder.finish()
            finally:
                encoder.close()
                metered.end()

        iterator = body()
        metered.watch(iterator)  # a body never iterated still frees the slot
        return Stream(iterator, media_type=headers.pop("Content-Type"), headers=headers)

    synthesis.submit()
    watcher = asyncio.create_task(_watch_disconnect(request, synthesis.job))
    parts = []
    try:
        async for chunk in synthesis.chunks():
            metered.add("audio_seconds", len(chunk) / SAMPLE_RATE)
            parts.append(chunk)
    finally:
        watcher.cancel()
        metered.end()
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if speed != 1.0:
        audio = await anyio.to_thread.run_sync(
            audio_formats.change_speed, audio, speed, SAMPLE_RATE
        )
    data = await anyio.to_thread.run_sync(audio_formats.encode, audio, fmt, SAMPLE_RATE)
    media_type = headers.pop("Content-Type")
    return Response(data, media_type=media_type, headers=headers)


# --- routes -----------------------------------------------------------------------------------
@post(
    "/speak",
    guards=[speak_guard],
    status_code=200,
    summary="Speech for a speaker name",
    operation_class=json_body(SpeakRequest),
)
async def speak(request: Request, state: State) -> Response | Stream:
    settings: Settings = state.settings
    req: SpeakRequest = _decode(await _json_body(request, settings), SpeakRequest)
    text = _check_text(settings, req.text)
    fmt = _check_format(req.format, req.stream)
    sampling = _sampling(settings, req)
    voice = await anyio.to_thread.run_sync(state.voices.get, req.speaker)
    instruct = await anyio.to_thread.run_sync(
        checked_instruct, state.voices, voice, req.instruct, "instruct"
    )
    metered = admission.start_synthesis(state, admission.key_of(request), len(text))
    try:
        synthesis = Synthesis(
            state, voice, text, req.language, sampling, req.seed, req.stream, instruct
        )
        return await _respond(request, synthesis, fmt, req.stream, metered=metered)
    except BaseException:
        metered.end()
        raise


@post(
    "/v1/audio/speech",
    guards=[speak_guard],
    status_code=200,
    summary="OpenAI-compatible speech",
    operation_class=json_body(OpenAISpeechRequest),
)
async def openai_speech(request: Request, state: State) -> Response | Stream:
    settings: Settings = state.settings
    req: OpenAISpeechRequest = _decode(await _json_body(request, settings), OpenAISpeechRequest)
    text = _check_text(settings, req.input)
    stream = req.stream_format is not None  # "audio": the bytes; "sse": OpenAI's events
    fmt = _check_format(req.response_format, stream)
    if stream and req.speed != 1.0:
        raise Unprocessable("speed other than 1.0 is not available while streaming")
    voice = await anyio.to_thread.run_sync(state.voices.get, req.voice_name)
    if req.model not in state.engine.models:
        raise Unprocessable(
            f"unknown model {req.model!r}; loaded: {', '.join(sorted(state.engine.models))}"
        )
    if voice.base_model != req.model:
        raise Unprocessable(f"voice {voice.name!r} belongs to model {voice.base_model!r}")
    instruct = await anyio.to_thread.run_sync(
        checked_instruct, state.voices, voice, req.instructions, "instructions"
    )
    metered = admission.start_synthesis(state, admission.key_of(request), len(text))
    try:
        sampling = _sampling(settings, None)
        synthesis = Synthesis(state, voice, text, None, sampling, None, stream, instruct)
        if req.stream_format == "sse":
            await synthesis.prepare()
            return openai_routes.sse_response(
                synthesis, fmt, len(text), SAMPLE_RATE, metered=metered
            )
        return await _respond(request, synthesis, fmt, stream, req.speed, metered=metered)
    except BaseException:
        metered.end()
        raise


@get("/voices", guards=[speak_guard])
async def list_voices(state: State) -> VoiceList:
    voices = await anyio.to_thread.run_sync(state.voices.list)
    return VoiceList(voices=[_voice_out(v, state.voices.unavailable) for v in voices])


@get("/voices/{name:str}", guards=[speak_guard])
async def get_voice(state: State, name: Annotated[str, Parameter()]) -> VoiceOut:
    voice = await anyio.to_thread.run_sync(state.voices.get, name)
    return _voice_out(voice, state.voices.unavailable)


@delete("/voices/{name:str}", guards=[admin_guard], status_code=200)
async def delete_voice(state: State, name: Annotated[str, Parameter()]) -> VoiceOut:
    return _voice_out(await state.voices.delete(name))


@post(
    "/voices/import",
    guards=[admin_guard],
    status_code=201,
    summary="Register a voice package (.tar.gz / .zip made by `voicefoundry bake`)",
    operation_class=multipart_body(VoiceImportForm),
    dependencies=UPLOAD_SLOT,
)
async def import_voice(request: Request, state: State, upload_slot: UploadSlot) -> VoiceOut:
    settings: Settings = state.settings
    voices: VoiceService = state.voices
    # Streamed to disk under the data dir (bounded by max_upload_bytes), never held whole.
    incoming = voices.voices_dir / f".upload-{uuid.uuid4().hex}"
    try:
        upload = await receive_multipart(
            request,
            incoming,
            max_bytes=settings.max_upload_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
        packages, refs = upload.files_of("package"), upload.files_of("ref_clip")
        if len(packages) != 1 or len(refs) > 1:
            raise Unprocessable("send one voice package as the multipart file field 'package'")
        voice = await voices.import_package(
            packages[0].path,
            name=upload.fields.get("name") or None,
            base_model=upload.fields.get("base_model") or None,
            ref_clip=refs[0].path if refs else None,  # copied on disk, never read whole
        )
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(incoming, ignore_errors=True))
    return _voice_out(voice)


def _job_out(job) -> JobOut:
    public = {k: job.payload[k] for k in JOB_PUBLIC_FIELDS if job.payload.get(k) is not None}
    return JobOut(
        id=job.id,
        name=job.name,
        state=job.state,
        created_at=job.created_at,
        updated_at=job.updated_at,
        **public,
    )


JOB_PUBLIC_FIELDS = tuple(f for f in JobOut.__struct_fields__ if f not in ("id", "name", "state"))


@post(
    "/voices",
    guards=[admin_guard],
    status_code=202,
    summary="Fine-tune a new voice or language from uploaded clips",
    operation_class=multipart_body(VoiceJobForm),
    dependencies=UPLOAD_SLOT,
)
async def create_voice_job(
    request: Request, state: State, upload_slot: UploadSlot
) -> Response[JobOut | VoiceOut]:
    settings: Settings = state.settings
    jobs: JobService = state.jobs
    key = admission.key_of(request)
    intake = admission.start_job_intake(state, key)  # the training_jobs limit, before the upload
    incoming = jobs.root / f".incoming-{uuid.uuid4().hex}"
    try:
        upload = await receive_multipart(
            request,
            incoming / "upload",
            max_bytes=settings.max_upload_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
        if upload.fields.get("strategy") == CLONE_STRATEGY:  # no training: server/clone.py
            voice = await create_clone_voice(state, upload)
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(incoming, ignore_errors=True))
            location = {"Location": f"/voices/{voice.name}"}
            return Response(_voice_out(voice), status_code=201, headers=location)
        if upload.fields.get("strategy") == DESIGN_STRATEGY:  # no training: server/design.py
            voice = await create_design_voice(state, upload, request)
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(incoming, ignore_errors=True))
            location = {"Location": f"/voices/{voice.name}"}
            return Response(_voice_out(voice), status_code=201, headers=location)
        job_request = await anyio.to_thread.run_sync(jobs.validate, upload, incoming)
        shutil.rmtree(incoming / "upload")
        job = await anyio.to_thread.run_sync(jobs.create, job_request, incoming)
        await anyio.to_thread.run_sync(state.usage.job_created, job.id, key.id)
    except BaseException:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(incoming, ignore_errors=True))
        raise
    finally:
        intake.release()
    return Response(_job_out(job), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@get("/jobs", guards=[admin_guard])
async def list_jobs(state: State) -> dict[str, list[JobOut]]:
    jobs = await anyio.to_thread.run_sync(state.registry.list_jobs)
    return {"jobs": [_job_out(j) for j in jobs]}


@get("/jobs/{job_id:str}", guards=[admin_guard])
async def get_job(state: State, job_id: Annotated[str, Parameter()]) -> JobOut:
    return _job_out(await anyio.to_thread.run_sync(state.jobs.get, job_id))


@delete("/jobs/{job_id:str}", guards=[admin_guard], status_code=200)
async def cancel_job(state: State, job_id: Annotated[str, Parameter()]) -> JobOut:
    return _job_out(await state.jobs.cancel(job_id))


@get(
    "/jobs/{job_id:str}/previews/{step:int}",
    guards=[admin_guard],
    media_type="audio/wav",
    summary="The quality report's preview (WAV) at a step of the job's similarity curve",
)
async def job_preview(
    state: State, job_id: Annotated[str, Parameter()], step: Annotated[int, Parameter()]
) -> Response[bytes]:
    path = await anyio.to_thread.run_sync(state.jobs.preview, job_id, step)
    data = await anyio.to_thread.run_sync(path.read_bytes)
    disposition = f'attachment; filename="{job_id}-step-{step}.wav"'
    return Response(data, media_type="audio/wav", headers={"Content-Disposition": disposition})


@get("/jobs/{job_id:str}/events", guards=[admin_guard])
async def job_events(state: State, job_id: Annotated[str, Parameter()]) -> ServerSentEvent:
    jobs: JobService = state.jobs
    jobs.get(job_id)  # 404 before subscribing
    queue = jobs.subscribe(job_id)

    async def events() -> AsyncIterator[str]:
        try:
            current = jobs.get(job_id)
            yield json.dumps({"event": "state", **msgspec.to_builtins(_job_out(current))})
            if current.state in TERMINAL:
                return
            while True:
                event = await queue.get()
                yield json.dumps(event)
                if event.get("event") == "state" and event.get("state") in TERMINAL:
                    return
        finally:
            jobs.unsubscribe(job_id, queue)

    return ServerSentEvent(events())


@get("/healthz")
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", guards=[_setting_guard("readyz_auth")])
async def readyz(state: State) -> Health:
    downloads = getattr(state, "downloads", None)  # hub models a start is still fetching
    if downloads is not None and not downloads.finished:
        raise NotReady(downloads.detail(), downloads=downloads.report())
    models = sorted(state.engine.models) if getattr(state, "engine", None) else []
    models += sorted(state.duplex.models) if getattr(state, "duplex", None) else []
    if not models:
        raise NotReady("no model is loaded yet")
    return Health(status="ready", models=models)


@get("/metrics", guards=[_setting_guard("metrics_auth")], media_type="text/plain; version=0.0.4")
async def metrics(state: State) -> str:
    text = state.metrics.render(state.engine)
    text += (
        "# HELP voicefoundry_voices_unavailable Registered voices that could not be restored.\n"
        "# TYPE voicefoundry_voices_unavailable gauge\n"
        f"voicefoundry_voices_unavailable {len(state.voices.unavailable)}\n"
    )
    if getattr(state, "duplex", None) is not None:
        text += state.metrics.render_duplex(state.duplex)
    text += state.metrics.render_keys(state.usage.totals(), state.limiter)
    return text


# --- app ------------------------------------------------------------------------------------
async def _count_response(message: Any, scope: Any) -> None:
    if message["type"] == "http.response.start":
        handler = scope.get("route_handler")
        route = sorted(handler.paths)[0] if handler is not None else "unmatched"
        scope["app"].state.metrics.request(route, int(message["status"]))


def create_app(settings: Settings) -> Litestar:
    """The app; models load in the lifespan, never at import."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        from server.startup import start_services

        redact_request_logs()  # the request lines the server logs never hold an api_key
        async with start_services(app, settings):
            yield

    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[
            speak,
            openai_speech,
            *openai_routes.ROUTES,
            list_model_info,
            list_voices,
            get_voice,
            delete_voice,
            import_voice,
            create_voice_job,
            list_jobs,
            get_job,
            cancel_job,
            job_preview,
            job_events,
            get_voice_form,
            admission.usage_report,
            duplex_socket,
            speak_stream_socket,
            healthz,
            readyz,
            metrics,
            *console.routes(),
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: exception_handler},
        openapi_config=OpenAPIConfig(
            title="voicefoundry",
            version="0.1.0",
            openapi_router=Router(
                "/schema",
                route_handlers=[],
                guards=[_setting_guard("schema_auth")],
                after_request=html_errors_as_problems,
            ),
        ),
        cors_config=cors,
        state=State({"settings": settings, "metrics": Metrics(), "limiter": Limiter()}),
        request_max_body_size=settings.max_upload_bytes,
        middleware=[body_limits],  # body read timeouts (slowloris); server/connections.py
        before_send=[_count_response],
    )
    return app
