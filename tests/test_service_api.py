"""The HTTP API in-process (AsyncTestClient runs the real lifespan, engine and models)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.audio import load_audio
from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
from finetune.lora import fuse_lora, load_adapters

import mlx.core as mx
import numpy as np
import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.auth import KeyStore
from server.registry import Registry, Voice
from server.settings import ModelSpec, Settings
from server.voices import pack_directory
from tests.service_helpers import wav_samples

pytestmark = pytest.mark.anyio
MODEL = "tiny"

# The server decodes audio as a stream of chunks: within 1e-3 of full scale of the one-shot
# decode mlx-audio runs (tests/test_qwen3_vocoder_stream.py), i.e. 33 of 32767; the same frames
# decoded either way. A different frame would be thousands off.
STREAM_LSB = 33


def _settings(data_dir: Path, model: Path, **extra) -> Settings:
    return Settings(data_dir=str(data_dir), models={MODEL: ModelSpec(path=str(model))}, **extra)


async def _import(
    client: AsyncTestClient,
    package: Path,
    name: str,
    ref: Path | None = None,
    headers: dict | None = None,
):
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    if ref is not None:
        files["ref_clip"] = ("ref.wav", ref.read_bytes(), "audio/wav")
    return await client.post(
        "/voices/import", files=files, data={"name": name}, headers=headers or {}
    )


@pytest.fixture
async def client(tmp_path, tiny_qwen3_base):
    app = create_app(_settings(tmp_path / "data", tiny_qwen3_base, max_text_chars=400))
    async with AsyncTestClient(app, timeout=300) as c:
        yield c


async def test_health_ready_openapi_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok", "models": []}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == [MODEL]
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/speak" in schema["paths"] and "/v1/audio/speech" in schema["paths"]
    text = (await client.get("/metrics")).text
    assert "voicefoundry_queue_depth" in text and "voicefoundry_requests_total" in text


async def test_bad_inputs_get_problem_json(client, tmp_path):
    cases = [
        ({"speaker": "nobody", "text": "hi"}, 404, "unknown speaker"),
        ({"speaker": "x", "text": "hi", "format": "aiff"}, 422, "wav, flac, pcm, mp3, opus"),
        ({"speaker": "x", "text": "   "}, 422, "text is empty"),
        ({"speaker": "x", "text": "a" * 401}, 413, "limit is 400"),
        ({"speaker": "x", "text": "hi", "bogus": 1}, 422, "bogus"),
        ({"speaker": "x", "text": "hi", "temperature": -1}, 422, None),
    ]
    for body, status, needle in cases:
        response = await client.post("/speak", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["status"] == status and problem["detail"]
        if needle:
            assert needle in json.dumps(problem), problem
    malformed = await client.post(
        "/speak", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and "malformed" in malformed.json()["detail"]


async def test_voice_of_a_model_that_is_not_loaded_is_409(tmp_path, tiny_qwen3_base):
    data = tmp_path / "data"
    data.mkdir()
    with Registry(data / "registry.sqlite3") as registry:
        registry.add(
            Voice(
                name="orphan",
                base_model="elsewhere",
                kind="clone",
                adapter=None,
                slot=None,
                ref_clip=None,
                default_language=None,
                meta={},
            )
        )
    async with AsyncTestClient(create_app(_settings(data, tiny_qwen3_base)), timeout=300) as c:
        response = await c.post("/speak", json={"speaker": "orphan", "text": "hi"})
        assert response.status_code == 409 and "not loaded" in response.json()["detail"]


async def test_speak_equals_in_process_mlx_audio_generation(client, tiny_qwen3_base, voice_package):
    assert (await _import(client, voice_package, "baked")).status_code == 201
    response = await client.post(
        "/speak",
        json={
            "speaker": "baked",
            "text": "Hello from the service.",
            "seed": 11,
            "max_tokens": 12,
        },
    )
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    served = wav_samples(response.content)

    # In process: the same base model with the same adapter, the baked name, the same seed.
    loaded = load_qwen3_tts(tiny_qwen3_base)
    load_adapters(loaded.model.talker, voice_package / "adapter")
    fuse_lora(loaded.model.talker)
    embedding = mx.load(str(voice_package / "speaker_embedding.safetensors"))["embedding"]
    from finetune.families.qwen3_tts.bake import bake_into_model

    bake_into_model(loaded.model, "baked", 3000, np.array(embedding))
    mx.random.seed(11)
    # The voice was trained on English lines: it is served in English unless asked otherwise.
    result = list(
        loaded.model.generate(
            "Hello from the service.", voice="baked", lang_code="english", max_tokens=12
        )
    )
    expected = np.clip(np.round(np.array(result[0].audio) * 32767), -32768, 32767)
    assert served.shape == expected.shape
    assert np.abs(served.astype(np.int32) - expected.astype(np.int32)).max() <= STREAM_LSB


async def test_import_list_get_delete_and_slot_reuse(client, voice_package, speaker_dataset):
    ref = speaker_dataset.parent / "ref.wav"
    created = await _import(client, voice_package, "Narrator", ref=ref)
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["name"] == "narrator" and voice["kind"] == "baked" and voice["slot"] == 3000
    duplicate = await _import(client, voice_package, "narrator")
    assert duplicate.status_code == 409
    second = await _import(client, voice_package, "second")
    assert second.json()["slot"] not in (None, 3000)
    names = [v["name"] for v in (await client.get("/voices")).json()["voices"]]
    assert names == ["narrator", "second"]
    assert (await client.get("/voices/NARRATOR")).json()["name"] == "narrator"
    gone = await client.delete("/voices/narrator")
    assert gone.status_code == 200
    assert (await client.get("/voices/narrator")).status_code == 404
    assert (
        await client.post("/speak", json={"speaker": "narrator", "text": "x"})
    ).status_code == 404
    third = await _import(client, voice_package, "third")
    assert third.json()["slot"] == 3000  # the deleted voice's row is free again


async def test_bad_packages_are_refused_and_leave_nothing(client, tmp_path, voice_package):
    import io
    import tarfile

    data_voices = Path(client.app.state.settings.data_dir) / "voices"
    before = sorted(p.name for p in data_voices.iterdir())
    garbage = await client.post(
        "/voices/import", files={"package": ("p.tar.gz", b"garbage", "application/gzip")}
    )
    assert garbage.status_code == 400
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    escaped = await client.post(
        "/voices/import", files={"package": ("p.tar.gz", evil.getvalue(), "x")}
    )
    assert escaped.status_code == 400
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(voice_package, broken)
    (broken / "adapter" / "adapters.safetensors").write_bytes(b"corrupt")
    corrupt = await _import(client, broken, "corrupt")
    assert corrupt.status_code == 422 and "corrupt" not in [
        v["name"] for v in (await client.get("/voices")).json()["voices"]
    ]
    assert sorted(p.name for p in data_voices.iterdir()) == before
    assert not (tmp_path / "escape.txt").exists()


async def test_registry_and_baked_slots_survive_a_restart(tmp_path, tiny_qwen3_base, voice_package):
    settings = _settings(tmp_path / "data", tiny_qwen3_base)
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        assert (await _import(c, voice_package, "keeper")).status_code == 201
        first = await c.post(
            "/speak", json={"speaker": "keeper", "text": "Same again.", "seed": 3, "max_tokens": 6}
        )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        assert (await c.get("/voices/keeper")).json()["slot"] == 3000
        model = c.app.state.engine.models[MODEL].model
        assert "keeper" in model.config.talker_config.spk_id
        again = await c.post(
            "/speak", json={"speaker": "keeper", "text": "Same again.", "seed": 3, "max_tokens": 6}
        )
    assert first.content == again.content


async def test_adapter_bank_audio_equals_the_fused_model(
    tmp_path, tiny_qwen3_base, voice_package, speaker_dataset
):
    """A clone voice WITH an adapter, served through the bank vs the fused model in process."""
    import shutil

    adapter_only = tmp_path / "adapter_only"
    shutil.copytree(voice_package, adapter_only)
    (adapter_only / "speaker_embedding.safetensors").unlink()
    ref = speaker_dataset.parent / "ref.wav"
    settings = _settings(tmp_path / "data", tiny_qwen3_base)
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        voice = await _import(c, adapter_only, "lora", ref=ref)
        assert voice.status_code == 201 and voice.json()["kind"] == "adapter", voice.text
        served = wav_samples(
            (
                await c.post(
                    "/speak",
                    json={
                        "speaker": "lora",
                        "text": "Through the bank.",
                        "seed": 21,
                        "max_tokens": 10,
                    },
                )
            ).content
        )
        stats = c.app.state.engine.models[MODEL].bank.stats
        assert stats.misses >= 1
    loaded = load_qwen3_tts(tiny_qwen3_base)
    load_adapters(loaded.model.talker, voice_package / "adapter")
    fuse_lora(loaded.model.talker)
    mx.random.seed(21)
    wav = mx.array(load_audio(ref, 24_000))
    result = list(
        loaded.model.generate(
            "Through the bank.", ref_audio=wav, lang_code="english", max_tokens=10
        )
    )
    expected = np.clip(np.round(np.array(result[0].audio) * 32767), -32768, 32767)
    assert served.shape == expected.shape
    assert np.abs(served.astype(np.int32) - expected.astype(np.int32)).max() <= STREAM_LSB


async def test_api_keys_and_scopes(tmp_path, tiny_qwen3_base, voice_package):
    keys = KeyStore()
    speak_secret, _ = keys.add("speak", "app")
    admin_secret, _ = keys.add("admin", "ops")
    keys.save(tmp_path / "keys.json")
    assert speak_secret not in (tmp_path / "keys.json").read_text()
    settings = _settings(
        tmp_path / "data", tiny_qwen3_base, api_keys_file=str(tmp_path / "keys.json")
    )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/voices")).status_code == 401
        bad = await c.get("/voices", headers={"Authorization": "Bearer vf_nope_nope"})
        assert bad.status_code == 401
        ok = await c.get("/voices", headers={"X-API-Key": speak_secret})
        assert ok.status_code == 200
        denied = await _import(c, voice_package, "v", headers={"X-API-Key": speak_secret})
        assert denied.status_code == 403
        allowed = await _import(
            c, voice_package, "v", headers={"Authorization": f"Bearer {admin_secret}"}
        )
        assert allowed.status_code == 201
