"""Fairness between /speak requests and per-request budgets, on a real server process.

Waits are counted in engine rounds (one segment of each job in a batch), read from the
`codes_log` debugging aid, so nothing here depends on how fast the box is: each record names
its request, the round that made it and the round running when the request was queued.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from server.settings import SettingsError, load_settings
from tests.service_helpers import server_process

QWEN, CSM = "tiny", "csm"
SEGMENTS = 40
LONG = " ".join(f"Sentence number {i} is right here." for i in range(SEGMENTS))


@pytest.fixture(scope="module")
def tiny_csm_model(tmp_path_factory) -> Path:
    from finetune.families.csm.tiny import make_tiny_csm

    return make_tiny_csm(tmp_path_factory.mktemp("models") / "csm_fair", seed=0)


@pytest.fixture(scope="module")
def fair_server(tmp_path_factory, tiny_qwen3_custom, tiny_csm_model):
    data = tmp_path_factory.mktemp("fair")
    settings = {
        "data_dir": str(data),
        "models": {
            QWEN: {"path": str(tiny_qwen3_custom)},
            CSM: {"path": str(tiny_csm_model), "family": "csm"},
        },
        "max_batch": 1,  # the strictest case: one job per round
        "codes_log": str(data / "codes.jsonl"),
    }
    with server_process(settings) as url:
        yield url, data / "codes.jsonl"


class LongStream:
    """A streamed /speak of many sentences, read on a thread; `started` once audio came."""

    def __init__(self, url: str, speaker: str) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.stop = threading.Event()
        body = {"speaker": speaker, "text": LONG, "stream": True, "format": "pcm"}
        self._thread = threading.Thread(target=self._read, args=(url, {**body, "max_tokens": 4}))
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/speak", json=body, timeout=600) as response:
                for _ in response.iter_bytes():
                    self.started.set()
                    if self.stop.is_set():
                        return  # leaving cancels the rest of the request
            self.ended.set()
        finally:
            self.started.set()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(600)


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _short(url: str, speaker: str, text: str) -> None:
    body = {"speaker": speaker, "text": text, "max_tokens": 4}
    response = httpx.post(f"{url}/speak", json=body, timeout=600)
    assert response.status_code == 200, response.text


def _waited(log: Path, text: str) -> int:
    (record,) = [r for r in _records(log) if r["text"] == text]
    return record["round"] - record["queued_round"]


def test_a_short_request_is_not_starved_by_long_streams_of_its_model(fair_server):
    url, log = fair_server
    longs = [LongStream(url, "vivian"), LongStream(url, "ryan")]
    try:
        for stream in longs:
            assert stream.started.wait(600)
        _short(url, "serena", "Short one.")
        # Finding: it waited behind every remaining segment of the long requests.
        assert not any(s.ended.is_set() for s in longs), "the short request waited them out"
    finally:
        for stream in longs:
            stream.close()
    # Round-robin by segment: it waits for the round in flight and one segment of each job
    # queued ahead of it (max_batch 1, two long jobs).
    assert _waited(log, "Short one.") <= 2
    made = [r for r in _records(log) if r["text"] != "Short one."]
    per_request: dict[str, int] = {}
    for record in made:
        per_request[record["request"]] = per_request.get(record["request"], 0) + 1
    assert all(n < SEGMENTS for n in per_request.values()), per_request


def test_another_models_request_alternates_with_the_running_model(fair_server):
    url, log = fair_server
    stream = LongStream(url, "vivian")  # Qwen3-TTS
    try:
        assert stream.started.wait(600)
        _short(url, "csm-0", "Other model.")  # CSM: the engine used to defer it to the end
        assert not stream.ended.is_set(), "the other model's request waited the long one out"
    finally:
        stream.close()
    assert _waited(log, "Other model.") <= 1


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, tiny_qwen3_custom):
    settings = {
        "data_dir": str(tmp_path_factory.mktemp("budget")),
        "models": {QWEN: {"path": str(tiny_qwen3_custom)}},
        "max_request_audio_seconds": 1.5,  # 18 frames at 12.5 Hz
    }
    with server_process(settings) as url:
        yield url


def _budget_count(url: str, budget: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    name = f'voicefoundry_speak_budget_exceeded_total{{budget="{budget}"}}'
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name)]
    return float(line.rsplit(" ", 1)[1])


def test_a_request_over_its_audio_budget_is_stopped(budget_server):
    url = budget_server
    body = {"speaker": "vivian", "text": "One more sentence here. " * 8, "max_tokens": 8}
    response = httpx.post(f"{url}/speak", json=body, timeout=600)
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "max_request_audio_seconds" in response.json()["detail"]
    assert _budget_count(url, "audio") == 1
    # Streamed: the answer had started, so it ends without its last chunk (never a short file
    # passed off as complete), and the metric counts it.
    received = 0
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", f"{url}/speak", json={**body, "stream": True}, timeout=600) as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            received += len(chunk)
    assert received <= 44 + 19 * 1920 * 2  # the WAV header and at most the budget's frames
    assert _budget_count(url, "audio") == 2
    ok = httpx.post(f"{url}/speak", json={**body, "text": "Short."}, timeout=600)
    assert ok.status_code == 200


def test_a_request_over_its_wall_time_budget_gets_503(tmp_path, tiny_qwen3_custom):
    settings = {
        "data_dir": str(tmp_path),
        "models": {QWEN: {"path": str(tiny_qwen3_custom)}},
        # 320 frames, each a talker step and 15 code-predictor steps: never done in 50 ms.
        "max_request_wall_seconds": 0.05,
    }
    with server_process(settings) as url:
        body = {"speaker": "vivian", "text": "Another sentence here. " * 20, "max_tokens": 16}
        response = httpx.post(f"{url}/speak", json=body, timeout=600)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "max_request_wall_seconds" in response.json()["detail"]
        assert response.headers["retry-after"].isdigit()
        assert _budget_count(url, "time") == 1


@pytest.mark.parametrize("field", ["max_request_audio_seconds", "max_request_wall_seconds"])
def test_budgets_must_be_positive(field):
    with pytest.raises(SettingsError, match=field):
        load_settings(**{field: 0})
    assert getattr(load_settings(**{field: 2.5}), field) == 2.5
