"""Instant cloning (`POST /voices` strategy=clone) and text streamed in (`/speak/stream`), against
ONE real server process (a tiny Qwen3-TTS Base, API keys on), through raw HTTP / WebSocket, the
SDK (sync and async) and the client CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from voicefoundry_client import (
    AsyncClient,
    Client,
    Conflict,
    SpeechDone,
    SpeechSegment,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.auth import KeyStore
from tests.service_helpers import ROOT, server_process

RATE = 24_000
REF_TEXT = "Hello there, this is my voice."


@dataclass
class Server:
    url: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://") + "/speak/stream"


def clip(seconds: float, seed: int = 0) -> bytes:
    """A voiced-like clip: a wavering tone with noise, 24 kHz mono WAV."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    audio = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(3 * t)) * t) + 0.02 * rng.normal(
        size=t.size
    )
    buffer = io.BytesIO()
    sf.write(buffer, audio.astype(np.float32), RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_base: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("clone_stream")
    keys = KeyStore()
    key, _ = keys.add("admin", "clone tests")
    keys.save(root / "keys.json")
    settings = {
        "models": {"q": {"path": str(tiny_qwen3_base)}},
        "data_dir": str(root / "data"),
        "api_keys_file": str(root / "keys.json"),
        "max_tokens_per_sentence": 6,
        "speak_stream_flush_s": 30.0,
    }
    with server_process(settings, timeout=600) as url:
        yield Server(url, key)


def post_clone(server: Server, name: str, ref: tuple[str, bytes], **fields: str) -> httpx.Response:
    data = {"name": name, "strategy": "clone", **fields}
    files = {"ref": (ref[0], ref[1], "audio/wav")}
    return httpx.post(
        f"{server.url}/voices", data=data, files=files, headers=server.headers, timeout=300
    )


def speak(server: Server, voice: str, text: str = "Good morning.") -> httpx.Response:
    body = {"speaker": voice, "text": text, "seed": 7, "temperature": 0, "max_tokens": 6}
    return httpx.post(f"{server.url}/speak", json=body, headers=server.headers, timeout=300)


@pytest.fixture(scope="module")
def clones(server: Server) -> dict[str, Any]:
    """Two clones of one clip, each made and then spoken in the very next request."""
    ref = ("ref.wav", clip(3.0))
    made = {}
    for name, fields in (("icl-voice", {"ref_text": REF_TEXT}), ("xvec-voice", {})):
        created = post_clone(server, name, ref, **fields)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == f"/voices/{name}"
        spoken = speak(server, name)
        assert spoken.status_code == 200, spoken.text
        made[name] = (created.json(), spoken.content)
    return made


# --- instant cloning --------------------------------------------------------------------------
def test_the_icl_prompt_is_the_one_mlx_audio_builds(loaded_qwen3_base: Any) -> None:
    """The ICL layout (conditioning.Reference via layout.build_sequence) against mlx-audio's
    `_prepare_icl_generation_inputs` on the same clip, transcript and text."""
    from finetune.families.qwen3_tts.conditioning import VoiceConditioning
    from finetune.families.qwen3_tts.serving import Qwen3Prompter

    import mlx.core as mx

    model = loaded_qwen3_base.model
    wav = sf.read(io.BytesIO(clip(3.0)), dtype="float32")[0]
    prompter = Qwen3Prompter(model)
    reference = prompter.reference(wav, REF_TEXT)
    speaker = model.extract_speaker_embedding(mx.array(wav))[0]
    cond = VoiceConditioning(speaker="ref_clip").utterance(None, None)
    ours = prompter.prompt("Good morning.", cond, speaker, reference)
    theirs, _, _, codes = model._prepare_icl_generation_inputs(
        "Good morning.", mx.array(wav), REF_TEXT, language="auto"
    )
    assert (reference.codes == np.array(codes[0]).T).all() and reference.frames > 20
    assert ours.shape == theirs[0].shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs[0]), atol=1e-5)


def test_a_clone_speaks_on_the_next_request_by_either_path(clones: dict[str, Any]) -> None:
    icl, icl_audio = clones["icl-voice"]
    xvec, xvec_audio = clones["xvec-voice"]
    assert icl["kind"] == xvec["kind"] == "clone" and icl["has_ref_clip"]
    assert icl["meta"] == {"clone": "icl", "ref_text": REF_TEXT}
    assert xvec["meta"] == {"clone": "x_vector"}
    for audio in (icl_audio, xvec_audio):
        samples, rate = sf.read(io.BytesIO(audio))
        assert rate == RATE and samples.size > 0
    # Greedy, same seed and text: only the reference in context can make them differ.
    assert icl_audio != xvec_audio


