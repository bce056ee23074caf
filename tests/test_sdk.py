"""The Python SDK (clients/python) against a REAL server process (demo mode, API keys on).

One server for the whole module. Only the retry tests use a fake (httpx.MockTransport): the real
server cannot be made to answer 429 / 503 on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from voicefoundry_client import (
    APIConnectionError,
    AsyncClient,
    AudioFrame,
    Client,
    DuplexError,
    Forbidden,
    Job,
    JobFailed,
    NotFound,
    ProgressEvent,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    StateEvent,
    TextPiece,
    Unauthorized,
    Validation,
    Voice,
    parse_retry_after,
)

from server.auth import KeyStore
from tests.service_helpers import copy_demo_data, server_process

DEMO_VOICES = {"demo-baked", "demo-adapter", "demo-clone"}
BASE = "qwen3-tiny"  # the demo's Qwen3-TTS model (it serves a CSM model beside it)
DUPLEX_VOICE = "demo-duplex"
FRAME = 1920  # samples per 80 ms codec frame at 24 kHz


@dataclass(frozen=True)
class Server:
    url: str
    admin_key: str
    speak_key: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path):
    root = tmp_path_factory.mktemp("sdk_server")
    copy_demo_data(demo_data_dir, root / "data")
    keys = KeyStore()
    admin_key, _ = keys.add("admin", "sdk tests")
    speak_key, _ = keys.add("speak", "sdk tests")
    keys.save(root / "keys.json")
    settings = {
        "demo": True,
        "data_dir": str(root / "data"),
        "api_keys_file": str(root / "keys.json"),
        "max_tokens_per_sentence": 8,
        "stream_chunk_frames": 2,
    }
    with server_process(settings, timeout=600) as url:
        yield Server(url, admin_key, speak_key)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str], Path]:
    """Three synthetic clips (>= 4 s together, the speaker strategy's minimum) and a ref clip."""
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(
        tmp_path_factory.mktemp("sdk_clips"), 3, seed=11, with_ref=True, min_s=1.6, max_s=2.0
    )
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    return (
        [train.parent / r["audio"] for r in rows],
        [r["text"] for r in rows],
        train.parent / "ref.wav",
    )


@pytest.fixture
def client(server: Server):
    with Client(server.url, api_key=server.admin_key) as c:
        yield c


def _wav(data: bytes) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24_000
    return audio


# --- speech -----------------------------------------------------------------------------------
def test_speak_returns_a_valid_wav(client: Client, tmp_path: Path) -> None:
    audio = _wav(client.speak("Hello there.", "demo-baked", seed=3, max_tokens=4))
    assert 0 < audio.size <= 4 * FRAME
    path = client.speak_to_file(tmp_path / "out.flac", "Hi again.", "demo-clone", max_tokens=3)
    data, rate = sf.read(path)
    assert rate == 24_000 and data.size > 0 and path.read_bytes()[:4] == b"fLaC"
    assert not list(tmp_path.glob("*.part")), "the temp file was left behind"


def test_speak_stream_chunks_make_one_valid_stream(client: Client, tmp_path: Path) -> None:
    pcm_chunks = list(client.speak_stream("One sentence only.", "demo-baked", max_tokens=6))
    assert len(pcm_chunks) >= 2, "audio did not arrive in pieces"
    pcm = b"".join(pcm_chunks)
    assert 0 < len(pcm) <= 6 * FRAME * 2 and len(pcm) % 2 == 0

    wav_chunks = list(
        client.speak_stream("Streamed wav.", "demo-adapter", format="wav", max_tokens=5)
    )
    wav = b"".join(wav_chunks)
    assert wav[:4] == b"RIFF" and wav.count(b"RIFF") == 1
    assert struct.unpack("<I", wav[4:8])[0] == 0xFFFFFFFF  # streamed: length unknown

    # Written to a file while streaming, the header gets the real sizes at the end.
    path = client.speak_to_file(
        tmp_path / "s.wav", "Streamed wav.", "demo-adapter", stream=True, max_tokens=5
    )
    raw = path.read_bytes()
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8
    assert _wav(raw).size == (len(raw) - 44) // 2 > 0

    small = list(client.speak_stream("Chunked.", "demo-baked", max_tokens=4, chunk_size=1000))
    assert all(len(c) == 1000 for c in small[:-1]) and 0 < len(small[-1]) <= 1000


@pytest.mark.anyio
async def test_async_client_speaks_streams_and_lists(server: Server) -> None:
    async with AsyncClient(server.url, api_key=server.admin_key) as client:
        wav, voices = await asyncio.gather(
            client.speak("Async hello.", "demo-baked", max_tokens=4),
            client.voices.list(),
        )
        assert _wav(wav).size > 0
        assert {v.name for v in voices} >= DEMO_VOICES
        chunks = [c async for c in client.speak_stream("Async stream.", "demo-clone", max_tokens=5)]
        assert len(chunks) >= 2 and len(b"".join(chunks)) % 2 == 0
        voice = await client.voices.get("demo-baked")
        assert isinstance(voice, Voice) and voice.kind == "baked" and voice.slot == 3000
        with pytest.raises(NotFound) as missing:
            await client.speak("Hello.", "nobody-here")
        assert missing.value.status == 404 and "nobody-here" in missing.value.detail
        with pytest.raises(Validation):
            async for _ in client.speak_stream("x", "demo-baked", format="flac"):
                pass


# --- voices and errors ------------------------------------------------------------------------
def test_voices_list_and_get(client: Client) -> None:
    voices = {v.name: v for v in client.voices.list()}
    assert set(voices) >= DEMO_VOICES
    assert voices["demo-adapter"].has_adapter and voices["demo-clone"].kind == "clone"
    got = client.voices.get("demo-adapter")
    assert got == voices["demo-adapter"]


def test_errors_are_typed_with_the_servers_detail(client: Client, server: Server) -> None:
    with pytest.raises(NotFound) as missing:
        client.speak("Hello.", "nobody-here")
    raw = httpx.post(
        f"{server.url}/speak",
        json={"speaker": "nobody-here", "text": "Hello."},
        headers={"X-API-Key": server.admin_key},
    ).json()
    error = missing.value
    assert error.status == 404 and error.detail == raw["detail"] and error.problem == raw
    assert str(error) == f"404 Not Found: {raw['detail']}"
    with pytest.raises(NotFound):
        client.voices.get("nobody-here")

    with pytest.raises(Validation) as bad_format:
        client.speak("Hello.", "demo-baked", format="aiff")
    assert bad_format.value.status == 422 and "wav" in bad_format.value.problem["allowed"]
    with pytest.raises(Validation, match="temperature"):
        client.speak("Hello.", "demo-baked", temperature=-1.0)
    with pytest.raises(Validation, match="empty"):
        client.speak("   ", "demo-baked")
    with pytest.raises(ValueError):  # refused before sending: nothing to ask the server
        client.voices.get("")


def test_api_keys(server: Server) -> None:
    with Client(server.url, api_key="") as anonymous, pytest.raises(Unauthorized) as denied:
        anonymous.voices.list()
    assert denied.value.status == 401 and "API key" in denied.value.detail
    with Client(server.url, api_key="vf_nope_nope") as wrong, pytest.raises(Unauthorized):
        wrong.speak("Hi.", "demo-baked")
    with Client(server.url, api_key=server.speak_key) as speaker:
        assert {v.name for v in speaker.voices.list()} >= DEMO_VOICES
        assert _wav(speaker.speak("Hi.", "demo-baked", max_tokens=2)).size > 0
        with pytest.raises(Forbidden):
            speaker.voices.delete("demo-clone")
        with pytest.raises(Forbidden):
            speaker.jobs.list()


# --- fine-tune jobs ---------------------------------------------------------------------------
def test_create_wait_and_the_new_voice_speaks(client: Client, server: Server, clips, capsys):
    paths, texts, ref = clips
    job = client.voices.create(
        "sdkvoice", paths, texts, ref=ref, base_model=BASE, max_steps=2, lora_rank=4
    )
    assert isinstance(job, Job) and job.state == "queued" and job.name == "sdkvoice"

    events = []

    def follow() -> None:
        with Client(server.url, api_key=server.admin_key) as other:
            events.extend(other.jobs.events(job.id))

    follower = threading.Thread(target=follow)
    follower.start()
    done = client.jobs.wait(job.id, timeout=300)
    follower.join(60)
    assert done.state == "succeeded" and done.voice == "sdkvoice" and done.step == 2

    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [e.step for e in progress] == [1, 2] and progress[-1].total_steps == 2
    assert {"loss", "main", "sub"} <= set(progress[-1].losses)
    assert isinstance(events[0], StateEvent) and isinstance(events[-1], StateEvent)
    assert events[-1].state == "succeeded" and events[-1].terminal

    shown = capsys.readouterr().err  # not a terminal: plain lines on stderr
    assert "training" in shown and "2/2" in shown
    assert f"job {job.id} succeeded" in shown.splitlines()[-1]

    assert _wav(client.speak("I am new.", "sdkvoice", max_tokens=3)).size > 0
    assert job.id in {j.id for j in client.jobs.list()}
    assert client.jobs.get(job.id) == done


@pytest.mark.anyio
async def test_cancel_ends_in_job_failed(server: Server, clips) -> None:
    paths, texts, ref = clips
    async with AsyncClient(server.url, api_key=server.admin_key) as client:
        job = await client.voices.create(
            "sdkcancel",
            paths,
            dict(zip([p.name for p in paths], texts, strict=True)),
            ref=[ref],
            base_model=BASE,
            max_steps=5000,
        )
        async with contextlib.aclosing(client.jobs.events(job.id)) as events:
            async for event in events:
                if isinstance(event, ProgressEvent):
                    break  # training is under way
        cancelled = await client.jobs.cancel(job.id)
        assert cancelled.id == job.id
        with pytest.raises(JobFailed) as failed:
            await client.jobs.wait(job.id, progress=False, timeout=120)
        assert failed.value.job.state == "cancelled"
        with pytest.raises(NotFound):
            await client.voices.get("sdkcancel")


def test_create_refuses_bad_input_locally_and_remotely(client: Client, clips) -> None:
    paths, texts, ref = clips
    with pytest.raises(ValueError, match="3 clips but 2 transcripts"):
        client.voices.create("x", paths, texts[:2], ref=ref)
    with pytest.raises(FileNotFoundError):
        client.voices.create("x", [Path("/no/such.wav")], ["text"], ref=ref)
    with pytest.raises(Validation, match="reference clip"):
        client.voices.create("needsref", paths, texts, base_model=BASE, max_steps=2)
    with pytest.raises(Validation, match="lora_rank"):
        client.voices.create("badrank", paths, texts, ref=ref, base_model=BASE, lora_rank=1000)


# --- duplex -----------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_duplex_session_talks_back(server: Server) -> None:
    seconds = 3.0
    t = np.arange(int(seconds * 24_000)) / 24_000
    pcm = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    frames: list[AudioFrame] = []
    texts: list[str] = []
    async with (
        AsyncClient(server.url, api_key=server.speak_key) as client,
        client.duplex(DUPLEX_VOICE, seed=1, as_numpy=True) as session,
    ):
        meta = session.metadata
        assert meta is not None and meta.speaker == DUPLEX_VOICE and meta.session_id
        assert (meta.sample_rate, meta.frame_samples, meta.encoding) == (24_000, 1920, "pcm16")
        assert await session.ping() >= 0.0

        async def send() -> None:  # in real time: 80 ms of audio every 80 ms
            for start in range(0, pcm.size, FRAME):
                await session.send_audio(pcm[start : start + FRAME])
                await asyncio.sleep(0.08)

        sender = asyncio.create_task(send())
        async with asyncio.timeout(300), contextlib.aclosing(session.events()) as events:
            async for event in events:
                if isinstance(event, DuplexError):
                    pytest.fail(f"server error: {event.reason}")
                if isinstance(event, TextPiece):
                    texts.append(event.text)
                elif isinstance(event, AudioFrame):
                    frames.append(event)
                    if len(frames) >= 36:
                        break
        await sender
    assert len(frames) >= 36
    assert all(f.samples == FRAME and f.pcm.dtype == np.int16 for f in frames)

    async with AsyncClient(server.url, api_key=server.speak_key) as client:
        with pytest.raises(NotFound):
            async with client.duplex("nobody-here"):
                pass
    async with AsyncClient(server.url, api_key="") as anonymous:
        with pytest.raises(Unauthorized):
            async with anonymous.duplex(DUPLEX_VOICE):
                pass


# --- retries (a fake transport: the real server cannot 429 / 503 on demand) -----------------
VOICES_BODY = {"voices": [{"name": "a", "base_model": "m", "kind": "baked", "future": 1}]}


def _flaky(statuses: list[tuple[int, dict[str, str]]], calls: list[float]):
    """A MockTransport handler: answers `statuses` in turn, then 200 with a voice list."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) <= len(statuses):
            status, headers = statuses[len(calls) - 1]
            body = {"type": "about:blank", "title": "Busy", "status": status, "detail": "busy"}
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(200, json=VOICES_BODY)

    return handle


def test_retry_after_seconds_is_honoured_then_succeeds() -> None:
    """Fake transport (httpx.MockTransport): 503 + Retry-After: 1, then 200."""
    calls: list[float] = []
    transport = httpx.MockTransport(_flaky([(503, {"Retry-After": "1"})], calls))
    with Client("http://vf.test", http_client=httpx.Client(transport=transport)) as client:
        voices = client.voices.list()
    assert [v.name for v in voices] == ["a"]  # the unknown field "future" is ignored
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0


@pytest.mark.anyio
async def test_async_retry_after_http_date_then_gives_up() -> None:
    """Fake transport (httpx.MockTransport): 429 with an HTTP-date Retry-After, twice; with
    max_retries=1 the second 429 is raised as RateLimited carrying retry_after."""
    calls: list[float] = []
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    statuses = [(429, {"Retry-After": when}), (429, {"Retry-After": "7"})]
    transport = httpx.MockTransport(_flaky(statuses, calls))
    http = httpx.AsyncClient(transport=transport)
    async with AsyncClient("http://vf.test", max_retries=1, http_client=http) as client:
        with pytest.raises(RateLimited) as limited:
            await client.voices.list()
    await http.aclose()
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0
    assert limited.value.retry_after == 7.0 and limited.value.status == 429


def test_connection_errors_retry_only_when_safe() -> None:
    """Fake transport: a dropped connection is retried for GET, never for the upload POST."""
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1 or request.method == "POST":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json=VOICES_BODY)

    http = httpx.Client(transport=httpx.MockTransport(handle))
    with Client("http://vf.test", http_client=http) as client:
        assert client.voices.list()[0].name == "a" and calls == ["GET", "GET"]
        with pytest.raises(APIConnectionError):
            client.voices.import_package(("p.tar.gz", b"x"))
    assert calls == ["GET", "GET", "POST"]


def test_non_json_errors_map_by_status_and_retry_after_parses() -> None:
    """Fake transport: an HTML 502 from a proxy, an empty 503."""
    answers = iter([httpx.Response(502, text="<html>bad gateway</html>"), httpx.Response(503)])
    http = httpx.Client(transport=httpx.MockTransport(lambda r: next(answers)))
    with Client("http://vf.test", max_retries=0, http_client=http) as client:
        with pytest.raises(ServerError) as proxy:
            client.voices.list()
        assert proxy.value.status == 502 and "bad gateway" in proxy.value.detail
        with pytest.raises(ServiceUnavailable) as busy:
            client.voices.list()
        assert busy.value.status == 503 and busy.value.retry_after is None
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
