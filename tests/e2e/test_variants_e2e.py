"""Every layout a family declares and its 8- and 4-bit variants, through the real server: each is
served (`/speak`, or a `/duplex` session for PersonaPlex) and fine-tuned by `POST /voices`, and
the voice trained on a quantised variant records that quantisation.

One server per family holds all of that family's checkpoints as models; one short job per
model (1 step), all queued at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from finetune.data import synthetic_dataset
from finetune.families import get_family

import httpx
import pytest

from tests.duplex_helpers import converse, user_audio, ws_url
from tests.service_helpers import server_process, wait_for_job, wav_samples

QUANTISED = ("8", "4")


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> tuple[list, dict]:
    train = synthetic_dataset(tmp_path_factory.mktemp("variant_upload"), 3, seed=5, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    paths = [train.parent / r["audio"] for r in rows]
    files = [("clips", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    files.append(("ref", ("ref.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    # PersonaPlex frames its text (one token per 80 ms): two words fit any of these clips.
    texts = {p.name: " ".join(r["text"].split()[:2]) for p, r in zip(paths, rows, strict=True)}
    return files, texts


def _models(family: str, request: pytest.FixtureRequest, tmp: Path) -> dict[str, Path]:
    """name -> checkpoint: each declared layout, then the variants of the first one."""
    entry = get_family(family).entry_module()
    base = {
        "qwen3_tts": "tiny_qwen3_base",
        "csm": "tiny_csm",
        "personaplex": "tiny_personaplex",
    }[family]
    source: Path = request.getfixturevalue(base)
    layouts = get_family(family).layouts
    models = {layouts[0] if layouts else "release": source}
    for layout in layouts[1:]:
        models[layout] = entry.make_tiny(tmp / layout, seed=0, layout=layout)
    for variant in QUANTISED:
        if family == "qwen3_tts":  # already made by conftest (mlx-audio's converter)
            models[f"q{variant}"] = request.getfixturevalue(f"tiny_qwen3_q{variant}")
        else:
            models[f"q{variant}"] = entry.quantize(source, tmp / f"q{variant}", variant)
    return models


@pytest.mark.parametrize("family", ["qwen3_tts", "csm", "personaplex"])
def test_layouts_and_variants_serve_and_fine_tune(family, request, tmp_path, upload):
    assert set(QUANTISED) <= set(get_family(family).quantized)
    models = _models(family, request, tmp_path / "models")
    duplex = get_family(family).engine == "duplex"
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {name: {"path": str(path), "family": family} for name, path in models.items()},
        "max_tokens_per_sentence": 6,
        "duplex_max_inbox_frames": 64,
    }
    files, texts = upload
    with server_process(settings, timeout=600) as url:
        jobs = {}
        for name in models:
            data = {
                "name": f"v-{name}",
                "base_model": name,
                "strategy": "duplex" if duplex else "speaker",
                "transcripts": json.dumps(texts),
                "max_steps": "1",
                "learning_rate": "0.001",
            }
            response = httpx.post(f"{url}/voices", files=files, data=data, timeout=120)
            assert response.status_code == 202, (name, response.text)
            jobs[name] = response.json()["id"]

        for name, path in models.items():
            quant = json.loads((path / "config.json").read_text()).get("quantization")
            assert (quant is not None) == name.startswith("q"), name
            if quant is not None:
                assert quant["bits"] == int(name[1:])
            listed = httpx.get(f"{url}/voices", timeout=10).json()
            listed = listed.get("voices", listed) if isinstance(listed, dict) else listed
            # The base itself: a duplex session on the model, or a built-in speaker of it.
            builtin = [v["name"] for v in listed if v.get("base_model") == name]
            bare = [name] if duplex else builtin[:1]
            for speaker in (*bare, f"v-{name}"):
                if speaker == f"v-{name}":
                    job = wait_for_job(url, jobs[name], timeout=900)
                    assert job["state"] == "succeeded", (name, job["reason"], job["log_tail"])
                    voice = httpx.get(f"{url}/voices/{speaker}", timeout=10).json()
                    assert voice["base_model"] == name and voice["has_adapter"], voice
                    package = tmp_path / "data" / "voices" / speaker / "voice.json"
                    assert _recorded_quantization(package) == quant, (name, voice)
                if duplex:
                    session = asyncio.run(
                        converse(
                            ws_url(url, speaker=speaker, seed=1),
                            audio=user_audio(0.4, seed=2),
                            min_audio_frames=3,
                        )
                    )
                    assert not session.errors and len(session.audio) >= 3, (speaker, session)
                else:
                    spoken = httpx.post(
                        f"{url}/speak",
                        json={"speaker": speaker, "text": "Hi.", "max_tokens": 4, "seed": 1},
                        timeout=300,
                    )
                    assert spoken.status_code == 200, (speaker, spoken.text)
                    assert len(wav_samples(spoken.content)) > 0


def _recorded_quantization(package: Path) -> dict | None:
    """The quantisation the voice's package (voice.json) says its base had."""
    base = json.loads(package.read_text())["base_model"]
    return base["identity"]["quantization"] if "identity" in base else base["quantization"]
