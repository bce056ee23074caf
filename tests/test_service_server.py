"""A real server process on 127.0.0.1: streaming, the openai client, batching, hot-swap, load."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from server.voices import pack_directory
from tests.service_helpers import copy_demo_data, server_process, wav_samples

MODEL = "tiny"


def _import(url: str, package: Path, name: str, ref: Path | None = None) -> httpx.Response:
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    if ref is not None:
        files["ref_clip"] = ("ref.wav", ref.read_bytes(), "audio/wav")
    return httpx.post(f"{url}/voices/import", files=files, data={"name": name}, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen3_base, voice_package, speaker_dataset):
    data = tmp_path_factory.mktemp("server_data")
    settings = {
        "data_dir": str(data),
        "models": {MODEL: {"path": str(tiny_qwen3_base)}},
        "max_batch": 8,
        "batch_window_ms": 150,
        "max_queue": 6,
        "stream_chunk_frames": 3,
        "max_tokens_per_sentence": 12,
    }
    ref = speaker_dataset.parent / "ref.wav"
    with server_process(settings) as url:
        for name in ("alpha", "beta"):
            assert _import(url, voice_package, name, ref=ref).status_code == 201
        yield url


def test_streamed_wav_is_one_continuous_container(server):
    body = {
        "speaker": "alpha",
        "text": "First sentence here. Then a second one.",
        "stream": True,
        "max_tokens": 9,
        "seed": 2,
    }
    chunks = []
    with httpx.stream("POST", f"{server}/speak", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers.get("transfer-encoding") == "chunked"
        chunks = list(response.iter_bytes())
    data = b"".join(chunks)
    assert len(chunks) >= 3, "audio did not arrive in pieces"
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert data.count(b"RIFF") == 1, "one container per chunk"
    audio = np.frombuffer(data[44:], dtype="<i2")
    # Two sentences of at most 9 frames each, 1920 samples a frame.
    assert 0 < audio.size <= 2 * 9 * 1920 and audio.size % 2 == 0


def test_streamed_pcm_matches_the_requested_sentences(server):
    body = {
        "speaker": "alpha",
        "text": "Only one sentence.",
        "stream": True,
        "format": "pcm",
        "max_tokens": 6,
        "seed": 4,
    }
    response = httpx.post(f"{server}/speak", json=body, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm"
    assert len(response.content) == 6 * 1920 * 2


def test_long_unpunctuated_text_still_streams(server):
    text = " ".join(["word"] * 120)  # ~600 characters, no punctuation at all
    body = {"speaker": "beta", "text": text, "stream": True, "format": "pcm", "max_tokens": 2}
    response = httpx.post(f"{server}/speak", json=body, timeout=300)
    assert response.status_code == 200
    assert len(response.content) >= 2 * 2 * 1920 * 2  # more than one sentence-sized piece


def test_openai_python_client_speaks(server, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    result = client.audio.speech.create(
        model=MODEL, voice="alpha", input="Hello OpenAI.", response_format="wav"
    )
    audio, rate = sf.read(io.BytesIO(result.content))
    assert rate == 24_000 and audio.size > 0
    mp3 = client.audio.speech.create(
        model=MODEL, voice="beta", input="Hi.", response_format="mp3", speed=1.5
    )
    assert mp3.content[:3] == b"ID3" or mp3.content[0] == 0xFF
    with client.audio.speech.with_streaming_response.create(
        model=MODEL,
        voice="alpha",
        input="Streaming now.",
        response_format="pcm",
        extra_body={"stream_format": "audio"},
    ) as streamed:
        out = tmp_path / "s.pcm"
        streamed.stream_to_file(out)
    assert out.stat().st_size > 0 and out.stat().st_size % 2 == 0
    from openai import UnprocessableEntityError

    with pytest.raises(UnprocessableEntityError):
        client.audio.speech.create(model=MODEL, voice="alpha", input="x", response_format="m4a")


def test_two_adapters_in_one_batch_get_their_solo_audio(server):
    """Their frames are the same (the talker batches bit-exactly); their audio, decoded in one
    vocoder pass, within the stream's tolerance (1e-3 of full scale: 33 of 32768)."""
    bodies = [
        {"speaker": "alpha", "text": "First voice speaking.", "seed": 5, "max_tokens": 6},
        {"speaker": "beta", "text": "The second voice, longer.", "seed": 9, "max_tokens": 6},
    ]
    solo = [httpx.post(f"{server}/speak", json=b, timeout=120).content for b in bodies]

    async def together() -> list[bytes]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post(f"{server}/speak", json=b) for b in bodies)
            )
        return [r.content for r in responses]

    before = _batches(server)
    for got, alone in zip(asyncio.run(together()), solo, strict=True):
        got_pcm, alone_pcm = wav_samples(got).astype(int), wav_samples(alone).astype(int)
        assert got_pcm.shape == alone_pcm.shape
        assert np.abs(got_pcm - alone_pcm).max() <= 33
    after = _batches(server)
    assert after.get("2", 0) > before.get("2", 0), after
    assert wav_samples(solo[0]).size > 0


