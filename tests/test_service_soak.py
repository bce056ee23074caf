"""Mixed traffic through a real server, the way many users at once use it: whole and streamed
requests over adapter voices (more of them than the bank has slots) and two other models'
built-in speakers (a CustomVoice Qwen3-TTS and a CSM), clients that leave mid-stream or before
the answer, and bad requests, all arriving at random times from one seeded plan. Then:

- every answered request has the audio it has alone, replayed one at a time afterwards (its
  frames batch bit for bit; its audio within the stream's tolerance, 1e-3 of full scale);
- every bad request got a 4xx problem+json, and nothing else did;
- once the traffic is over, nothing is held: no queued or running row, no adapter reference;
- the engine did run rows together (the traffic overlapped).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.voices import pack_directory
from tests.service_helpers import server_process, wav_samples

ADAPTER_VOICES = ("alpha", "beta", "gamma")  # three adapters over a bank of two slots
BUILTIN_VOICES = ("vivian", "ryan", "csm-0", "csm-1")  # CustomVoice's and CSM's own speakers
TEXTS = (
    "A short one.",
    "Two sentences here. And the second one follows.",
    "A somewhat longer line of text for the talker to read.",
    "Hello there.",
)
BAD_BODIES: tuple[tuple[dict | str, int], ...] = (
    ({"speaker": "nobody-here", "text": "Unknown voice."}, 404),
    ({"speaker": "alpha", "text": ""}, 422),
    ({"speaker": "alpha", "text": "Zero tokens.", "max_tokens": 0}, 422),
    ({"speaker": "alpha", "text": "Bad format.", "format": "ogg-vorbis-9"}, 422),
    ({"speaker": "alpha", "text": "Unknown field.", "volume": 11}, 422),
    ('{"speaker": "alpha", "text": "cut off', 400),  # malformed JSON
)
TOLERANCE = 33  # int16 steps: 1e-3 of full scale, the streamed vocoder's stated tolerance
REQUESTS = 28
WINDOW_S = 2.5


@dataclass
class Planned:
    index: int
    kind: str  # whole | stream | leave-stream | leave-early | bad
    at: float  # seconds after the start
    body: dict
    raw: str | None = None  # sent as it is instead of body (malformed JSON)
    expect_status: int = 200
    status: int | None = None
    content_type: str = ""
    audio: bytes = b""
    errors: list[str] = field(default_factory=list)


def _import(url: str, package: Path, name: str) -> None:
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    response = httpx.post(
        f"{url}/voices/import", files=files, data={"name": name, "base_model": "tiny"}, timeout=120
    )
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module", params=["continuous", "rounds"])
def soak_server(
    request, tmp_path_factory, tiny_qwen3_base, tiny_qwen3_custom, tiny_csm, voice_package
):
    data = tmp_path_factory.mktemp("soak")
    settings = {
        "engine_scheduler": request.param,
        "data_dir": str(data),
        "models": {
            "tiny": {"path": str(tiny_qwen3_base)},
            "custom": {"path": str(tiny_qwen3_custom)},
            "csm": {"path": str(tiny_csm), "family": "csm"},
        },
        "max_batch": 3,
        "adapter_slots": 3,  # slot 0 is "no adapter": two adapters resident at a time
        "max_queue": 64,
        "stream_chunk_frames": 3,
        "max_tokens_per_sentence": 8,
        "codes_log": str(data / "codes.jsonl"),
    }
    with server_process(settings) as url:
        for name in ADAPTER_VOICES:
            _import(url, voice_package, name)
        yield url


def _plan(seed: int) -> list[Planned]:
    rng = random.Random(seed)
    plan = []
    kinds = ("whole",) * 4 + ("stream",) * 3 + ("leave-stream", "leave-early", "bad")
    for i in range(REQUESTS):
        kind = rng.choice(kinds)
        at = rng.uniform(0, WINDOW_S)
        if kind == "bad":
            body, status = BAD_BODIES[i % len(BAD_BODIES)]
            if isinstance(body, str):
                plan.append(Planned(i, kind, at, {}, raw=body, expect_status=status))
            else:
                plan.append(Planned(i, kind, at, body, expect_status=status))
            continue
        body = {
            "speaker": rng.choice(ADAPTER_VOICES + BUILTIN_VOICES),
            "text": rng.choice(TEXTS),
            "seed": 1000 + i,
            "max_tokens": rng.randint(3, 8),
        }
        if kind in ("stream", "leave-stream"):
            body.update(stream=True, format="pcm")
        plan.append(Planned(i, kind, at, body))
    return plan


async def _send(client: httpx.AsyncClient, url: str, start: float, item: Planned) -> None:
    await asyncio.sleep(max(0.0, start + item.at - time.monotonic()))
    try:
        if item.kind == "leave-early":  # the client gives up before the answer
            task = asyncio.ensure_future(client.post(f"{url}/speak", json=item.body))
            await asyncio.sleep(0.05 + (item.index % 5) * 0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        if item.kind in ("stream", "leave-stream"):
            async with client.stream("POST", f"{url}/speak", json=item.body) as response:
                item.status = response.status_code
                chunks = []
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    if item.kind == "leave-stream":
                        return  # leaves after its first audio
                item.audio = b"".join(chunks)
            return
        if item.raw is not None:
            headers = {"content-type": "application/json"}
            response = await client.post(f"{url}/speak", content=item.raw, headers=headers)
        else:
            response = await client.post(f"{url}/speak", json=item.body)
        item.status = response.status_code
        item.content_type = response.headers.get("content-type", "")
        item.audio = response.content
    except httpx.HTTPError as exc:
        item.errors.append(repr(exc))


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _held(metrics: dict[str, float]) -> dict[str, float]:
    """Everything that should be back to 0 once no request is running."""
    return {
        name: value
        for name, value in metrics.items()
        if value
        and (
            name == "voicefoundry_queue_depth"
            or name.startswith("voicefoundry_engine_running_rows")
            or name.startswith("voicefoundry_adapter_references")
            or ('state="held"' in name and name.startswith("voicefoundry_adapter_slots"))
        )
    }


def _batches_of_several_rows(metrics: dict[str, float]) -> float:
    """Batches that ran more than one row (continuous: running rows after an admission)."""
    total = 0.0
    for name, value in metrics.items():
        if name.startswith("voicefoundry_batch_size_total"):
            rows = int(name.split('size="')[1].split('"')[0])
            total += value if rows > 1 else 0
    return total


def _pcm(item: Planned) -> np.ndarray:
    if item.body.get("stream"):
        return np.frombuffer(item.audio, dtype="<i2").astype(int)
    return wav_samples(item.audio).astype(int)


def test_mixed_traffic_gets_each_request_its_solo_audio_and_leaves_nothing_held(soak_server):
    url = soak_server
    before = _metrics(url)
    assert _held(before) == {}
    # The new gauges are there before any traffic (every model, its bank's capacity).
    assert before['voicefoundry_adapter_slots{model="tiny",state="capacity"}'] == 2
    assert 'voicefoundry_engine_running_rows{model="custom"}' in before

    plan = _plan(seed=1)
    assert {p.kind for p in plan} == {"whole", "stream", "leave-stream", "leave-early", "bad"}

    async def traffic() -> None:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            start = time.monotonic()
            await asyncio.gather(*(_send(client, url, start, item) for item in plan))

    asyncio.run(traffic())

    # Clients that left are noticed at the next step; then nothing is held.
    deadline = time.monotonic() + 120
    held = _held(_metrics(url))
    while held and time.monotonic() < deadline:
        time.sleep(0.2)
        held = _held(_metrics(url))
    assert held == {}, held
    after = _metrics(url)
    assert _batches_of_several_rows(after) > _batches_of_several_rows(before), after

    for item in plan:
        assert item.errors == [], (item.kind, item.body, item.errors)
        if item.kind == "bad":
            assert item.status == item.expect_status, (item.body, item.status, item.audio[:300])
            assert item.content_type.startswith("application/problem+json"), item.content_type
            assert json.loads(item.audio)["status"] == item.expect_status
        elif item.kind in ("whole", "stream"):
            assert item.status == 200, (item.body, item.status, item.audio[:300])

    answered = [p for p in plan if p.kind in ("whole", "stream")]
    assert len(answered) >= REQUESTS // 2
    for item in answered:  # each one again, alone, as a whole response
        alone_body = {k: v for k, v in item.body.items() if k not in ("stream", "format")}
        alone = httpx.post(f"{url}/speak", json=alone_body, timeout=300)
        assert alone.status_code == 200, alone.text
        got, expected = _pcm(item), wav_samples(alone.content).astype(int)
        assert got.shape == expected.shape, (item.kind, item.body, got.shape, expected.shape)
        assert got.size > 0
        worst = int(np.abs(got - expected).max())
        assert worst <= TOLERANCE, (item.kind, item.body, worst)
    assert _held(_metrics(url)) == {}
