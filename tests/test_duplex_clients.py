"""The Moshi and PersonaPlex clients against a real server process, unchanged.

- Kyutai's Python client (`moshi.client` from PyPI moshi 0.2.13, run as installed; only
  `sounddevice` is a fake real-time sound card, tests/fake_sounddevice.py) connects to
  `/api/chat` with no parameters and Ogg/Opus both ways, and plays the model's audio and
  prints its text.
- NVIDIA's PersonaPlex web client: its exact default URL (the query string its `buildURL`
  writes, `voice_prompt=NATF0.pt`) and message order (wait for the handshake, then Ogg/Opus
  pages), copied byte for byte.
- The clients' parameters are applied: temperature, seeds, pad_mult change the output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import sphn
import websockets

from server.voices import pack_directory
from tests.duplex_helpers import FRAME, RATE, converse, rejected, user_audio, ws_url
from tests.moshi_client_run import CTRL_C_MARK
from tests.service_helpers import ROOT, server_process

MODEL = "pp-tiny"
WEB_VOICE = "natf0"  # what the web client's default voice_prompt=NATF0.pt names
# Conversation.tsx's buildURL with useModelParams' defaults, as the browser's URLSearchParams
# writes them (spaces as '+'); text_seed / audio_seed are the client's random draws.
PERSONAPLEX_QUERY = (
    "text_temperature=0.7&text_topk=25&audio_temperature=0.8&audio_topk=250&pad_mult=0"
    "&text_seed={text_seed}&audio_seed={audio_seed}&repetition_penalty_context=64"
    "&repetition_penalty=1&text_prompt=You+are+a+wise+and+friendly+teacher.+Answer+questions"
    "+or+provide+advice+in+a+clear+and+engaging+way.&voice_prompt=NATF0.pt"
)


def _prompt_voice_package(out: Path, name: str) -> Path:
    out.mkdir(parents=True)
    t = np.arange(RATE) / RATE
    import soundfile as sf

    sf.write(out / "voice_prompt.wav", 0.2 * np.sin(2 * np.pi * 200 * t), RATE)
    meta = {
        "format": "voicefoundry.voice/1",
        "family": "personaplex",
        "kind": "duplex",
        "strategy": "duplex",
        "name": name,
        "adapter": None,
        "voice_prompt": "voice_prompt.wav",
        "text_prompt": "You are kind.",
    }
    (out / "voice.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def talkative_personaplex(tiny_personaplex, tmp_path_factory) -> Path:
    """The tiny PersonaPlex with its text head limited to the tiny tokenizer's pieces (200 of
    the 32000 ids; the others carry no text), so that its text stream says something on most
    steps rather than on one in ~40: the clients' text is then seen within a few seconds."""
    import finetune  # noqa: F401  (loads the BLAS before mlx)

    import mlx.core as mx
    import sentencepiece

    out = tmp_path_factory.mktemp("talkative") / "personaplex"
    shutil.copytree(tiny_personaplex, out)
    weights, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    pieces = sentencepiece.SentencePieceProcessor(
        model_file=str(out / "tokenizer_spm_32k_3.model")
    ).get_piece_size()
    head = np.array(weights["text_linear.weight"].astype(mx.float32))
    head[pieces:] = 0.0
    head[:pieces] *= 4.0
    weights["text_linear.weight"] = mx.array(head).astype(mx.bfloat16)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata=metadata)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, talkative_personaplex):
    data = tmp_path_factory.mktemp("duplex_clients")
    settings = {
        "data_dir": str(data / "data"),
        "models": {MODEL: {"path": str(talkative_personaplex), "family": "personaplex"}},
        "duplex_default_voice": WEB_VOICE,
        "duplex_max_inbox_frames": 64,
    }
    with server_process(settings) as url:
        package = _prompt_voice_package(data / "package", WEB_VOICE)
        files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
        response = httpx.post(
            f"{url}/voices/import", files=files, data={"name": WEB_VOICE}, timeout=120
        )
        assert response.status_code == 201, response.text
        yield url


