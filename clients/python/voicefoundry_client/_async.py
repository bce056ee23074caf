"""`AsyncClient`: drives the sans-IO core with an `httpx.AsyncClient`; adds duplex sessions."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx

from voicefoundry_client import _core, speak_input
from voicefoundry_client._files import finalize_streamed_wav, temp_beside
from voicefoundry_client.duplex import DuplexSession
from voicefoundry_client.errors import APIConnectionError
from voicefoundry_client.models import Health, Job, JobEvent, Voice, decode_job_event
from voicefoundry_client.progress import JobWatcher, ProgressOption
from voicefoundry_client.speak_input import SpeechEvent
from voicefoundry_client.uploads import FileLike

T = TypeVar("T")


class AsyncClient:
    """The asyncio client: the same operations as `Client`, awaited, plus `duplex()`.

    `base_url` defaults to $VOICEFOUNDRY_URL, then http://127.0.0.1:8000; `api_key` to
    $VOICEFOUNDRY_API_KEY. Pass `http_client` to bring your own `httpx.AsyncClient`; it is not
    closed by `aclose()`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._config = _core.Config.make(
            base_url, api_key, timeout, max_retries, injected=http_client is not None
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        self.voices = AsyncVoices(self)
        self.jobs = AsyncJobs(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # --- driving the core -------------------------------------------------------------------
    async def _drive(self, flow: Generator[_core.Action, Any, T]) -> T:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                action = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, error = None, None
            try:
                if isinstance(action, _core.Send):
                    request = self._http.build_request(**action.kwargs)
                    reply = await self._http.send(request, stream=True)
                elif isinstance(action, _core.Read):
                    await action.response.aread()
                elif isinstance(action, _core.Close):
                    await action.response.aclose()
                else:
                    await asyncio.sleep(action.seconds)
            except httpx.TransportError as exc:
                error = exc

    async def _call(self, call: _core.Call[T]) -> T:
        flow = _core.exchange(self._config, call)
        return cast(T, await self._drive(flow))

    @contextlib.asynccontextmanager
    async def _open(self, call: _core.Call[Any]) -> AsyncIterator[httpx.Response]:
        response: httpx.Response = await self._drive(_core.exchange(self._config, call))
        try:
            yield response
        except httpx.TransportError as exc:  # while reading the body
            raise _core.transport_error(exc, self._config) from exc
        finally:
            await response.aclose()

    # --- speech -----------------------------------------------------------------------------
    async def speak(
        self,
        text: str,
        speaker: str,
        *,
        format: str = "wav",
        language: str | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        max_tokens: int | None = None,
        instruct: str | None = None,
    ) -> bytes:
        """The whole utterance as one audio file's bytes (`format`: wav, flac, pcm, mp3, opus)."""
        options = _core.speak_options(locals())
        return await self._call(_core.speak(text, speaker, format, options))

    async def speak_stream(
        self,
        text: str,
        speaker: str,
        *,
        format: str = "pcm",
        chunk_size: int | None = None,
        language: str | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        max_tokens: int | None = None,
        instruct: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Audio bytes as the server makes them (`async for chunk in client.speak_stream(...)`)."""
        call = _core.speak_stream(text, speaker, format, _core.speak_options(locals()))
        async with self._open(call) as response:
            async for chunk in response.aiter_bytes(chunk_size):
                yield chunk

    def speak_streaming_input(
        self,
        deltas: AsyncIterable[str] | Iterable[str],
        voice: str,
        *,
        format: str = "pcm",
        language: str | None = None,
        chunk_chars: int | None = None,
        flush_after_s: float | None = None,
        seed: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[SpeechEvent]:
        """Speak text as it is written (`deltas`, e.g. an LLM's tokens) over `/speak/stream`.

        Yields audio `bytes` (one continuous stream in `format`) as soon as each sentence is
        whole, a `SpeechSegment` after each spoken piece and a final `SpeechDone` with usage.
        `async for event in client.speak_streaming_input(deltas, voice): ...`
        """
        options = dict(locals())
        return speak_input.aspeak_streaming_input(self._config, deltas, voice, format, options)

    async def speak_to_file(
        self,
        path: str | os.PathLike[str],
        text: str,
        speaker: str,
        *,
        format: str | None = None,
        stream: bool = False,
        **options: Any,
    ) -> Path:
        """Speech written to `path` (format from its suffix unless given), replaced atomically."""
        target = Path(path)
        fmt = _core.format_for_path(target, format)
        handle, temp = temp_beside(target)
        try:
            with handle:
                if stream:
                    async for chunk in self.speak_stream(text, speaker, format=fmt, **options):
                        handle.write(chunk)
                    if fmt == "wav":
                        finalize_streamed_wav(handle)
                else:
                    handle.write(await self.speak(text, speaker, format=fmt, **options))
            temp.replace(target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target

    # --- duplex -----------------------------------------------------------------------------
    def duplex(
        self,
        speaker: str,
        *,
        text_prompt: str | None = None,
        seed: int | None = None,
        encoding: str = "pcm16",
        as_numpy: bool = False,
        open_timeout: float = 120.0,
    ) -> DuplexSession:
        """A full-duplex conversation: `async with client.duplex("agent") as session: ...`.

        The session is open (handshake and metadata received) inside the block and closed
        cleanly on exit. `as_numpy=True` delivers pcm16 frames as int16 arrays.
        """
        return DuplexSession(
            self._config,
            speaker,
            text_prompt=text_prompt,
            seed=seed,
            encoding=encoding,
            as_numpy=as_numpy,
            open_timeout=open_timeout,
        )

    # --- service ----------------------------------------------------------------------------
    async def ready(self) -> Health:
        """`GET /readyz`: the models loaded (ServiceUnavailable while none is)."""
        return await self._call(_core.ready())

    # --- lifecycle --------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncVoices:
    """`client.voices` of the AsyncClient."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[Voice]:
        return await self._client._call(_core.list_voices())

    async def get(self, name: str) -> Voice:
        return await self._client._call(_core.get_voice(name))

    async def delete(self, name: str) -> Voice:
        return await self._client._call(_core.delete_voice(name))

    async def create(
        self,
        name: str,
        clips: Sequence[FileLike],
        transcripts: Sequence[str] | Mapping[str, str] | None = None,
        *,
        strategy: str = "speaker",
        ref: FileLike | Sequence[FileLike] | None = None,
        base_model: str | None = None,
        language: str | None = None,
        user_clips: Sequence[FileLike] | None = None,
        text_prompt: str | None = None,
        **hyper: Any,
    ) -> Job:
        """Start a fine-tune job (admin); see `Client.voices.create`."""
        return await self._client._call(
            _core.create_voice(
                name,
                clips,
                transcripts,
                strategy=strategy,
                ref=ref,
                base_model=base_model,
                language=language,
                hyper=hyper,
                user_clips=user_clips,
                text_prompt=text_prompt,
            )
        )

    async def clone(
        self,
        name: str,
        ref: FileLike,
        *,
        text: str | None = None,
        base_model: str | None = None,
        language: str | None = None,
    ) -> Voice:
        """A voice from one reference clip (2-30 s), ready at once, no training (admin).

        With the clip's transcript `text` the model clones in context (ICL), else from the
        clip's speaker embedding; `voice.meta["clone"]` says which.
        """
        return await self._client._call(
            _core.clone_voice(name, ref, text=text, base_model=base_model, language=language)
        )

    async def import_package(
        self,
        package: str | os.PathLike[str] | tuple[str, bytes],
        *,
        name: str | None = None,
        base_model: str | None = None,
        ref_clip: FileLike | None = None,
    ) -> Voice:
        """Register a voice package: a `voicefoundry bake` directory, or a .tar.gz / .zip."""
        return await self._client._call(
            _core.import_voice(package, name=name, base_model=base_model, ref_clip=ref_clip)
        )


class AsyncJobs:
    """`client.jobs` of the AsyncClient."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[Job]:
        return await self._client._call(_core.list_jobs())

    async def get(self, job_id: str) -> Job:
        return await self._client._call(_core.get_job(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._client._call(_core.cancel_job(job_id))

    async def events(
        self, job_id: str, *, read_timeout: float | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        """The job's events as they happen, ending after the final state event."""
        decoder = _core.SSEDecoder()
        async with self._client._open(_core.job_events(job_id, read_timeout)) as response:
            async for line in response.aiter_lines():
                payload = decoder.feed(line)
                if payload is not None:
                    yield decode_job_event(payload)
            payload = decoder.flush()
            if payload is not None:
                yield decode_job_event(payload)

    async def wait(
        self, job_id: str, *, progress: ProgressOption = True, timeout: float | None = None
    ) -> Job:
        """Until the job ends; the final Job, or JobFailed (failed / cancelled). See `Client`."""
        watcher = JobWatcher(job_id, progress, timeout)
        try:
            while True:
                events = self.events(job_id, read_timeout=watcher.read_timeout())
                with contextlib.suppress(APIConnectionError):
                    try:
                        async for event in events:
                            if watcher.feed(event):
                                break
                    finally:
                        await events.aclose()
                final = watcher.settle(await self.get(job_id))
                if final is not None:
                    return final
                await asyncio.sleep(watcher.reconnect_delay())
        finally:
            watcher.close()
