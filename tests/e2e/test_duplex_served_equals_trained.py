"""A duplex voice trained through `POST /voices` is served by `/duplex` exactly as it was trained.

One exchange (agent clip + transcript + the user's side, with a voice prompt and a text prompt)
is overfit by a real job on a real server; then a greedy `/duplex` session of the new voice
hears exactly the training user audio. The agent text tokens the server samples (seen through
the server's `codes_log`, one line per session step) must reproduce >= 90% of the trained
agent text tokens at their frames. A session conditioned otherwise than training saw (other
prompt frames, a shifted start, another alignment of the streams) cannot pass; the same voice
replayed with another text prompt is the control that shows the prompts matter.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from finetune.audio import write_wav
from finetune.families.personaplex import data as duplex_data
from finetune.families.personaplex.layout import TEXT_EPAD_ID, TEXT_PAD_ID
from finetune.families.personaplex.training import (
    build_examples,
    codec_identity,
    mimi_encoder,
    prompt_prefixes,
    text_tokenizer,
)

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.duplex_helpers import FRAME, RATE, converse, ws_url
from tests.service_helpers import server_process, wait_for_job

pytestmark = pytest.mark.timeout(900)

MODEL = "pp"
FRAMES = 30  # 2.4 s exchange
TEXT = "The teacher can help with a new project."
TEXT_PROMPT = "You are a wise and friendly teacher."
OVERFIT = {
    "lora_rank": "32",
    "learning_rate": "0.002",  # 5e-3 (the bound) is unstable here
    "max_steps": "200",
    "batch_size": "1",
    "grad_accumulation": "1",
    "lora_dropout": "0",
    "save_every": "100000",
}
GREEDY = {"text_temperature": 0, "audio_temperature": 0, "text_topk": 1, "audio_topk": 1}


def _speechlike(seed: int, seconds: float, level: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return duplex_data._speechlike(rng, seconds, RATE) * level


@pytest.fixture(scope="module")
def exchange(tmp_path_factory) -> dict[str, Path]:
    """Agent and user clips of exactly FRAMES frames, and a 1 s voice prompt."""
    folder = tmp_path_factory.mktemp("duplex_exchange")
    seconds = FRAMES * FRAME / RATE
    paths = {
        "agent": folder / "agent.wav",
        "user": folder / "user.wav",
        "voice": folder / "voice.wav",
    }
    write_wav(paths["agent"], _speechlike(1, seconds, 1.0))
    write_wav(paths["user"], _speechlike(2, seconds, 0.6))
    write_wav(paths["voice"], _speechlike(3, 1.0, 0.8))
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_personaplex, loaded_personaplex, exchange):
    data = tmp_path_factory.mktemp("duplex_served") / "data"
    codes_log = data.parent / "codes.jsonl"
    settings = {
        "data_dir": str(data),
        "models": {MODEL: {"path": str(tiny_personaplex), "family": "personaplex"}},
        "codes_log": str(codes_log),
        "job_min_total_seconds": 1.0,
        "duplex_max_inbox_frames": 4 * FRAMES,  # the test sends faster than real time
    }
    with server_process(settings) as url:
        files = [
            ("clips", ("agent.wav", exchange["agent"].read_bytes(), "audio/wav")),
            ("user_clips", ("user.wav", exchange["user"].read_bytes(), "audio/wav")),
            ("ref", ("voice.wav", exchange["voice"].read_bytes(), "audio/wav")),
        ]
        form = {
            "name": "overfit-agent",
            "base_model": MODEL,
            "strategy": "duplex",
            "transcripts": json.dumps({"agent.wav": TEXT}),
            "text_prompt": TEXT_PROMPT,
            **OVERFIT,
        }
        created = httpx.post(f"{url}/voices", files=files, data=form, timeout=120)
        assert created.status_code == 202, created.text
        job = wait_for_job(url, created.json()["id"], timeout=600)
        assert job["state"] == "succeeded", (job["reason"], job["log_tail"])
        yield {
            "url": url,
            "codes_log": codes_log,
            "job_dir": data / "jobs" / job["id"],
            "job": job,
            "loaded": loaded_personaplex,
        }


def _trained_sequence(trained: dict) -> duplex_data.DuplexExample:
    """The job's training example, rebuilt by the training code from the job's own files."""
    loaded = trained["loaded"]
    clips = duplex_data.read_jsonl(trained["job_dir"] / "train.jsonl")
    assert len(clips) == 1 and clips[0].user_audio is not None
    assert clips[0].voice_prompt is not None and clips[0].text_prompt == TEXT_PROMPT
    encode = mimi_encoder(loaded.mimi)
    codec = codec_identity(loaded.mimi)
    max_frames = 10_000
    (example,) = build_examples(
        clips, encode, codec, text_tokenizer(loaded), max_frames, prompt_prefixes(loaded)
    )
    return example


def _replay(trained: dict, user_pcm16: bytes, **query) -> list[int]:
    """A greedy session of the voice hearing `user_pcm16`, then one flush frame of silence
    (the text of input frame n comes out on step n + 1); the text token per input frame."""
    url = ws_url(trained["url"], speaker="overfit-agent", seed=0, **GREEDY, **query)
    pcm = np.frombuffer(user_pcm16 + bytes(2 * FRAME), dtype="<i2").astype(np.float32) / 32767
    log: Path = trained["codes_log"]
    before = log.read_text().count("\n") if log.exists() else 0
    talk = asyncio.run(converse(url, audio=pcm, min_audio_frames=FRAMES + 1))
    assert not talk.errors and len(talk.audio) >= FRAMES + 1, talk.errors
    session = talk.metadata["session_id"]
    lines = [json.loads(x) for x in log.read_text().splitlines()[before:]]
    steps = sorted(
        (r for r in lines if r.get("duplex_session") == session), key=lambda r: r["step"]
    )
    assert [r["step"] for r in steps][: FRAMES + 1] == list(range(FRAMES + 1))
    return [r["text_token"] for r in steps[1 : FRAMES + 1]]


def _agreement(trained_text: np.ndarray, served: list[int]) -> tuple[float, float]:
    """(share of the trained words' tokens served at their frame, share of all frames)."""
    served_arr = np.asarray(served)
    words = ~np.isin(trained_text, (TEXT_PAD_ID, TEXT_EPAD_ID))
    return (
        float((served_arr[words] == trained_text[words]).mean()),
        float((served_arr == trained_text).mean()),
    )


def test_overfit_duplex_voice_replays_its_agent_text(trained):
    example = _trained_sequence(trained)
    exchange = example.codes[example.prompt_frames :]
    assert exchange.shape[0] == FRAMES
    trained_text = exchange[:, 0]
    words = int((~np.isin(trained_text, (TEXT_PAD_ID, TEXT_EPAD_ID))).sum())
    assert words >= 5, trained_text

    user_wav = trained["job_dir"] / "user" / "user_000.wav"
    user, rate = sf.read(user_wav, dtype="int16")
    assert rate == RATE and user.shape[0] == FRAMES * FRAME
    # The user stream training saw is what the served session hears, frame for frame.
    np.testing.assert_array_equal(exchange[:, 9:], np.load(f"{user_wav}.mimi-mono.npz")["codes"])

    served = _replay(trained, user.astype("<i2").tobytes())
    word_share, frame_share = _agreement(trained_text, served)
    print(f"served text: {word_share:.0%} of {words} word tokens, {frame_share:.0%} of frames")
    assert word_share >= 0.9, (trained_text.tolist(), served)

    # Control: the same voice and user audio under another text prompt is conditioned
    # otherwise than it trained, and no longer replays its exchange as well.
    other = _replay(
        trained, user.astype("<i2").tobytes(), text_prompt="Number 4 is even, okay? (4)"
    )
    other_share, _ = _agreement(trained_text, other)
    print(f"with another text prompt: {other_share:.0%} of the word tokens")
    assert other_share < word_share


def test_greedy_sampling_parameters_are_validated(trained):
    from tests.duplex_helpers import rejected

    for bad, name in (
        ({"text_temperature": -1}, "text_temperature"),
        ({"audio_temperature": "nan"}, "audio_temperature"),
        ({"text_topk": -2}, "text_topk"),
        ({"audio_topk": "many"}, "audio_topk"),
    ):
        url = ws_url(trained["url"], speaker="overfit-agent", **bad)
        refused = asyncio.run(rejected(url))
        assert refused.close_code == 4422, (bad, refused.close_code)
        assert refused.errors and name in refused.errors[0], refused.errors
