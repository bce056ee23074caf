"""A voice trained through `POST /voices` is served by `/speak` exactly as it was trained.

For every conditioning path, two clips are overfit by a real job (a separate process) on a real
server, then the same server speaks each clip's text greedily. The generated codec codes (seen
through the server's `codes_log`, not by comparing audio) must reproduce the clip: >= 90% of
codebook 0, >= 80% of all codes, and stop at the clip's end. A voice served with any other
prefix than it trained on (a missing speaker slot, a shifted language id, auto mode for a new
language, another base) cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data import codes_path, synthetic_dataset

import httpx
import numpy as np
import pytest

from tests.service_helpers import server_process, wait_for_job

pytestmark = pytest.mark.timeout(1800)

OVERFIT = {
    "lora_rank": "32",
    "learning_rate": "0.002",
    "max_steps": "500",
    "batch_size": "2",
    "grad_accumulation": "1",
    # The language recipe smooths labels (0.1) and drops LoRA inputs (0.05): an overfit of two
    # clips wants sharp targets and no dropout (with it, the code predictor fits too slowly).
    "label_smoothing": "0",
    "lora_dropout": "0",
    "save_every": "250",
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """Two short clips with different texts, and a reference clip of the same 'speaker'."""
    folder = tmp_path_factory.mktemp("overfit_clips")
    train = synthetic_dataset(folder, 2, seed=1, with_ref=True, min_s=1.0, max_s=1.6)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len({r["text"] for r in rows}) == 2
    return {
        "paths": [folder / r["audio"] for r in rows],
        "texts": {r["audio"]: r["text"] for r in rows},
        "ref": folder / "ref.wav",
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_qwen3_base, tiny_qwen3_q8, tiny_csm):
    data = tmp_path_factory.mktemp("served_equals_trained") / "data"
    codes_log = data.parent / "codes.jsonl"
    settings = {
        "data_dir": str(data),
        "models": {
            "q": {"path": str(small_qwen3_base)},
            "q8": {"path": str(tiny_qwen3_q8)},
            "csm": {"path": str(tiny_csm), "family": "csm"},
        },
        "codes_log": str(codes_log),
        "job_min_total_seconds": 1.0,
        "shutdown_grace_s": 20,
    }
    with server_process(settings, timeout=300) as url:
        yield {
            "url": url,
            "codes_log": codes_log,
            "data": data,
            "models": {"q": small_qwen3_base, "q8": tiny_qwen3_q8},
        }


def _train(service: dict, clips: dict, name: str, base: str, **fields: str) -> dict:
    files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in clips["paths"]]
    if fields.pop("with_ref", "yes") == "yes":
        files.append(("ref", ("ref.wav", clips["ref"].read_bytes(), "audio/wav")))
    data = {
        "name": name,
        "base_model": base,
        "transcripts": json.dumps(clips["texts"]),
        **OVERFIT,
        **fields,
    }
    created = httpx.post(f"{service['url']}/voices", files=files, data=data, timeout=120)
    assert created.status_code == 202, created.text
    job = wait_for_job(service["url"], created.json()["id"], timeout=900)
    assert job["state"] == "succeeded", job
    return {**job, "base": base}


def _targets(service: dict, job: dict) -> list[tuple[str, np.ndarray]]:
    """Each uploaded clip's text and the codes training learned (the job's codes cache)."""
    folder = service["data"] / "jobs" / job["id"]
    lines = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    return [(row["text"], np.load(codes_path(Path(row["audio"])))) for row in lines]


def _speak(service: dict, voice: str, text: str, frames: int, **extra) -> dict:
    """Greedy `/speak` of one segment; the server's codes_log record of it."""
    log: Path = service["codes_log"]
    before = log.read_text().count("\n") if log.exists() else 0
    request = {
        "speaker": voice,
        "text": text,
        "temperature": 0.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "max_tokens": frames + 10,
        "seed": 0,
        **extra,
    }
    spoken = httpx.post(f"{service['url']}/speak", json=request, timeout=300)
    assert spoken.status_code == 200, spoken.text
    records = [json.loads(x) for x in log.read_text().splitlines()[before:]]
    assert [r["text"] for r in records] == [text], "the text was not spoken as one segment"
    return records[0]