def test_kyutai_moshi_client_unchanged_holds_a_conversation(server, tmp_path):
    mic = tmp_path / "mic.npy"
    np.save(mic, user_audio(3.0, seed=2))
    out = tmp_path / "speaker.npy"
    port = server.rsplit(":", 1)[1]
    env = {
        **os.environ,
        "FAKE_SD_MIC": str(mic),
        "FAKE_SD_OUT": str(out),
        "FAKE_SD_SECONDS": "5",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.moshi_client_run", "--host", "127.0.0.1", "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ws://127.0.0.1:{port}/api/chat" in proc.stderr  # the path the client appends
    # A loss while the conversation runs is a failure; after the harness's Ctrl-C the client
    # tears its socket down under its own microphone thread and may report that as a loss, and
    # its teardown may hang (the harness then prints its threads after HUNG_MARK and ends it).
    during = proc.stderr.split(CTRL_C_MARK)[0]
    lost = "Lost connection" in during or "ogg" in proc.stderr.lower()
    assert not lost, f"stdout: {proc.stdout[-500:]!r}; stderr: {proc.stderr[-1500:]}"
    assert proc.stdout.strip(), "the model's text tokens are printed"
    played = np.load(out)
    frames = played[: len(played) // FRAME * FRAME].reshape(-1, FRAME)
    voiced = int((np.abs(frames).max(axis=1) > 1e-4).sum())
    assert voiced >= 12, f"only {voiced} frames of the model's audio were played"


async def _personaplex_web_client(url: str, seconds: float) -> dict:
    """The web client's socket: connect, wait for the handshake (useSocket's "connected"),
    then send the recorder's Ogg/Opus pages at real time; decode what comes back as
    decodeMessage does (every kind it knows; metadata must be JSON)."""
    writer = sphn.OpusStreamWriter(RATE)
    reader = sphn.OpusStreamReader(RATE)
    audio = user_audio(seconds, seed=6)
    got: dict = {"kinds": [], "pcm": [], "text": [], "metadata": None}
    async with websockets.connect(url, max_size=None) as ws:
        first = await asyncio.wait_for(ws.recv(), 60)
        got["kinds"].append(first[0])
        assert first[0] == 0x00, "the client sends nothing before the handshake"

        async def receive() -> None:
            async for message in ws:
                kind = message[0]
                got["kinds"].append(kind)
                assert kind in range(0x00, 0x07), f"decodeMessage throws on kind {kind}"
                if kind == 0x01:
                    got["pcm"].append(np.asarray(reader.append_bytes(message[1:])).reshape(-1))
                elif kind == 0x02:
                    got["text"].append(message[1:].decode("utf-8"))
                elif kind == 0x04:
                    got["metadata"] = json.loads(message[1:])
                if sum(len(p) for p in got["pcm"]) >= 12 * FRAME and got["text"]:
                    return

        task = asyncio.create_task(receive())
        for start in range(0, len(audio), FRAME):
            page = writer.append_pcm(audio[start : start + FRAME])
            if page:
                await ws.send(b"\x01" + page)
            await asyncio.sleep(FRAME / RATE)
            if task.done():
                break
        await asyncio.wait_for(task, 60)
    return got


def test_personaplex_web_client_default_url_and_message_order(server):
    query = PERSONAPLEX_QUERY.format(text_seed=417022, audio_seed=720324)
    url = server.replace("http://", "ws://") + "/api/chat?" + query
    got = asyncio.run(_personaplex_web_client(url, 3.0))
    assert got["kinds"][:2] == [0x00, 0x04]
    assert got["metadata"]["speaker"] == WEB_VOICE and got["metadata"]["encoding"] == "opus"
    assert 0x05 not in got["kinds"]
    assert sum(len(p) for p in got["pcm"]) >= 12 * FRAME and got["text"]


def test_api_chat_without_parameters_uses_the_default_voice_and_opus(server):
    writer = sphn.OpusStreamWriter(RATE)
    audio = user_audio(1.0, seed=1)
    pages = [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    url = server.replace("http://", "ws://") + "/api/chat"
    talk = asyncio.run(converse(url, before=[b"\x01" + p for p in pages if p], min_audio_frames=3))
    assert talk.metadata["speaker"] == WEB_VOICE and talk.metadata["encoding"] == "opus"
    assert bytes(talk.audio[0][:4]) == b"OggS"


def test_pcm_session_sent_ogg_pages_is_told_to_ask_for_opus(server):
    writer = sphn.OpusStreamWriter(RATE)
    audio = user_audio(0.8, seed=1)
    pages = [writer.append_pcm(audio[i : i + FRAME]) for i in range(0, len(audio), FRAME)]
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL),
            before=[b"\x01" + p for p in pages if p],
            audio=user_audio(0.4),
            min_audio_frames=4,
        )
    )
    assert len(talk.errors) == 1 and "encoding=opus" in talk.errors[0]
    assert len(talk.audio) >= 4  # the PCM that followed was heard