def _batches(url: str) -> dict[str, int]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("voicefoundry_batch_size_total"):
            size = line.split('size="')[1].split('"')[0]
            out[size] = int(float(line.rsplit(" ", 1)[1]))
    return out


def test_importing_a_voice_while_others_stream_fails_none(server, voice_package, speaker_dataset):
    failures: list[str] = []

    def stream(name: str) -> None:
        body = {
            "speaker": name,
            "text": "Streaming during an import. Still going.",
            "stream": True,
            "format": "pcm",
            "max_tokens": 8,
        }
        try:
            with httpx.stream("POST", f"{server}/speak", json=body, timeout=300) as r:
                data = b"".join(r.iter_bytes())
            if r.status_code != 200 or not data:
                failures.append(f"{name}: {r.status_code}")
        except httpx.HTTPError as exc:
            failures.append(f"{name}: {exc}")

    threads = [threading.Thread(target=stream, args=(n,)) for n in ("alpha", "beta", "alpha")]
    for t in threads:
        t.start()
    time.sleep(0.3)
    created = _import(server, voice_package, "gamma", ref=speaker_dataset.parent / "ref.wav")
    for t in threads:
        t.join(300)
    assert created.status_code == 201, created.text
    assert failures == []
    fresh = httpx.post(
        f"{server}/speak",
        json={"speaker": "gamma", "text": "New voice.", "max_tokens": 4},
        timeout=120,
    )
    assert fresh.status_code == 200 and wav_samples(fresh.content).size > 0


def test_a_full_queue_answers_503_with_retry_after(server):
    body = {"speaker": "alpha", "text": "A sentence. Another one. And a third.", "max_tokens": 12}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                *(client.post(f"{server}/speak", json=body) for _ in range(12))
            )

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"].isdigit()
    assert refused.headers["content-type"].startswith("application/problem+json")


def test_a_client_that_disconnects_frees_the_engine(server):
    body = {
        "speaker": "beta",
        "text": "This request is abandoned. " * 8,
        "stream": True,
        "format": "pcm",
        "max_tokens": 40,
    }
    with httpx.stream("POST", f"{server}/speak", json=body, timeout=120) as response:
        next(response.iter_bytes())
    # The cancelled request must not keep the engine busy: a new request is served promptly.
    start = time.monotonic()
    quick = httpx.post(
        f"{server}/speak", json={"speaker": "alpha", "text": "Quick.", "max_tokens": 2}, timeout=120
    )
    assert quick.status_code == 200
    assert time.monotonic() - start < 30
    depth = [
        ln
        for ln in httpx.get(f"{server}/metrics").text.splitlines()
        if ln.startswith("voicefoundry_queue_depth")
    ]
    assert depth == ["voicefoundry_queue_depth 0"]


