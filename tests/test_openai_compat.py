"""The real `openai` package against a real server: SSE streaming, AAC, voices and models."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from openai import AuthenticationError, NotFoundError, OpenAI, UnprocessableEntityError

from server.aac import ADTS_SAMPLE_RATES
from server.auth import KeyStore
from tests.service_helpers import server_process

MODEL = "tiny"
SAMPLES_PER_FRAME = 1920  # 24 kHz at 12.5 codec frames a second


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_custom: Path):
    root = tmp_path_factory.mktemp("openai")
    store = KeyStore([])
    key, _ = store.add("speak", label="openai client")
    store.save(root / "keys.json")
    settings = {
        "data_dir": str(root / "data"),
        "models": {MODEL: {"path": str(tiny_qwen3_custom)}},
        "api_keys_file": str(root / "keys.json"),
        "max_tokens_per_sentence": 5,
        "stream_chunk_frames": 2,
        "max_request_audio_seconds": 1.0,  # 12.5 codec frames: two sentences of 5 fit
    }
    with server_process(settings) as url:
        listed = httpx.get(f"{url}/voices", headers={"X-API-Key": key}, timeout=30).json()
        speakers = sorted(v["name"] for v in listed["voices"])
        client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        yield url, key, client, speakers


def _sse(lines: list[str]) -> list[dict[str, Any]]:
    """The `data:` payloads of an event stream, each checked against its `event:` line."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            payload = json.loads(line.removeprefix("data: "))
            assert payload["type"] == name
            events.append(payload)
    return events


def _adts_frames(data: bytes) -> list[bytes]:
    """Walks ADTS frame by frame: each header must be AAC-LC, 24 kHz, mono, no CRC."""
    frames, at = [], 0
    while at < len(data):
        head = int.from_bytes(data[at : at + 7], "big")
        assert head >> 44 == 0xFFF, f"no ADTS sync word at byte {at}"
        assert (head >> 40) & 1 == 1 and (head >> 38) & 3 == 1  # no CRC, LC profile
        assert ADTS_SAMPLE_RATES[(head >> 34) & 0xF] == 24_000 and (head >> 30) & 7 == 1
        length = (head >> 13) & 0x1FFF
        frames.append(data[at : at + length])
        at += length
    assert at == len(data) and frames
    return frames


def _decode_aac(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="aac") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.sample_rate == 24_000
        return np.concatenate([f.to_ndarray()[0] for f in container.decode(stream)])


def test_sse_stream_sends_openai_events(served):
    _, _, client, speakers = served
    text = "First sentence here. Then a second one."
    with client.audio.speech.with_streaming_response.create(
        model=MODEL, voice=speakers[0], input=text, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(list(response.iter_lines()))
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 2, "the audio came in one piece"
    assert {e["type"] for e in deltas} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(e["audio"], validate=True) for e in deltas)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] == len(text)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # Two sentences of at most 5 codec frames; the PCM holds exactly the frames counted.
    assert 0 < usage["output_tokens"] <= 10
    assert len(audio) == usage["output_tokens"] * SAMPLES_PER_FRAME * 2


def test_sse_carries_aac_and_whole_aac_decodes(served):
    _, _, client, speakers = served
    with client.audio.speech.with_streaming_response.create(
        model=MODEL,
        voice=speakers[0],
        input="Streaming AAC.",
        response_format="aac",
        stream_format="sse",
    ) as response:
        events = _sse(list(response.iter_lines()))
    streamed = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    frames = events[-1]["usage"]["output_tokens"]
    _adts_frames(streamed)
    decoded = _decode_aac(streamed)
    # The encoder's 1024-sample priming and the last frame's padding, no more.
    assert frames * SAMPLES_PER_FRAME <= decoded.size <= frames * SAMPLES_PER_FRAME + 3 * 1024

    whole = client.audio.speech.create(  # the openai package's custom-voice form of `voice`
        model=MODEL, voice={"id": speakers[-1]}, input="A whole AAC file.", response_format="aac"
    )
    assert whole.response.headers["content-type"] == "audio/aac"
    assert len(_adts_frames(whole.content)) >= 2
    assert _decode_aac(whole.content).size >= SAMPLES_PER_FRAME
    with client.audio.speech.with_streaming_response.create(
        model=MODEL,
        voice=speakers[0],
        input="Raw AAC.",
        response_format="aac",
        stream_format="audio",
    ) as raw:
        assert raw.headers["content-type"] == "audio/aac"
        _adts_frames(raw.read())


def test_a_request_stopped_mid_stream_ends_with_an_error_event(served):
    _, _, client, speakers = served
    text = " ".join(f"Sentence number {n}." for n in range(6))  # 30 frames: over the budget
    with client.audio.speech.with_streaming_response.create(
        model=MODEL, voice=speakers[0], input=text, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.status_code == 200
        events = _sse(list(response.iter_lines()))
    assert events[0]["type"] == "speech.audio.delta"
    assert [e["type"] for e in events].count("speech.audio.done") == 0
    error = events[-1]
    assert error["type"] == "speech.audio.error"
    assert error["error"]["code"] == 413
    assert "max_request_audio_seconds" in error["error"]["message"]


def test_models_and_voices_listings(served):
    url, key, client, speakers = served
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "voicefoundry"
    assert models.data[0].created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError):
        client.models.retrieve("nope")

    headers = {"Authorization": f"Bearer {key}"}
    voices = httpx.get(f"{url}/v1/audio/voices", headers=headers, timeout=30).json()
    assert voices["object"] == "list"
    assert voices["voices"] == speakers and len(speakers) >= 2
    assert [v["id"] for v in voices["data"]] == speakers
    assert {v["model"] for v in voices["data"]} == {MODEL}
    assert {v["object"] for v in voices["data"]} == {"audio.voice"}
    one = httpx.get(f"{url}/v1/audio/voices", params={"model": MODEL}, headers=headers)
    assert one.json()["voices"] == speakers
    unknown = httpx.get(f"{url}/v1/audio/voices", params={"model": "nope"}, headers=headers)
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/problem+json")
    assert "nope" in unknown.json()["detail"]


def test_discovery_and_sse_need_a_key(served):
    url, _, _, speakers = served
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/v1/audio/voices"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 401, path
    keyless = OpenAI(base_url=f"{url}/v1", api_key="vf_00000000_wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        keyless.models.list()
    with pytest.raises(AuthenticationError):
        keyless.audio.speech.create(model=MODEL, voice=speakers[0], input="x", stream_format="sse")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"stream_format": "chunks"}, "stream_format"),
        ({"stream_format": "sse", "response_format": "flac"}, "cannot be streamed"),
        ({"stream_format": "sse", "speed": 1.5}, "speed"),
        ({"response_format": "ogg"}, "aac"),  # the allowed formats are listed, aac among them
    ],
)
def test_bad_streaming_requests_are_clear_422s(served, fields, needle):
    _, _, client, speakers = served
    body = {"model": MODEL, "voice": speakers[0], "input": "x", **fields}
    with pytest.raises(UnprocessableEntityError) as info:
        client.post("/audio/speech", body=body, cast_to=httpx.Response)
    assert needle in info.value.response.text