def _assert_reproduced(service: dict, job: dict, voice: str, **extra) -> None:
    base = service["models"].get(job["base"])
    trained = _trained_prefixes(service, job, voice, base) if base is not None else {}
    for text, target in _targets(service, job):
        record = _speak(service, voice, text, target.shape[0], **extra)
        if text in trained:
            served = np.asarray(record["prompt"], np.float32)
            assert served.shape == trained[text].shape, (
                f"{voice}: served prefix has {served.shape[0]} positions, training had "
                f"{trained[text].shape[0]}"
            )
            np.testing.assert_allclose(served, trained[text], atol=1e-5, err_msg=voice)
        generated = np.asarray(record["codes"])
        assert generated.shape[0] == target.shape[0], (
            f"{voice}: generation did not stop at the clip's end ({generated.shape[0]} frames, "
            f"the clip has {target.shape[0]}); final losses {job['losses']}"
        )
        first = (generated[:, 0] == target[:, 0]).mean()
        every = (generated == target).mean()
        assert first >= 0.9, f"{voice}: codebook 0 reproduced {first:.0%}; {job['losses']}"
        assert every >= 0.8, f"{voice}: all codebooks reproduced {every:.0%}; {job['losses']}"


def _trained_prefixes(service: dict, job: dict, voice: str, model_path: Path) -> dict:
    """Each clip's text -> the [P, H] prefix embeddings training fed the talker for that clip,
    rebuilt with the trainer's own collator from the job's files and the voice's package."""
    from finetune import data as data_lib
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts
    from finetune.families.qwen3_tts.forward import input_embeddings
    from finetune.families.qwen3_tts.languages import WEIGHT_KEY, install_language_row
    from finetune.families.qwen3_tts.training import Collator, speaker_embedding, speaker_ref

    import mlx.core as mx

    folder = service["data"] / "jobs" / job["id"]
    clips = data_lib.read_jsonl([folder / "train.jsonl"], strategy="language")
    model = load_qwen3_tts(model_path).model
    package = service["data"] / "voices" / voice
    meta = json.loads((package / "voice.json").read_text())
    if meta.get("language_rows"):  # a new language: the row's trained vector, where it trained
        vectors = mx.load(str(package / "adapter" / "adapters.safetensors"))[WEIGHT_KEY]
        for i, entry in enumerate(meta["language_rows"]):
            install_language_row(model, entry["name"], entry["row"], np.array(vectors[i]))
    refs = {speaker_ref(c) for c in clips}
    collate = Collator(model, {ref: speaker_embedding(model, ref) for ref in refs})
    prefixes = {}
    for clip in clips:
        example = data_lib.Example(clip, np.load(codes_path(clip.audio)))
        batch = collate([example])
        embeds = input_embeddings(model.talker, batch.packed, mx.array(batch.speaker_embeds))
        frames = example.codes.shape[0]
        prefixes[clip.text] = np.array(embeds[0, : embeds.shape[1] - frames].astype(mx.float32))
    return prefixes


def test_qwen3_speaker_voice(service, clips):
    job = _train(service, clips, "spk", "q", strategy="speaker")
    voice = httpx.get(f"{service['url']}/voices/spk").json()
    assert voice["kind"] == "baked"
    _assert_reproduced(service, job, "spk")


def test_qwen3_speaker_voice_with_a_language(service, clips):
    """Trained with [think, think_bos, LANG, think_eos]: served with it by default."""
    job = _train(service, clips, "spk-en", "q", strategy="speaker", language="english")
    voice = httpx.get(f"{service['url']}/voices/spk-en").json()
    assert voice["default_language"] == "english"
    _assert_reproduced(service, job, "spk-en")


def test_qwen3_language_voice_of_a_new_language(service, clips):
    """Hindi has no codec language id in the checkpoint: the voice brings a trained row."""
    # A new row learns from nothing: it needs more steps than the other paths to fit the clips'
    # ends (at 500 the stop code came one frame early).
    job = _train(
        service,
        clips,
        "hindi",
        "q",
        strategy="language",
        language="hindi",
        with_ref="no",
        max_steps="700",
        save_every="350",
    )
    voice = httpx.get(f"{service['url']}/voices/hindi").json()
    assert voice["default_language"] == "hindi"
    _assert_reproduced(service, job, "hindi")


def test_qwen3_voice_trained_on_an_8bit_base_is_served_on_it(service, clips):
    # The tiny 8-bit model fits the two clips' argmax by ~150 steps (its random head keeps the
    # loss near 1); quantised matmuls are the slow part of this suite, so it trains 250.
    job = _train(service, clips, "spk-q8", "q8", strategy="speaker", max_steps="250")
    _assert_reproduced(service, job, "spk-q8")


def test_csm_speaker_voice(service, clips):
    """Trained on the prompt the server builds: the package's context clip, then `[0]text`.
    The depth decoder (codebooks 1-7 of the tiny CSM) trains on every frame: two short clips
    are too few for the recipe's 1/16 amortisation."""
    job = _train(
        service,
        clips,
        "csm-spk",
        "csm",
        strategy="speaker",
        max_steps="150",
        decoder_frame_fraction="1.0",
    )
    voice = httpx.get(f"{service['url']}/voices/csm-spk").json()
    assert voice["base_model"] == "csm" and voice["has_adapter"]
    _assert_reproduced(service, job, "csm-spk")
