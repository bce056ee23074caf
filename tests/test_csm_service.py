"""Sesame CSM through the speech service: builtin speakers, streaming, voice packages, errors,
and a Qwen3-TTS model served beside it (AsyncTestClient runs the real lifespan and engine)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from finetune.audio import load_audio, write_wav
from finetune.families.csm.checkpoint import LoadedCsm, load_csm
from finetune.families.csm.generate import ContextClip, synthesize
from finetune.families.csm.package import ContextSource, write_package
from finetune.families.csm.training import CSM_BACKBONE_TARGETS, CSM_DECODER_TARGETS
from finetune.lora import LoRAConfig, apply_lora, fuse_lora, lora_state, save_adapters

import mlx.core as mx
import numpy as np
import pytest
from litestar.testing import AsyncTestClient
from mlx.utils import tree_unflatten

from server import audio_formats
from server.app import create_app
from server.engine.families.csm import ADAPTER_MODULE
from server.registry import Registry, Voice
from server.settings import ModelSpec, Settings
from server.voices import pack_directory
from tests.service_helpers import wav_samples

pytestmark = pytest.mark.anyio
CSM = "csm-tiny"
QWEN = "qwen-tiny"
MAX_FRAMES = 10
TEXT = "Hello from the service."
CONTEXT_TEXT = "This is how I sound."


def _settings(data_dir: Path, models: dict[str, ModelSpec]) -> Settings:
    return Settings(data_dir=str(data_dir), models=models, max_tokens_per_sentence=MAX_FRAMES)


def _csm_spec(path: Path) -> ModelSpec:
    return ModelSpec(path=str(path), family="csm")


def _expected(loaded: LoadedCsm, speaker: int, seed: int, **kwargs) -> np.ndarray:
    """What the family's own generation gives, as the int16 samples a WAV carries."""
    audio = synthesize(
        loaded, TEXT, speaker=speaker, seed=seed, max_audio_frames=MAX_FRAMES, **kwargs
    )
    return np.frombuffer(audio_formats.to_pcm16(audio), np.int16)


async def _speak(client: AsyncTestClient, speaker: str, seed: int, **extra) -> bytes:
    body = {"speaker": speaker, "text": TEXT, "seed": seed, "max_tokens": MAX_FRAMES, **extra}
    response = await client.post("/speak", json=body)
    assert response.status_code == 200, response.text
    return response.content


async def _import(client: AsyncTestClient, package: Path, name: str, base_model: str | None):
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    data = {"name": name, **({"base_model": base_model} if base_model else {})}
    return await client.post("/voices/import", files=files, data=data)


