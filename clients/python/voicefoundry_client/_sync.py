"""`Client`: drives the sans-IO core with a blocking `httpx.Client`."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx

from voicefoundry_client import _core, speak_input
from voicefoundry_client._files import finalize_streamed_wav, temp_beside
from voicefoundry_client.errors import APIConnectionError
from voicefoundry_client.models import Health, Job, JobEvent, Voice, decode_job_event
from voicefoundry_client.progress import JobWatcher, ProgressOption
from voicefoundry_client.speak_input import SpeechEvent
from voicefoundry_client.uploads import FileLike

T = TypeVar("T")


class Client:
    """A blocking client for a voicefoundry server.

    `base_url` defaults to $VOICEFOUNDRY_URL, then http://127.0.0.1:8000; `api_key` to
    $VOICEFOUNDRY_API_KEY. Pass `http_client` to bring your own `httpx.Client` (proxies,
    certificates, a test transport); it is not closed by `close()`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._config = _core.Config.make(
            base_url, api_key, timeout, max_retries, injected=http_client is not None
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self.voices = Voices(self)
        self.jobs = Jobs(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # --- driving the core -------------------------------------------------------------------
    def _drive(self, flow: Generator[_core.Action, Any, T]) -> T:
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
                    reply = self._http.send(request, stream=True)
                elif isinstance(action, _core.Read):
                    action.response.read()
                elif isinstance(action, _core.Close):
                    action.response.close()
                else:
                    time.sleep(action.seconds)
            except httpx.TransportError as exc:
                error = exc

    def _call(self, call: _core.Call[T]) -> T:
        flow = _core.exchange(self._config, call)
        return cast(T, self._drive(flow))

    @contextlib.contextmanager
    def _open(self, call: _core.Call[Any]) -> Iterator[httpx.Response]:
        response: httpx.Response = self._drive(_core.exchange(self._config, call))
        try:
            yield response
        except httpx.TransportError as exc:  # while reading the body
            raise _core.transport_error(exc, self._config) from exc
        finally:
            response.close()

    # --- speech -----------------------------------------------------------------------------
    def speak(
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
        return self._call(_core.speak(text, speaker, format, options))

    def speak_stream(
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
    ) -> Iterator[bytes]:
        """Audio bytes as the server makes them: one continuous stream (pcm, wav, mp3, opus).

        The request is sent when iteration starts; errors are raised from the first `next()`.
        `chunk_size` re-chunks to that many bytes (None: as they arrive).
        """
        call = _core.speak_stream(text, speaker, format, _core.speak_options(locals()))
        with self._open(call) as response:
            yield from response.iter_bytes(chunk_size)

    def speak_streaming_input(
        self,
        deltas: Iterable[str],
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
    ) -> Iterator[SpeechEvent]:
        """Speak text as it is written (`deltas`, e.g. an LLM's tokens) over `/speak/stream`.

        Yields audio `bytes` (one continuous stream in `format`) as soon as each sentence is
        whole, a `SpeechSegment` after each spoken piece and a final `SpeechDone` with usage.
        `deltas` is read from a background thread while audio comes back.
        """
        options = dict(locals())
        return speak_input.speak_streaming_input(self._config, deltas, voice, format, options)

    def speak_to_file(
        self,
        path: str | os.PathLike[str],
        text: str,
        speaker: str,
        *,
        format: str | None = None,
        stream: bool = False,
        **options: Any,
    ) -> Path:
        """Speech written to `path` (format from its suffix unless given), replaced atomically.

        `stream=True` writes chunks as they arrive; a streamed WAV gets its real sizes at the end.
        """
        target = Path(path)
        fmt = _core.format_for_path(target, format)
        handle, temp = temp_beside(target)
        try:
            with handle:
                if stream:
                    for chunk in self.speak_stream(text, speaker, format=fmt, **options):
                        handle.write(chunk)
                    if fmt == "wav":
                        finalize_streamed_wav(handle)
                else:
                    handle.write(self.speak(text, speaker, format=fmt, **options))
            temp.replace(target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target

    # --- service ----------------------------------------------------------------------------
    def ready(self) -> Health:
        """`GET /readyz`: the models loaded (ServiceUnavailable while none is)."""
        return self._call(_core.ready())

    # --- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Voices:
    """`client.voices`: the server's speakers, fine-tune uploads and package imports."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[Voice]:
        return self._client._call(_core.list_voices())

    def get(self, name: str) -> Voice:
        return self._client._call(_core.get_voice(name))

    def delete(self, name: str) -> Voice:
        return self._client._call(_core.delete_voice(name))

    def create(
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
        """Start a fine-tune job (admin); returns it queued. Follow it with `client.jobs.wait`.

        `transcripts`: one text per clip, a {file name: text} mapping, or None (CLIP.txt beside
        each clip). `strategy`: speaker (needs `ref`), language, or duplex (a PersonaPlex base;
        optional `user_clips` and `text_prompt`). `hyper`: lora_rank, epochs, max_steps,
        learning_rate, batch_size (bounded server-side).
        """
        return self._client._call(
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

    def clone(
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
        return self._client._call(
            _core.clone_voice(name, ref, text=text, base_model=base_model, language=language)
        )

    def import_package(
        self,
        package: str | os.PathLike[str] | tuple[str, bytes],
        *,
        name: str | None = None,
        base_model: str | None = None,
        ref_clip: FileLike | None = None,
    ) -> Voice:
        """Register a voice package: a `voicefoundry bake` directory, or a .tar.gz / .zip."""
        return self._client._call(
            _core.import_voice(package, name=name, base_model=base_model, ref_clip=ref_clip)
        )


class Jobs:
    """`client.jobs`: fine-tune jobs (admin)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[Job]:
        return self._client._call(_core.list_jobs())

    def get(self, job_id: str) -> Job:
        return self._client._call(_core.get_job(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._client._call(_core.cancel_job(job_id))

    def events(
        self, job_id: str, *, read_timeout: float | None = None
    ) -> Generator[JobEvent, None, None]:
        """The job's events as they happen, ending after the final state event."""
        decoder = _core.SSEDecoder()
        with self._client._open(_core.job_events(job_id, read_timeout)) as response:
            for line in response.iter_lines():
                payload = decoder.feed(line)
                if payload is not None:
                    yield decode_job_event(payload)
            payload = decoder.flush()
            if payload is not None:
                yield decode_job_event(payload)

    def wait(
        self, job_id: str, *, progress: ProgressOption = True, timeout: float | None = None
    ) -> Job:
        """Block until the job ends; the final Job, or JobFailed (failed / cancelled).

        `progress`: True draws a progress bar on stderr (plain lines when not a terminal),
        False is silent, a callable receives every event. `timeout` raises WaitTimeout.
        """
        watcher = JobWatcher(job_id, progress, timeout)
        try:
            while True:
                events = self.events(job_id, read_timeout=watcher.read_timeout())
                with contextlib.suppress(APIConnectionError), contextlib.closing(events):
                    for event in events:
                        if watcher.feed(event):
                            break
                final = watcher.settle(self.get(job_id))
                if final is not None:
                    return final
                time.sleep(watcher.reconnect_delay())
        finally:
            watcher.close()
