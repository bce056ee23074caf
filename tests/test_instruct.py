"""Instruct on the Qwen3-TTS variants, on a real server: CustomVoice (style, official layout),
VoiceDesign (the voice from a description, mlx-community layout) and Base (refused), the
OpenAI route's `instructions`, and a designed voice saved as a clone voice of the Base model.

What the server conditions on is read from its `codes_log` (each segment's codes and prompt
embeddings); the prompt is compared with the one mlx-audio's own builder makes for the same
instruct (`Model._prepare_generation_inputs(..., instruct=...)`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from finetune.families.qwen3_tts.conditioning import instruct_text, instruct_use
from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

import httpx
import mlx.core as mx
import numpy as np
import pytest

from tests.service_helpers import server_process, wav_samples

pytestmark = pytest.mark.timeout(600)

TEXT = "Hello there."
FRAMES = 6  # frames per request: enough to tell codes apart, quick on two cores


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_qwen3_base, tiny_qwen3_custom, tiny_qwen3_design):
    data = tmp_path_factory.mktemp("instruct") / "data"
    codes_log = data.parent / "codes.jsonl"
    settings = {
        "data_dir": str(data),
        "models": {
            "base": {"path": str(tiny_qwen3_base)},
            "custom": {"path": str(tiny_qwen3_custom)},
            "design": {"path": str(tiny_qwen3_design)},
        },
        "codes_log": str(codes_log),
        "max_tokens_per_sentence": 12,  # the designed sample too: under a second of audio
    }
    with server_process(settings, timeout=300) as url:
        yield {"url": url, "codes_log": codes_log}


def _spoken(service: dict, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST the request; the codes_log record of its one segment."""
    log: Path = service["codes_log"]
    before = log.read_text().count("\n") if log.exists() else 0
    answer = httpx.post(f"{service['url']}{route}", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    records = [json.loads(x) for x in log.read_text().splitlines()[before:]]
    assert len(records) == 1, records
    return records[0]


def _speak(service: dict, speaker: str, instruct: str | None, seed: int = 7) -> dict[str, Any]:
    body = {"speaker": speaker, "text": TEXT, "max_tokens": FRAMES, "seed": seed}
    if instruct is not None:
        body["instruct"] = instruct
    return _spoken(service, "/speak", body)


def _multipart(fields: dict[str, str]) -> dict[str, tuple[None, str]]:
    """Plain fields as multipart/form-data (the design strategy sends no file)."""
    return {key: (None, value) for key, value in fields.items()}


@functools.cache
def _loaded(path: Path) -> Any:
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    return load_qwen3_tts(path).model


def _reference_prompt(path: Path, **kwargs: Any) -> np.ndarray:
    """mlx-audio's own prompt for `TEXT` (the reference layout)."""
    embeds, _, _ = _loaded(path)._prepare_generation_inputs(TEXT, **kwargs)
    return np.asarray(embeds[0].astype(mx.float32))


def test_variants_and_which_take_an_instruct(tmp_path, tiny_qwen3_design):
    """The VoiceDesign variant is written in the released layouts (the server below loads the
    mlx-community one) and loads (no speakers, no speaker encoder); which checkpoints take an
    instruct, and the user turn the reference wraps it in."""
    path = make_tiny_qwen3_tts(tmp_path / "official", variant="voice_design", layout="official")
    for written in (path, tiny_qwen3_design):
        config = json.loads((written / "config.json").read_text())
        assert config["tts_model_type"] == "voice_design"
        assert config["talker_config"]["spk_id"] == {}
    assert _loaded(path).speaker_encoder is None
    assert instruct_use("voice_design", "1b7") == "design"
    assert instruct_use("custom_voice", "1b7") == "style"
    assert instruct_use("custom_voice", "0b6") is None  # the references drop it there
    assert instruct_use("base", "1b7") is None
    assert instruct_text("Calm.") == "<|im_start|>user\nCalm.<|im_end|>\n"
    with pytest.raises(ValueError, match=r"1\.7B only"):
        make_tiny_qwen3_tts(tmp_path / "x", variant="voice_design", preset="real-0.6b")


def test_served_instruct_prompt_equals_the_reference(service, tiny_qwen3_custom, tiny_qwen3_design):
    style = _speak(service, "vivian", "Very happy and excited.")
    theirs = _reference_prompt(
        tiny_qwen3_custom, speaker="vivian", instruct="Very happy and excited."
    )
    ours = np.asarray(style["prompt"], np.float32)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    described = "A deep, slow, gravelly male voice."
    design = _speak(service, "design", described)
    theirs = _reference_prompt(tiny_qwen3_design, instruct=described)
    ours = np.asarray(design["prompt"], np.float32)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # Without an instruct a CustomVoice speaker's prompt is the instruct-free one.
    plain = np.asarray(_speak(service, "vivian", None)["prompt"], np.float32)
    np.testing.assert_allclose(plain, _reference_prompt(tiny_qwen3_custom, speaker="vivian"))


@pytest.mark.parametrize("speaker", ["vivian", "design"])
def test_instruct_changes_the_codes_and_a_seed_repeats_them(service, speaker):
    first = _speak(service, speaker, "Whisper, very sad.")
    again = _speak(service, speaker, "Whisper, very sad.")
    other = _speak(service, speaker, "Shout, very angry and fast!")
    assert first["codes"] == again["codes"]
    assert first["codes"] != other["codes"]


def test_openai_instructions_map_to_instruct(service, tiny_qwen3_custom):
    body = {
        "model": "custom",
        "voice": "vivian",
        "input": TEXT,
        "response_format": "wav",
        "instructions": "Very happy and excited.",
    }
    record = _spoken(service, "/v1/audio/speech", body)
    theirs = _reference_prompt(
        tiny_qwen3_custom, speaker="vivian", instruct="Very happy and excited."
    )
    np.testing.assert_allclose(np.asarray(record["prompt"], np.float32), theirs, atol=1e-5)


def test_design_then_clone_and_the_refusals(service):
    url = service["url"]
    form = {
        "name": "narrator",
        "strategy": "design",
        "base_model": "base",
        "description": "A warm, low female voice, speaking slowly.",
        "text": "This is how I sound.",
        "seed": "3",
    }
    created = httpx.post(f"{url}/voices", files=_multipart(form), timeout=120)
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["kind"] == "clone" and voice["base_model"] == "base"
    assert voice["meta"]["design"]["description"] == form["description"]
    assert voice["meta"]["design"]["model"] == "design"
    assert voice["meta"]["ref_text"] == form["text"]  # cloned in context, as the recipe does
    assert httpx.get(f"{url}/jobs", timeout=30).json()["jobs"] == []  # no training job
    listed = {v["name"]: v["meta"] for v in httpx.get(f"{url}/voices", timeout=30).json()["voices"]}
    assert listed["vivian"]["instruct"] == "style" and listed["design"]["instruct"] == "design"
    assert "instruct" not in listed["narrator"]

    spoken = httpx.post(
        f"{url}/speak",
        json={"speaker": "narrator", "text": TEXT, "max_tokens": FRAMES, "seed": 1},
        timeout=120,
    )
    assert spoken.status_code == 200, spoken.text
    assert len(wav_samples(spoken.content)) > 0

    # A Base model's voice takes no instruct: 422 naming the voices that do.
    refused = httpx.post(
        f"{url}/speak", json={"speaker": "narrator", "text": TEXT, "instruct": "Sad."}, timeout=30
    )
    assert refused.status_code == 422
    problem = refused.json()
    assert "vivian" in problem["detail"] and "design" in problem["voices"]
    assert "narrator" not in problem["voices"]
    openai = httpx.post(
        f"{url}/v1/audio/speech",
        json={"model": "base", "voice": "narrator", "input": TEXT, "instructions": "Sad."},
        timeout=30,
    )
    assert openai.status_code == 422 and "instructions" in openai.json()["detail"]

    # VoiceDesign speaks only a described voice.
    bare = httpx.post(f"{url}/speak", json={"speaker": "design", "text": TEXT}, timeout=30)
    assert bare.status_code == 422 and "describe" in bare.json()["detail"]
    # The design strategy's own refusals, before anything is generated.
    for change, needle in (
        ({"name": "other", "description": ""}, "description"),
        ({"name": "vivian2", "design_model": "custom"}, "VoiceDesign"),
        ({"name": "narrator"}, "exists"),
        ({"name": "other", "seed": "-1"}, "seed"),
    ):
        answer = httpx.post(f"{url}/voices", files=_multipart({**form, **change}), timeout=30)
        assert answer.status_code in (409, 422), answer.text
        assert needle in answer.json()["detail"], answer.text
