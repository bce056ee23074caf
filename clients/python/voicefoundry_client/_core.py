"""The sans-IO core shared by `Client` and `AsyncClient`.

Every operation is a `Call`: a request description plus a parser. `exchange(config, call)` is a
generator that holds ALL the protocol logic (headers, retries with backoff and Retry-After,
error mapping, decoding): it yields `Send`, `Read`, `Close` and `Sleep` actions and receives
their results. `_sync.py` and `_async.py` only drive it, one with blocking calls, the other
with awaits, so no logic is written twice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from voicefoundry_client import uploads
from voicefoundry_client._retry import RETRY_STATUSES, RetryPolicy
from voicefoundry_client.errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidResponse,
    error_from_problem,
)
from voicefoundry_client.models import Health, Job, JobList, Voice, VoiceList

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
USER_AGENT = "voicefoundry-client/0.1.0"
FORMAT_SUFFIXES = {
    ".wav": "wav",
    ".flac": "flac",
    ".mp3": "mp3",
    ".opus": "opus",
    ".ogg": "opus",
    ".pcm": "pcm",
    ".raw": "pcm",
}


# --- configuration ----------------------------------------------------------------------------
@dataclass
class Config:
    base_url: str
    api_key: str | None
    timeout: httpx.Timeout | None  # None: the injected httpx client's own
    retry: RetryPolicy

    @classmethod
    def make(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        injected: bool,
    ) -> Config:
        url = base_url or os.environ.get("VOICEFOUNDRY_URL") or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {url!r}")
        key = api_key if api_key is not None else os.environ.get("VOICEFOUNDRY_API_KEY") or None
        if timeout is None:
            resolved = None if injected else DEFAULT_TIMEOUT
        else:
            resolved = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        return cls(url.rstrip("/"), key, resolved, RetryPolicy(max_retries=max_retries))

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


# --- calls and actions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Call(Generic[T]):
    """One operation: how to ask, and how to read a 2xx answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, str] | None = None
    data: Mapping[str, str] | None = None
    files: Sequence[uploads.MultipartFile] | None = None
    # Safe to send again after a connection error that may have reached the server.
    idempotent: bool = True
    # Return the open response (body unread) instead of parsing it.
    stream: bool = False
    timeout: httpx.Timeout | None = None
    accept: str | None = None

    def request_kwargs(self, config: Config) -> dict[str, Any]:
        headers = config.headers()
        if self.accept:
            headers["Accept"] = self.accept
        kwargs: dict[str, Any] = {
            "method": self.method,
            "url": config.base_url + self.path,
            "headers": headers,
        }
        for name in ("json", "params", "data", "files"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = list(value) if name == "files" else value
        timeout = self.timeout or config.timeout
        if timeout is not None:
            kwargs["timeout"] = timeout
        return kwargs


@dataclass(frozen=True)
class Send:
    kwargs: dict[str, Any]  # for httpx's build_request; always sent with stream=True


@dataclass(frozen=True)
class Read:
    response: httpx.Response  # read the body (which also closes the response)


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = Send | Read | Close | Sleep


def exchange(config: Config, call: Call[T]) -> Generator[Action, Any, T | httpx.Response]:
    """Send `call` with retries; return its parsed result (or the open response if streaming).

    Retries: 429 / 503 for every request (the server did no work), honouring Retry-After;
    a failed connect for every request (nothing reached the server); other transport errors
    only for idempotent calls.
    """
    attempt = 0
    while True:
        try:
            response: httpx.Response = yield Send(call.request_kwargs(config))
        except httpx.TransportError as exc:
            never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            if (never_sent or call.idempotent) and attempt < config.retry.max_retries:
                yield Sleep(config.retry.backoff(attempt))
                attempt += 1
                continue
            raise transport_error(exc, config) from exc
        if response.status_code in RETRY_STATUSES:
            delay = config.retry.delay(attempt, response.headers.get("retry-after"))
            if delay is not None:
                yield Close(response)
                yield Sleep(delay)
                attempt += 1
                continue
        if response.is_error:
            with contextlib.suppress(httpx.TransportError):  # the status alone still says why
                yield Read(response)
            raise error_from_problem(
                response.status_code, _content(response), dict(response.headers)
            )
        if call.stream:
            return response
        try:
            yield Read(response)
        except httpx.TransportError as exc:
            raise transport_error(exc, config) from exc
        return call.parse(response)


def _content(response: httpx.Response) -> bytes:
    try:
        return response.content
    except httpx.ResponseNotRead:
        return b""


def transport_error(exc: httpx.TransportError, config: Config) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"{config.base_url} did not answer in time ({type(exc).__name__})")
    return APIConnectionError(f"cannot reach {config.base_url}: {type(exc).__name__}: {exc}")


# --- decoding ---------------------------------------------------------------------------------
def _decoder(kind: type[T]) -> Callable[[httpx.Response], T]:
    def parse(response: httpx.Response) -> T:
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise InvalidResponse(
                f"{response.request.method} {response.request.url.path}: unexpected body: {exc}",
                status=response.status_code,
            ) from exc

    return parse