def _pcm(server: str, frames: int = 12, **params) -> tuple[bytes, str]:
    talk = asyncio.run(
        converse(
            ws_url(server, speaker=MODEL, **params),
            audio=user_audio(frames * FRAME / RATE + 0.4, seed=3),
            min_audio_frames=frames,
        )
    )
    assert not talk.errors, talk.errors
    return b"".join(talk.audio[:frames]), "".join(talk.text)


def test_sampling_parameters_change_the_output(server):
    hot = {"text_temperature": 1.5, "audio_temperature": 1.5}
    same_a = _pcm(server, seed=11, **hot)
    same_b = _pcm(server, seed=11, **hot)
    assert same_a == same_b, "the same seed gives the same audio"
    greedy = _pcm(server, seed=11, text_temperature=0, audio_temperature=0)
    assert greedy[0] != same_a[0], "temperature 0 and 1.5 sound different"
    other_audio_seed = _pcm(server, seed=11, audio_seed=12, **hot)
    assert other_audio_seed[0] != same_a[0]
    random_a = _pcm(server, seed=-1, **hot)
    random_b = _pcm(server, seed=-1, **hot)
    assert random_a[0] != random_b[0], "seed=-1 is a random seed each session"
    # pad_mult: a large bias on the padding token leaves the text stream silent.
    assert greedy[1], "the greedy session says something"
    assert _pcm(server, seed=11, text_temperature=0, audio_temperature=0, pad_mult=100)[1] == ""


def test_client_parameters_out_of_bounds_are_refused(server):
    for params, field in [
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty_context": -1}, "repetition_penalty_context"),
        ({"pad_mult": 1000}, "pad_mult"),
        ({"seed": -2}, "seed"),
        ({"speaker": MODEL, "voice_prompt": "NATM1.pt"}, "voice_prompt"),
    ]:
        talk = asyncio.run(rejected(ws_url(server, **params)))
        assert talk.close_code == 4422 and field in talk.errors[0], (params, talk.errors)
    talk = asyncio.run(rejected(ws_url(server, voice_prompt="NATM1.pt")))
    assert talk.close_code == 4404 and "natm1" in talk.errors[0]


def test_repetition_penalty_and_pad_bias_on_the_text_logits():
    from finetune.families.personaplex.sampling import SamplingParams, bias_text_logits

    import mlx.core as mx

    logits = mx.array([[2.0, -1.0, 4.0, 0.5], [2.0, -1.0, 4.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0, repetition_context=2), SamplingParams()]
    out = np.array(
        bias_text_logits(logits, [[0, 1, 2], [0, 1, 2]], params, pad_id=3, exempt=frozenset({2}))
    )
    # row 0: the last 2 tokens (1, 2) with 2 exempt: only token 1 penalised (negative: x2)
    np.testing.assert_allclose(out[0], [2.0, -2.0, 4.0, 0.5])
    np.testing.assert_allclose(out[1], [2.0, -1.0, 4.0, 0.5])
    biased = [SamplingParams(pad_bias=-3.0), SamplingParams(repetition_penalty=4.0)]
    out = np.array(bias_text_logits(logits, [[], [0]], biased, pad_id=3, exempt=frozenset()))
    np.testing.assert_allclose(out, [[2.0, -1.0, 4.0, -2.5], [0.5, -1.0, 4.0, 0.5]])


def test_repetition_penalty_changes_a_greedy_text_stream(loaded_personaplex):
    from finetune.families.personaplex.layout import TEXT_PAD_ID
    from finetune.families.personaplex.runtime import PersonaPlexRuntime

    runtime = PersonaPlexRuntime(loaded_personaplex)
    audio = user_audio(1.2, seed=2).reshape(-1, FRAME)

    def text(**kwargs) -> list[int]:
        session = runtime.new_session(seed=3, text_temperature=0.0, **kwargs)
        runtime.condition(session)
        return [runtime.step([session], [frame])[0].text_token for frame in audio]

    plain, penalised = text(), text(repetition_penalty=10.0, repetition_context=64)
    spoken = [t for t in plain if t != TEXT_PAD_ID]
    assert len(set(spoken)) < len(spoken), "greedy decoding repeats a token"
    assert plain != penalised
    said = [t for t in penalised if t != TEXT_PAD_ID]
    assert len(set(said)) == len(said), "no token repeats within the penalty's context"
