"""`POST /voices` with a CSM base model: LoRA fine-tuning as a server job, then the new voice
speaks through `/speak`."""

from __future__ import annotations

import json

from finetune.config import TrainConfig
from finetune.data import synthetic_dataset

import httpx
import msgspec
import numpy as np
import pytest

from server.errors import Unprocessable
from server.job_config import job_train_config
from server.jobs import _hyper_parameters
from tests.service_helpers import server_process, wait_for_job, wav_samples

MODEL = "csm"


def test_csm_speaker_job_trains_registers_and_speaks(tmp_path, tiny_csm):
    train = synthetic_dataset(tmp_path / "upload", 4, seed=5, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    paths = [train.parent / r["audio"] for r in rows]
    files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    files.append(("ref", ("ref.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    texts = {p.name: r["text"] for p, r in zip(paths, rows, strict=True)}
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {MODEL: {"path": str(tiny_csm), "family": "csm"}},
        "max_tokens_per_sentence": 8,
    }
    with server_process(settings) as url:
        data = {
            "name": "csm-voice",
            "strategy": "speaker",
            "base_model": MODEL,
            "transcripts": json.dumps(texts),
            "max_steps": "3",
            "learning_rate": "0.001",
        }
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=120)
        assert response.status_code == 202, response.text
        job = wait_for_job(url, response.json()["id"])
        assert job["state"] == "succeeded", (job["reason"], job["log_tail"])
        voice = httpx.get(f"{url}/voices/csm-voice", timeout=10).json()
        assert voice["base_model"] == MODEL and voice["has_adapter"]

        def speak(speaker: str) -> np.ndarray:
            body = {"speaker": speaker, "text": "Hello there.", "seed": 4, "max_tokens": 8}
            r = httpx.post(f"{url}/speak", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return wav_samples(r.content)

        tuned, base = speak("csm-voice"), speak(f"{MODEL}-0")
        assert tuned.size > 0 and not np.array_equal(tuned, base)


def test_a_job_must_name_its_base_model_when_several_are_loaded(
    tmp_path, tiny_csm, tiny_qwen3_base
):
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {
            MODEL: {"path": str(tiny_csm), "family": "csm"},
            "qwen": {"path": str(tiny_qwen3_base)},
        },
    }
    with server_process(settings) as url:
        files = [("clips", ("a.wav", b"RIFF", "audio/wav"))]
        data = {"name": "v", "strategy": "language", "transcripts": json.dumps({"a.wav": "hi"})}
        response = httpx.post(f"{url}/voices", files=files, data=data, timeout=60)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert "name base_model" in detail and "csm" in detail and "qwen" in detail


def test_job_fields_reach_the_depth_decoder(tmp_path):
    def config(**fields: str) -> TrainConfig:
        built = job_train_config(
            family="csm",
            strategy="speaker",
            model_path=tmp_path,
            train_jsonl=tmp_path / "train.jsonl",
            output_dir=tmp_path / "run",
            voice_name="v",
            hyper=_hyper_parameters(fields),
            clip_seconds=(0.5, 30.0),
        )
        return msgspec.convert(built, TrainConfig)

    recipe = config().csm
    assert recipe.train_decoder and recipe.decoder_frame_fraction == 0.0625
    asked = config(decoder_frame_fraction="1.0", train_code_predictor="false").csm
    assert asked.decoder_frame_fraction == 1.0 and not asked.train_decoder
    for wrong in ("0", "1.5"):
        with pytest.raises(Unprocessable, match="decoder_frame_fraction must be between"):
            _hyper_parameters({"decoder_frame_fraction": wrong})