_voice = _decoder(Voice)
_voices = _decoder(VoiceList)
_job = _decoder(Job)
_jobs = _decoder(JobList)


def _audio(response: httpx.Response) -> bytes:
    return response.content


# --- operations -------------------------------------------------------------------------------
def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return quote(value, safe="")


def speak_body(
    text: str, speaker: str, fmt: str, stream: bool, options: Mapping[str, Any]
) -> dict[str, Any]:
    if not isinstance(text, str) or not isinstance(speaker, str):
        raise TypeError("text and speaker must be strings")
    body: dict[str, Any] = {"speaker": speaker, "text": text, "format": fmt}
    if stream:
        body["stream"] = True
    body.update({k: v for k, v in options.items() if v is not None})
    return body


def speak_options(scope: Mapping[str, Any]) -> dict[str, Any]:
    """The optional sampling arguments among a speak method's locals()."""
    skip = {"self", "text", "speaker", "format", "chunk_size"}
    return {k: v for k, v in scope.items() if k not in skip and v is not None}


def speak(text: str, speaker: str, fmt: str, options: Mapping[str, Any]) -> Call[bytes]:
    # Synthesis changes nothing on the server: safe to resend after a dropped connection.
    return Call("POST", "/speak", _audio, json=speak_body(text, speaker, fmt, False, options))


def speak_stream(
    text: str, speaker: str, fmt: str, options: Mapping[str, Any]
) -> Call[httpx.Response]:
    body = speak_body(text, speaker, fmt, True, options)
    return Call("POST", "/speak", _audio, json=body, stream=True)  # type: ignore[arg-type]


def format_for_path(path: str | os.PathLike[str], fmt: str | None) -> str:
    """The audio format to ask for: `fmt`, else from the file suffix, else wav."""
    if fmt:
        return fmt
    return FORMAT_SUFFIXES.get(Path(path).suffix.lower(), "wav")


def list_voices() -> Call[list[Voice]]:
    return Call("GET", "/voices", lambda r: _voices(r).voices)


def get_voice(name: str) -> Call[Voice]:
    return Call("GET", f"/voices/{_segment(name, 'name')}", _voice)


def delete_voice(name: str) -> Call[Voice]:
    return Call("DELETE", f"/voices/{_segment(name, 'name')}", _voice)


def create_voice(
    name: str,
    clips: Sequence[uploads.FileLike],
    transcripts: Sequence[str] | Mapping[str, str] | None,
    *,
    strategy: str,
    ref: uploads.FileLike | Sequence[uploads.FileLike] | None,
    base_model: str | None,
    language: str | None,
    hyper: Mapping[str, Any],
    user_clips: Sequence[uploads.FileLike] | None = None,
    text_prompt: str | None = None,
) -> Call[Job]:
    fields, files = uploads.voice_job_form(
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
    return Call("POST", "/voices", _job, data=fields, files=files, idempotent=False)


def clone_voice(
    name: str,
    ref: uploads.FileLike,
    *,
    text: str | None,
    base_model: str | None,
    language: str | None,
) -> Call[Voice]:
    fields, files = uploads.clone_form(
        name, ref, text=text, base_model=base_model, language=language
    )
    return Call("POST", "/voices", _voice, data=fields, files=files, idempotent=False)


def import_voice(
    package: str | os.PathLike[str] | tuple[str, bytes],
    *,
    name: str | None,
    base_model: str | None,
    ref_clip: uploads.FileLike | None,
) -> Call[Voice]:
    fields, files = uploads.import_form(
        package, name=name, base_model=base_model, ref_clip=ref_clip
    )
    return Call("POST", "/voices/import", _voice, data=fields, files=files, idempotent=False)


def list_jobs() -> Call[list[Job]]:
    return Call("GET", "/jobs", lambda r: _jobs(r).jobs)


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/jobs/{_segment(job_id, 'job id')}", _job)


def cancel_job(job_id: str) -> Call[Job]:
    return Call("DELETE", f"/jobs/{_segment(job_id, 'job id')}", _job)


def job_events(job_id: str, read_timeout: float | None) -> Call[httpx.Response]:
    # Events can be minutes apart (a queued job): no read timeout unless a wait deadline asks.
    timeout = httpx.Timeout(10.0, read=read_timeout)
    return Call(
        "GET",
        f"/jobs/{_segment(job_id, 'job id')}/events",
        _audio,  # type: ignore[arg-type]
        stream=True,
        timeout=timeout,
        accept="text/event-stream",
    )


def ready() -> Call[Health]:
    return Call("GET", "/readyz", _decoder(Health))


# --- server-sent events -----------------------------------------------------------------------
@dataclass
class SSEDecoder:
    """Lines in, complete `data` payloads out (the `event`/`id`/`retry` fields are not used)."""

    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data.clear()
            return payload
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")
