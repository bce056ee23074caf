"""`GET /duplex` on a real server process, driven by a real `websockets` client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sphn
import websockets

from server.voices import pack_directory
from tests.duplex_helpers import (
    FRAME,
    converse,
    handshake_payload,
    rejected,
    user_audio,
    write_duplex_package,
    ws_url,
)
from tests.service_helpers import server_process

MODEL = "pp-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_personaplex, loaded_personaplex):
    data = tmp_path_factory.mktemp("duplex_server")
    package = write_duplex_package(loaded_personaplex, data / "package", seed=3)
    settings = {
        "data_dir": str(data / "data"),
        "models": {MODEL: {"path": str(tiny_personaplex), "family": "personaplex"}},
        "duplex_max_sessions": 6,
        "duplex_max_inbox_frames": 64,
    }
    with server_process(settings) as url:
        files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
        response = httpx.post(
            f"{url}/voices/import", files=files, data={"name": "tuned"}, timeout=120
        )
        assert response.status_code == 201, response.text
        DATA_DIRS[url] = data / "data"
        yield url


DATA_DIRS: dict[str, Path] = {}


def _server_logs(url: str) -> list[Path]:
    port = url.rsplit(":", 1)[1]
    return list(DATA_DIRS[url].glob(f"settings-{port}.log"))


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for_sessions(url: str, expected: int, timeout: float = 30.0) -> None:
    _wait_for_metric(url, "voicefoundry_duplex_sessions", expected, timeout)


def _wait_for_metric(url: str, name: str, expected: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := _metric(url, name)) != expected:
        assert time.monotonic() < deadline, f"{name} stayed {value}, not {expected}"
        time.sleep(0.2)


def test_three_seconds_stream_handshake_then_audio_and_text_in_order(server):
    audio = user_audio(3.0, seed=1)
    talk = asyncio.run(
        # seed 7: one whose tiny random model speaks some text within 3 s (many do not)
        converse(ws_url(server, speaker=MODEL, seed=7), audio=audio, min_audio_frames=36)
    )
    assert talk.kinds[0] == 0x00, "the handshake comes first"
    assert talk.kinds[1] == 0x04, "session metadata follows the handshake"
    assert talk.metadata["sample_rate"] == 24_000 and talk.metadata["frame_samples"] == FRAME
    assert talk.metadata["model"] == MODEL and talk.metadata["encoding"] == "pcm16"
    assert len(talk.audio) >= 36
    assert all(len(frame) == 2 * FRAME for frame in talk.audio)
    assert talk.text, "the model's inner-monologue text tokens are streamed"
    first_audio = talk.kinds.index(0x01)
    assert 0x02 not in talk.kinds[:first_audio], "text for a step follows that step's audio"
    assert not talk.errors


def test_handshake_carries_protocol_and_model_versions(server):
    async def first_message() -> bytes:
        import websockets

        async with websockets.connect(ws_url(server, speaker=MODEL)) as ws:
            return await ws.recv()

    message = asyncio.run(first_message())
    assert message[0] == 0x00 and handshake_payload(message) == (0, 0)


def test_four_concurrent_sessions_all_run_and_are_batched(server):
    before = json.loads(json.dumps(_batch_sizes(server)))

    async def four() -> list:
        return await asyncio.gather(
            *(
                converse(
                    ws_url(server, speaker=MODEL, seed=i),
                    audio=user_audio(2.0, seed=10 + i),
                    min_audio_frames=24,
                )
                for i in range(4)
            )
        )

    talks = asyncio.run(four())
    for talk in talks:
        assert talk.kinds[:2] == [0x00, 0x04]
        assert len(talk.audio) >= 24 and not talk.errors
    assert len({t.metadata["session_id"] for t in talks}) == 4
    after = _batch_sizes(server)
    batched = sum(n - before.get(size, 0) for size, n in after.items() if int(size) > 1)
    assert batched > 0, f"no tick stepped more than one session together: {after}"


def _batch_sizes(url: str) -> dict[str, int]:
    sizes = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("voicefoundry_duplex_batch_size_total{"):
            size = line.split('size="')[1].split('"')[0]
            sizes[size] = int(float(line.rsplit(" ", 1)[1]))
    return sizes


def test_same_seed_same_audio_and_an_adapter_voice_differs(server):
    audio = user_audio(1.6, seed=2)

    def run(speaker: str):
        url = ws_url(server, speaker=speaker, seed=7, text_prompt="Hello there.")
        return asyncio.run(converse(url, audio=audio, min_audio_frames=20))

    base_a, base_b, tuned = run(MODEL), run(MODEL), run("tuned")
    assert base_a.pcm[: 20 * FRAME].tolist() == base_b.pcm[: 20 * FRAME].tolist()
    assert base_a.text[:5] == base_b.text[:5]
    assert not np.array_equal(base_a.pcm[: 20 * FRAME], tuned.pcm[: 20 * FRAME])
    voice = httpx.get(f"{server}/voices/tuned", timeout=10).json()
    assert voice["kind"] == "duplex" and voice["has_adapter"] and voice["has_ref_clip"]


def test_malformed_frames_get_errors_and_the_session_goes_on(server):
    bad = [b"", b"\x09junk", b"\x03\x07", b"\x00", "a text frame"]
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL),
            before=bad,
            audio=user_audio(1.0),
            min_audio_frames=10,
        )
    )
    assert len(talk.errors) == len(bad), talk.errors
    assert any("unknown message kind 0x09" in e for e in talk.errors)
    assert any("control" in e for e in talk.errors)
    assert len(talk.audio) >= 10, "the session kept running after the bad frames"
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200


def test_ping_gets_a_pong(server):
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL),
            before=[b"\x06"],
            audio=user_audio(0.4),
            min_audio_frames=5,
        )
    )
    assert 0x06 in talk.kinds


def test_dropped_sockets_free_their_sessions(server):
    _wait_for_sessions(server, 0)
    references = f'voicefoundry_duplex_adapter_references{{model="{MODEL}"}}'
    assert _metric(server, references) == 0
    # Three clients that vanish without a close handshake, mid-stream; the adapter voice's
    # session holds a reference on its bank slot while it runs.
    for i, speaker in enumerate((MODEL, "tuned", MODEL)):
        host, port = server.removeprefix("http://").split(":")
        raw = socket.create_connection((host, int(port)))
        raw.sendall(
            (
                f"GET /duplex?speaker={speaker} HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        assert b"101" in raw.recv(1024).split(b"\r\n")[0]
        time.sleep(0.5 + 0.2 * i)
        if speaker == "tuned":
            _wait_for_metric(server, references, 1)
        raw.close()
    _wait_for_sessions(server, 0)
    _wait_for_metric(server, references, 0)
    talk = asyncio.run(
        converse(ws_url(server, speaker=MODEL), audio=user_audio(0.8), min_audio_frames=8)
    )
    assert len(talk.audio) >= 8
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200


def test_unknown_speaker_and_bad_parameters_are_refused(server):
    talk = asyncio.run(rejected(ws_url(server, speaker="nobody")))
    assert talk.close_code == 4404 and "nobody" in talk.errors[0]
    # A name no voice can have (the web clients' voice file name) was a bare 4500.
    before = _metric(server, 'voicefoundry_duplex_rejected_total{code="4404"}')
    talk = asyncio.run(rejected(ws_url(server, speaker="NATF0.pt")))
    assert talk.close_code == 4404 and "NATF0.pt" in talk.errors[0]
    assert _metric(server, 'voicefoundry_duplex_rejected_total{code="4404"}') == before + 1
    talk = asyncio.run(rejected(ws_url(server, speaker=MODEL, encoding="mp3")))
    assert talk.close_code == 4422 and "encoding" in talk.errors[0]


def test_api_chat_with_no_voice_and_no_default_speaks_as_the_first_model(server):
    writer = sphn.OpusStreamWriter(24_000)
    audio = user_audio(0.8, seed=4)
    pages = [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    url = server.replace("http://", "ws://") + "/api/chat"
    talk = asyncio.run(converse(url, before=[b"\x01" + p for p in pages if p], min_audio_frames=3))
    assert talk.metadata["speaker"] == MODEL and talk.metadata["encoding"] == "opus"


def test_opus_sessions_stream_decodable_ogg_opus(server):
    writer = sphn.OpusStreamWriter(24_000)
    audio = user_audio(1.6, seed=4)
    pages = [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL, encoding="opus"),
            before=[b"\x01" + p for p in pages if p],
            min_audio_frames=10,
        )
    )
    assert talk.metadata["encoding"] == "opus"
    reader = sphn.OpusStreamReader(24_000)
    decoded = np.concatenate([np.asarray(reader.append_bytes(p)).reshape(-1) for p in talk.audio])
    assert decoded.dtype == np.float32 and len(decoded) >= 8 * FRAME


def test_duplex_voices_cannot_speak_over_http(server):
    response = httpx.post(f"{server}/speak", json={"speaker": "tuned", "text": "hello"}, timeout=30)
    assert response.status_code == 422
    assert "duplex" in response.json()["detail"]


def test_api_keys_guard_duplex_sessions(tmp_path, tiny_personaplex):
    from server.auth import KeyStore

    store = KeyStore([])
    secret, _ = store.add("speak", label="duplex test")
    store.save(tmp_path / "keys.json")
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {MODEL: {"path": str(tiny_personaplex), "family": "personaplex"}},
        "api_keys_file": str(tmp_path / "keys.json"),
    }
    with server_process(settings) as url:
        missing = asyncio.run(rejected(ws_url(url, speaker=MODEL)))
        assert missing.close_code == 4401 and "missing API key" in missing.errors[0]
        wrong = asyncio.run(
            rejected(ws_url(url, speaker=MODEL), headers={"Authorization": "Bearer vf_nope"})
        )
        assert wrong.close_code == 4401
        talk = asyncio.run(
            converse(
                ws_url(url, speaker=MODEL),
                audio=user_audio(0.8),
                min_audio_frames=8,
                headers={"Authorization": f"Bearer {secret}"},
            )
        )
        assert talk.kinds[:2] == [0x00, 0x04] and len(talk.audio) >= 8
        by_query = asyncio.run(
            converse(
                ws_url(url, speaker=MODEL, api_key=secret),
                audio=user_audio(0.4),
                min_audio_frames=4,
            )
        )
        assert len(by_query.audio) >= 4
        # Request lines are logged (HTTP access log, WebSocket "accepted"): never the key.
        assert httpx.get(f"{url}/voices", params={"api_key": secret}).status_code == 401
        refused = asyncio.run(rejected(ws_url(url, speaker="NATF0.pt", api_key=secret)))
        assert refused.close_code == 4404
    log = "".join(p.read_text() for p in (tmp_path / "data").glob("settings-*.log"))
    assert secret not in log
    assert 'GET /voices?api_key=*** HTTP/1.1" 401' in log
    assert '"WebSocket /duplex?speaker=pp-tiny&api_key=***" [accepted]' in log
    # A refused session is logged with its code and reason (and counted in /metrics).
    assert "duplex session refused (4404)" in log and "NATF0.pt" in log


def test_the_session_limit_is_a_4429_refusal_with_its_reason(server):
    """At `duplex_max_sessions` live sessions the next one is refused like every other refusal:
    a 44xx code and an 0x05 reason (it was 1013), counted in the rejection metric."""

    async def at_the_limit() -> tuple[int | None, list[str]]:
        url = ws_url(server, speaker=MODEL)
        held = []
        try:
            for _ in range(6):  # the module server's duplex_max_sessions
                ws = await websockets.connect(url)
                held.append(ws)
                first = await asyncio.wait_for(ws.recv(), timeout=60)
                assert isinstance(first, bytes) and first[0] == 0x00  # live
            talk = await rejected(url)
            return talk.close_code, talk.errors
        finally:
            for ws in held:
                await ws.close()

    try:
        before = _metric(server, 'voicefoundry_duplex_rejected_total{code="4429"}')
    except AssertionError:  # no 4429 counted yet
        before = 0.0
    code, errors = asyncio.run(at_the_limit())
    assert code == 4429
    assert errors and "limit" in errors[0] and "try again" in errors[0]
    assert _metric(server, 'voicefoundry_duplex_rejected_total{code="4429"}') == before + 1


def test_the_hosted_clients_identity_fields_are_accepted_and_never_logged(server):
    """NVIDIA's hosted PersonaPlex client adds worker_auth_id / email when set: they were 4422
    unknown fields; now accepted, ignored, and redacted in the request log."""
    writer = sphn.OpusStreamWriter(24_000)
    audio = user_audio(0.8, seed=5)
    pages = [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    url = server.replace("http://", "ws://") + "/api/chat?worker_auth_id=w-secret&email=me%40x.io"
    talk = asyncio.run(converse(url, before=[b"\x01" + p for p in pages if p], min_audio_frames=3))
    assert talk.metadata["encoding"] == "opus"
    log = "".join(p.read_text() for p in _server_logs(server))
    assert "w-secret" not in log and "me%40x.io" not in log