def test_demo_mode_serves_every_family_offline(tmp_path, demo_data_dir):
    """The README's first command: `serve --demo` builds everything it needs (the session's
    `demo_data_dir`: a real `serve --demo` on an empty data dir), then serves, here from a copy
    of what it built: Qwen3-TTS voices (baked, adapter, clone), CSM speakers and a PersonaPlex
    duplex voice."""
    from server.duplex.demo import PROMPT_VOICES
    from tests.duplex_helpers import converse, user_audio, ws_url

    data = copy_demo_data(demo_data_dir, tmp_path / "data")
    settings = {"data_dir": str(data), "demo": True, "max_tokens_per_sentence": 4}
    with server_process(settings, timeout=600) as url:
        voices = {v["name"]: v["kind"] for v in httpx.get(f"{url}/voices").json()["voices"]}
        assert voices == {
            "demo-adapter": "adapter",
            "demo-baked": "baked",
            "demo-clone": "clone",
            "csm-tiny-0": "builtin",
            "csm-tiny-1": "builtin",
            "demo-duplex": "duplex",
            "personaplex-tiny": "duplex",
            # PersonaPlex's voice prompt names, for its web client's default URL
            **{name.lower(): "duplex" for name in PROMPT_VOICES},
        }
        for name, kind in voices.items():
            if kind == "duplex":
                continue
            r = httpx.post(f"{url}/speak", json={"speaker": name, "text": "Hi."}, timeout=120)
            assert r.status_code == 200 and wav_samples(r.content).size > 0
        talk = asyncio.run(
            converse(ws_url(url, speaker="demo-duplex"), audio=user_audio(0.8), min_audio_frames=8)
        )
        assert talk.kinds[:2] == [0x00, 0x04] and len(talk.audio) >= 8
        web = url.replace("http://", "ws://") + "/api/chat?encoding=pcm16&voice_prompt=NATF0.pt"
        talk = asyncio.run(converse(web, audio=user_audio(0.8), min_audio_frames=8))
        assert talk.metadata["speaker"] == "natf0" and len(talk.audio) >= 8


def test_graceful_shutdown_ends_in_flight_work_cleanly(
    tmp_path, tiny_qwen3_base, voice_package, speaker_dataset
):
    import os
    import signal
    import subprocess as sp

    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {MODEL: {"path": str(tiny_qwen3_base)}},
        "shutdown_grace_s": 3,
        "max_tokens_per_sentence": 400,
        "stream_chunk_frames": 2,
    }
    with server_process(settings) as url:
        pid = int(
            sp.run(
                ["pgrep", "-f", f"settings-{url.rsplit(':', 1)[1]}"], capture_output=True, text=True
            ).stdout.split()[0]
        )
        assert (
            _import(url, voice_package, "v", ref=speaker_dataset.parent / "ref.wav").status_code
            == 201
        )
        received: list[int] = []
        errors: list[str] = []

        def stream() -> None:
            body = {
                "speaker": "v",
                "text": "A very long sentence that goes on.",
                "stream": True,
                "format": "pcm",
            }
            try:
                with httpx.stream("POST", f"{url}/speak", json=body, timeout=120) as r:
                    for chunk in r.iter_bytes():
                        received.append(len(chunk))
            except httpx.HTTPError as exc:  # a cut stream is fine; a hang is not
                errors.append(type(exc).__name__)

        client = threading.Thread(target=stream)
        client.start()
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received, "no audio before shutdown"
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        client.join(60)
        assert not client.is_alive(), "the client hung after the server shut down"
        while _running(pid) and time.monotonic() - start < 30:
            time.sleep(0.2)
        assert not _running(pid), "the server did not stop after its grace period"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped by the test's Popen."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_voices_cli_imports_lists_and_deletes_on_a_running_server(
    server, voice_package, speaker_dataset
):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server", "voices", "--url", server, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    made = cli(
        "import",
        str(voice_package),
        "--name",
        "cli-voice",
        "--ref-clip",
        str(speaker_dataset.parent / "ref.wav"),
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "cli-voice"
    listed = cli("list")
    assert "cli-voice" in [v["name"] for v in json.loads(listed.stdout)["voices"]]
    again = cli("import", str(voice_package), "--name", "cli-voice")
    assert again.returncode == 1 and "409" in again.stderr
    assert cli("delete", "cli-voice").returncode == 0
    assert httpx.get(f"{server}/voices/cli-voice").status_code == 404