@pytest.fixture(scope="module")
def csm_package(tiny_csm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSM voice package written by the family's `write_package`: speaker 0, a rank-4 adapter
    with random non-zero A and B on the backbone and depth-decoder targets, one context clip."""
    loaded = load_csm(tiny_csm)
    config = LoRAConfig(targets=CSM_BACKBONE_TARGETS + CSM_DECODER_TARGETS, rank=4, alpha=8.0)
    apply_lora(loaded.backbone, config)
    rng = np.random.default_rng(7)
    loaded.backbone.update(
        tree_unflatten(
            [
                (k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
                for k, v in lora_state(loaded.backbone).items()
            ]
        )
    )
    work = tmp_path_factory.mktemp("csm_package")
    save_adapters(work / "adapter", loaded.backbone, config, {"module": ADAPTER_MODULE})
    clip = np.sin(np.linspace(0, 400 * np.pi, 24_000 * 2)).astype(np.float32) * 0.3
    write_wav(work / "context.wav", clip)
    return write_package(
        work / "package",
        name="narrator",
        speaker_id=0,
        adapter_dir=work / "adapter",
        adapter_cfg={},
        context=[ContextSource(work / "context.wav", CONTEXT_TEXT)],
    )


@pytest.fixture
async def client(tmp_path: Path, tiny_csm: Path):
    app = create_app(_settings(tmp_path / "data", {CSM: _csm_spec(tiny_csm)}))
    async with AsyncTestClient(app, timeout=300) as c:
        yield c


async def test_builtin_speaker_equals_the_family_generation(client, loaded_csm):
    voices = {v["name"]: v for v in (await client.get("/voices")).json()["voices"]}
    assert set(voices) == {f"{CSM}-0", f"{CSM}-1"}
    assert {v["base_model"] for v in voices.values()} == {CSM}
    served = wav_samples(await _speak(client, f"{CSM}-1", seed=7))
    expected = _expected(loaded_csm, speaker=1, seed=7)
    assert served.size == MAX_FRAMES * 1920  # a random tiny model never says EOS
    np.testing.assert_array_equal(served, expected)


async def test_speakers_differ_and_streaming_equals_whole(client):
    whole = wav_samples(await _speak(client, f"{CSM}-0", seed=3))
    other = wav_samples(await _speak(client, f"{CSM}-1", seed=3))
    assert whole.shape == other.shape and np.abs(whole - other.astype(np.int32)).max() > 100
    async with client.stream(
        "POST",
        "/speak",
        json={
            "speaker": f"{CSM}-0",
            "text": TEXT,
            "seed": 3,
            "max_tokens": MAX_FRAMES,
            "stream": True,
            "format": "pcm",
        },
    ) as response:
        assert response.status_code == 200
        chunks = [c async for c in response.aiter_bytes() if c]
    streamed = np.frombuffer(b"".join(chunks), np.int16)
    # Every frame goes through Mimi's streaming decoder in both cases: identical samples.
    np.testing.assert_array_equal(streamed, whole)
    openai = await client.post(
        "/v1/audio/speech",
        json={"model": CSM, "input": TEXT, "voice": f"{CSM}-1", "response_format": "wav"},
    )
    assert openai.status_code == 200 and wav_samples(openai.content).size == MAX_FRAMES * 1920


async def test_voice_package_changes_the_audio_and_delete_restores_the_base(
    client, csm_package, tiny_csm
):
    base = await _speak(client, f"{CSM}-0", seed=5)
    created = await _import(client, csm_package, "narrator", None)
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "adapter" and created.json()["has_adapter"]
    voiced = wav_samples(await _speak(client, "narrator", seed=5))
    assert np.abs(voiced - wav_samples(base).astype(np.int32)).max() > 100

    # In process: the adapter fused into a fresh model, the same context clip and seed.
    fused = load_csm(tiny_csm)
    from finetune.lora import load_adapters

    load_adapters(fused.backbone, csm_package / "adapter")
    fuse_lora(fused.backbone)
    context = ContextClip(
        text=CONTEXT_TEXT, speaker=0, audio=load_audio(csm_package / "context_00.wav", 24_000)
    )
    expected = _expected(fused, speaker=0, seed=5, context=[context])
    assert voiced.shape == expected.shape
    # The bank adds x·A·B beside the base matmul where the fused model folds it into W.
    assert np.abs(voiced.astype(np.int32) - expected).max() <= 2

    model = client.app.state.engine.models[CSM]
    adapter = Path(client.app.state.settings.data_path) / "voices" / "narrator" / "adapter"
    assert model.bank.slot_of(str(adapter)) is not None
    assert (await client.delete("/voices/narrator")).status_code == 200
    assert model.bank.slot_of(str(adapter)) is None and not model.context_codes
    assert (await client.get("/voices/narrator")).status_code == 404
    assert await _speak(client, f"{CSM}-0", seed=5) == base


async def test_bad_csm_packages_and_orphans_get_problems_and_the_engine_lives(
    client, csm_package, tmp_path
):
    voices_dir = Path(client.app.state.settings.data_path) / "voices"
    before = sorted(p.name for p in voices_dir.iterdir())
    corrupt = tmp_path / "corrupt"
    shutil.copytree(csm_package, corrupt)
    (corrupt / "adapter" / "adapters.safetensors").write_bytes(b"corrupt")
    response = await _import(client, corrupt, "corrupt", None)
    assert response.status_code == 422 and "unreadable adapter" in response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    no_speaker = tmp_path / "no_speaker"
    shutil.copytree(csm_package, no_speaker)
    meta = json.loads((no_speaker / "voice.json").read_text())
    (no_speaker / "voice.json").write_text(json.dumps({**meta, "speaker_id": "zero"}))
    response = await _import(client, no_speaker, "nospeaker", None)
    assert response.status_code == 422 and "speaker_id" in response.text
    assert sorted(p.name for p in voices_dir.iterdir()) == before
    assert (await client.get("/voices/corrupt")).status_code == 404
    # The engine thread is alive and serving.
    assert wav_samples(await _speak(client, f"{CSM}-1", seed=1)).size == MAX_FRAMES * 1920


async def test_a_csm_voice_of_a_model_that_is_not_loaded_is_409(tmp_path, tiny_csm):
    data = tmp_path / "data"
    data.mkdir()
    with Registry(data / "registry.sqlite3") as registry:
        registry.add(
            Voice(
                name="orphan",
                base_model="csm-elsewhere",
                kind="adapter",
                adapter=None,
                slot=None,
                ref_clip=None,
                default_language=None,
                meta={"speaker_id": 0, "context": []},
            )
        )
    app = create_app(_settings(data, {CSM: _csm_spec(tiny_csm)}))
    async with AsyncTestClient(app, timeout=300) as c:
        response = await c.post("/speak", json={"speaker": "orphan", "text": "hi"})
        assert response.status_code == 409 and "not loaded" in response.json()["detail"]


async def test_qwen3_and_csm_side_by_side_each_serve_their_own_voices(
    tmp_path, tiny_csm, tiny_qwen3_base, voice_package, csm_package, loaded_csm
):
    models = {QWEN: ModelSpec(path=str(tiny_qwen3_base)), CSM: _csm_spec(tiny_csm)}
    async with AsyncTestClient(create_app(_settings(tmp_path / "data", models)), timeout=300) as c:
        assert (await c.get("/readyz")).json()["models"] == sorted(models)
        wrong = await _import(c, csm_package, "wrong", QWEN)
        assert wrong.status_code == 422 and "csm voice package" in wrong.text
        wrong = await _import(c, voice_package, "wrong", CSM)
        assert wrong.status_code == 422 and "qwen3_tts voice package" in wrong.text
        assert (await _import(c, voice_package, "baked", QWEN)).status_code == 201
        assert (await _import(c, csm_package, "narrator", CSM)).status_code == 201
        voices = {v["name"]: v["base_model"] for v in (await c.get("/voices")).json()["voices"]}
        assert voices == {
            "baked": QWEN,
            "narrator": CSM,
            f"{CSM}-0": CSM,
            f"{CSM}-1": CSM,
        }
        # Requests for both models at once: each batch holds one model's rows only.
        qwen, csm, narrator = await asyncio.gather(
            _speak(c, "baked", seed=2), _speak(c, f"{CSM}-1", seed=7), _speak(c, "narrator", 2)
        )
        assert wav_samples(qwen).size > 0
        np.testing.assert_array_equal(wav_samples(csm), _expected(loaded_csm, speaker=1, seed=7))
        assert wav_samples(narrator).size == MAX_FRAMES * 1920