def test_clone_uploads_are_refused_as_fine_tune_uploads_are(
    server: Server, clones: dict[str, Any]
) -> None:
    cases = [
        ("not-audio", ("notes.txt", b"hello"), 422, "not an audio file"),
        ("too-short", ("short.wav", clip(1.0)), 422, "2-30 s"),
        ("too-long", ("long.wav", clip(31.0)), 422, "30"),
        ("icl-voice", ("ref.wav", clip(3.0)), 409, "already exists"),
        ("bad name!", ("ref.wav", clip(3.0)), 422, "invalid voice name"),
    ]
    for name, ref, status, words in cases:
        answer = post_clone(server, name, ref)
        assert answer.status_code == status, (name, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert words in answer.json()["detail"], (name, answer.json())
    names = {
        v["name"]
        for v in httpx.get(f"{server.url}/voices", headers=server.headers).json()["voices"]
    }
    assert not names & {"not-audio", "too-short", "too-long"}


def test_sdk_and_cli_clone(server: Server, tmp_path: Path) -> None:
    ref = tmp_path / "me.wav"
    ref.write_bytes(clip(2.5, seed=4))
    with Client(server.url, api_key=server.key) as client:
        voice = client.voices.clone("sdk-icl", ref, text=REF_TEXT)
        assert voice.kind == "clone" and voice.meta["clone"] == "icl"
        with pytest.raises(Conflict):
            client.voices.clone("sdk-icl", ref)

    async def run() -> None:
        async with AsyncClient(server.url, api_key=server.key) as client:
            voice = await client.voices.clone("sdk-async", ("clip.wav", clip(2.5, seed=5)))
            assert voice.meta["clone"] == "x_vector"

    asyncio.run(run())
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEFOUNDRY_")}
    env["VOICEFOUNDRY_API_KEY"] = server.key
    command = [sys.executable, "-m", "server", "voices", "clone", "cli-voice", "--ref", str(ref),
               "--text", REF_TEXT, "--url", server.url]  # fmt: skip
    result = subprocess.run(command, capture_output=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["meta"]["clone"] == "icl"


# --- /speak/stream ----------------------------------------------------------------------------
def receive_until_segment(ws: Any) -> tuple[int, dict[str, Any]]:
    """Audio messages received, then the segment message that ends them."""
    audio = 0
    while True:
        message = ws.recv(timeout=300)
        if isinstance(message, bytes):
            audio += len(message)
            continue
        event = json.loads(message)
        assert event["type"] == "segment", event
        return audio, event


def test_the_first_sentence_is_spoken_before_the_rest_is_sent(
    server: Server, clones: dict[str, Any]
) -> None:
    start = {"voice": "xvec-voice", "format": "pcm", "seed": 3, "text": "Hello there. How are"}
    with connect(server.ws, additional_headers=server.headers) as ws:
        ws.send(json.dumps(start))
        # Nothing else is sent until the first sentence's audio is here (the server's flush
        # wait is 30 s, and the test would block on `recv` were it waiting for more text).
        audio, first = receive_until_segment(ws)
        assert first["text"] == "Hello there." and audio > 0 and first["audio_seconds"] > 0
        ws.send(json.dumps({"text": " you today?"}))
        ws.send(json.dumps({"close": True}))
        audio, second = receive_until_segment(ws)
        assert second["text"] == "How are you today?" and audio > 0
        done = json.loads(ws.recv(timeout=300))
        assert done["type"] == "done"
        assert done["usage"]["segments"] == 2
        assert done["usage"]["characters"] == len("Hello there.How are you today?")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_text_without_a_sentence_end_is_flushed_after_the_wait_or_on_flush(
    server: Server, clones: dict[str, Any]
) -> None:
    start = {"voice": "xvec-voice", "text": "Hello there", "flush_after_s": 0.2}
    with connect(server.ws, additional_headers=server.headers) as ws:
        ws.send(json.dumps(start))
        audio, event = receive_until_segment(ws)  # nothing more sent: only the wait explains it
        assert event["text"] == "Hello there" and audio > 0
        ws.send(json.dumps({"text": "And then", "flush": True}))
        assert receive_until_segment(ws)[1]["text"] == "And then"
        ws.send(json.dumps({"close": True}))
        assert json.loads(ws.recv(timeout=300))["usage"]["segments"] == 2


@pytest.mark.parametrize(
    ("first", "headers", "code", "words"),
    [
        ({"voice": "icl-voice", "bogus": 1}, True, 4400, "unknown field"),
        ("not json", True, 4400, "malformed JSON"),
        ({"voice": "nobody"}, True, 4404, "unknown speaker"),
        ({"voice": "icl-voice", "format": "flac"}, True, 4422, "cannot be streamed"),
        ({"voice": "icl-voice"}, False, 4401, ""),
    ],
)
def test_stream_refusals_close_with_44xx_and_a_reason(
    server: Server, clones: dict[str, Any], first: Any, headers: bool, code: int, words: str
) -> None:
    with (
        connect(server.ws, additional_headers=server.headers if headers else {}) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.send(first if isinstance(first, str) else json.dumps(first))
        ws.recv(timeout=60)
    rcvd = closed.value.rcvd
    assert rcvd is not None and rcvd.code == code, rcvd
    assert words in rcvd.reason and rcvd.reason


def test_sdk_speak_streaming_input(server: Server, clones: dict[str, Any]) -> None:
    first_spoken = threading.Event()

    def deltas() -> Iterator[str]:
        yield "Hello there. How are"
        assert first_spoken.wait(300), "the first sentence was not spoken before more text"
        yield " you today?"

    events = []
    with Client(server.url, api_key=server.key) as client:
        for event in client.speak_streaming_input(deltas(), "xvec-voice", seed=1):
            events.append(event)
            if isinstance(event, SpeechSegment):
                first_spoken.set()
    segments = [e.text for e in events if isinstance(e, SpeechSegment)]
    assert segments == ["Hello there.", "How are you today?"]
    assert isinstance(events[0], bytes) and isinstance(events[-1], SpeechDone)
    assert events[-1].usage["segments"] == 2

    async def run() -> list[Any]:
        async def adeltas() -> Any:
            for piece in ("Good ", "morning! Bye"):
                yield piece

        async with AsyncClient(server.url, api_key=server.key) as client:
            return [e async for e in client.speak_streaming_input(adeltas(), "xvec-voice")]

    got = asyncio.run(run())
    assert [e.text for e in got if isinstance(e, SpeechSegment)] == ["Good morning!", "Bye"]
    assert isinstance(got[-1], SpeechDone)
