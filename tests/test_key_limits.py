"""Per-key limits and usage: the counters (unit) and a real server (429 + Retry-After, 4429 on
the duplex socket, /usage, /metrics labels, keys revoke / rotate without a restart)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from server.auth import KeyStore, Unauthorized
from server.keyfile import KeyFile
from server.limits import KeyLimits, Limiter, LimitExceeded
from server.registry import Registry
from server.usage import UsageMeter
from tests.duplex_helpers import rejected, ws_url
from tests.service_helpers import ROOT, server_process

QWEN, PP = "tiny", "pp-tiny"
SPEAKER = "ryan"  # a built-in speaker of the tiny CustomVoice model


# --- the counters ---------------------------------------------------------------------------
def test_requests_per_minute_slide_and_allow_again():
    now = [1000.0]
    limiter = Limiter(clock=lambda: now[0])
    limits = KeyLimits(requests_per_minute=2)
    limiter.request("a", limits)
    now[0] += 20
    limiter.request("a", limits)
    with pytest.raises(LimitExceeded) as info:
        limiter.request("a", limits)
    assert info.value.limit == "requests_per_minute" and info.value.retry_after == 40
    limiter.request("b", limits)  # another key has its own window
    now[0] += 40
    limiter.request("a", limits)  # the first request left the window
    assert limiter.refusals() == {("a", "requests_per_minute"): 1}


def test_leases_are_counted_and_released_once():
    limiter = Limiter()
    limits = KeyLimits(concurrent_streams=1, training_jobs=2)
    lease = limiter.acquire("a", "streams", limits)
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire("a", "streams", limits)
    assert info.value.limit == "concurrent_streams" and info.value.retry_after >= 1
    lease.release()
    lease.release()  # idempotent: never frees a slot twice
    assert limiter.active()[("a", "streams")] == 0
    limiter.acquire("a", "streams", limits)
    with pytest.raises(LimitExceeded):  # two jobs already in the registry
        limiter.acquire("a", "jobs", limits, held=2)
    limiter.acquire("a", "jobs", limits, held=1)


def test_usage_persists_and_characters_roll_over_with_the_day(tmp_path):
    day = ["2030-01-01"]
    registry = Registry(tmp_path / "registry.sqlite3")
    meter = UsageMeter(registry, today=lambda: day[0])
    meter.add("a", requests=1, characters=25, audio_seconds=1.5)
    assert meter.characters_today("a") == 25
    meter.flush()
    meter.add("a", characters=5)  # not flushed yet: a report flushes first
    report = meter.report({"a": "app", "b": "idle"}, days=7)
    by_id = {k.key_id: k for k in report.keys}
    assert by_id["a"].totals.characters == 30 and by_id["a"].totals.audio_seconds == 1.5
    assert by_id["a"].days[0].day == "2030-01-01" and by_id["b"].totals.characters == 0
    day[0] = "2030-01-02"
    assert meter.characters_today("a") == 0
    again = UsageMeter(registry, today=lambda: "2030-01-01")  # as after a restart
    assert again.totals()["a"].characters == 30 and again.characters_today("a") == 30
    registry.close()


def test_the_key_file_is_reloaded_when_it_changes_and_fails_closed(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore()
    secret, key = store.add("speak")
    other, _ = store.add("admin")
    store.save(path)
    keys = KeyFile(path)
    assert keys.authenticate(secret, "speak").id == key.id
    new_secret, _ = store.rotate(key.id)
    store.save(path)
    with pytest.raises(Unauthorized):
        keys.authenticate(secret, "speak")
    assert keys.authenticate(new_secret, "speak").id == key.id
    path.write_text("{broken")  # an unusable file refuses every key; auth never turns off
    with pytest.raises(Unauthorized):
        keys.authenticate(other, "admin")
    assert keys.enabled
    store.save(path)
    assert keys.authenticate(other, "admin").scope == "admin"


def test_limits_are_validated_in_the_key_file(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore()
    store.add("speak")
    store.save(path)
    data = json.loads(path.read_text())
    data["keys"][0]["limits"] = {"requests_per_minute": 0, "colour": 1}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="keys\\[0\\]: limits"):
        KeyStore.load(path)


# --- a real server --------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "keys", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _create(path: Path, scope: str, *limits: str) -> tuple[str, str]:
    done = _cli("create", "--file", str(path), "--scope", scope, *limits)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return out["secret"], out["id"]


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_qwen3_custom, tiny_personaplex):
    root = tmp_path_factory.mktemp("key_limits")
    path = root / "keys.json"
    keys = {
        "admin": _create(path, "admin"),
        "speak": _create(path, "speak"),
        "streams": _create(path, "speak", "--concurrent-streams", "1"),
        "chars": _create(path, "speak", "--characters-per-day", "30"),
        "rpm": _create(path, "speak", "--requests-per-minute", "3"),
        "duplex": _create(path, "speak", "--duplex-sessions", "1"),
    }
    settings = {
        "data_dir": str(root / "data"),
        "models": {
            QWEN: {"path": str(tiny_qwen3_custom)},
            PP: {"path": str(tiny_personaplex), "family": "personaplex"},
        },
        "api_keys_file": str(path),
        "max_tokens_per_sentence": 50,
        "readyz_auth": "none",
    }
    with server_process(settings) as url:
        yield url, path, keys


def _speak(url: str, secret: str, text: str = "Hi there.", **extra) -> httpx.Response:
    body = {"speaker": SPEAKER, "text": text, "max_tokens": 4, **extra}
    return httpx.post(f"{url}/speak", json=body, headers=_auth(secret), timeout=120)


def _usage(url: str, admin: str, key_id: str) -> dict:
    response = httpx.get(f"{url}/usage", params={"key_id": key_id}, headers=_auth(admin))
    assert response.status_code == 200, response.text
    (entry,) = response.json()["keys"]
    return entry


def _metric(url: str, admin: str, line_start: str) -> float | None:
    text = httpx.get(f"{url}/metrics", headers=_auth(admin), timeout=30).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _assert_429(response: httpx.Response, limit: str) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["limit"] == limit
    retry = int(response.headers["retry-after"])
    assert retry >= 1
    return retry


def test_a_disconnected_stream_gives_its_concurrency_slot_back(live):
    url, _, keys = live
    secret, key_id = keys["streams"]
    body = {"speaker": SPEAKER, "text": "Hello there. " * 300, "stream": True, "format": "pcm"}
    with httpx.stream(
        "POST", f"{url}/speak", json=body, headers=_auth(secret), timeout=120
    ) as stream:
        assert stream.status_code == 200
        chunks = stream.iter_bytes()  # kept: a dropped iterator closes the response
        next(chunks)  # running: holds the key's one stream
        _assert_429(_speak(url, secret), "concurrent_streams")
        assert _speak(url, keys["speak"][0]).status_code == 200  # other keys are not limited
    # The client went away mid-stream: the server must free the slot (bounded wait).
    gauge = f'voicefoundry_key_active{{key="{key_id}",kind="streams"}}'
    for _ in range(150):
        if _metric(url, keys["admin"][0], gauge) == 0:
            break
        time.sleep(0.2)
    assert _metric(url, keys["admin"][0], gauge) == 0
    assert _speak(url, secret).status_code == 200


def test_characters_per_day_then_a_raised_limit_on_the_live_server(live):
    url, path, keys = live
    secret, key_id = keys["chars"]
    assert _speak(url, secret, "Twenty chars of it.").status_code == 200  # 19 characters
    retry = _assert_429(_speak(url, secret, "Twenty chars of it."), "characters_per_day")
    assert retry <= 86_400  # the next UTC day
    done = _cli("limit", key_id, "--file", str(path), "--characters-per-day", "100")
    assert done.returncode == 0, done.stderr
    assert _speak(url, secret, "Twenty chars of it.").status_code == 200  # no restart
    assert _usage(url, keys["admin"][0], key_id)["totals"]["characters"] == 38


def test_requests_per_minute(live):
    url, _, keys = live
    secret, key_id = keys["rpm"]
    for _ in range(3):
        assert httpx.get(f"{url}/voices", headers=_auth(secret)).status_code == 200
    retry = _assert_429(httpx.get(f"{url}/voices", headers=_auth(secret)), "requests_per_minute")
    assert retry <= 60
    assert httpx.get(f"{url}/voices", headers=_auth(keys["speak"][0])).status_code == 200
    limited = f'voicefoundry_key_limited_total{{key="{key_id}",limit="requests_per_minute"}}'
    assert _metric(url, keys["admin"][0], limited) == 1


async def _hold_duplex_session(url: str, secret: str) -> tuple[int | None, str]:
    """Open one session (to its handshake), try a second one while it is open."""
    async with websockets.connect(ws_url(url, speaker=PP, api_key=secret)) as ws:
        first = await asyncio.wait_for(ws.recv(), 120)
        assert first[0] == 0x00
        refused = await rejected(ws_url(url, speaker=PP, api_key=secret))
    return refused.close_code, refused.errors[0] if refused.errors else ""


async def _session_opens(url: str, secret: str) -> bool:
    """True when a session reaches its handshake (then closed), False when refused."""
    async with websockets.connect(ws_url(url, speaker=PP, api_key=secret)) as ws:
        first = await asyncio.wait_for(ws.recv(), 120)
        return first[0] == 0x00


def test_duplex_sessions_limit_closes_4429_and_counts_seconds(live):
    url, _, keys = live
    secret, key_id = keys["duplex"]
    code, reason = asyncio.run(_hold_duplex_session(url, secret))
    assert code == 4429 and "duplex_sessions" in reason and "retry after" in reason
    for _ in range(150):  # the first session closed: a new one opens (bounded wait)
        if asyncio.run(_session_opens(url, secret)):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the closed session's duplex slot was never given back")
    assert _usage(url, keys["admin"][0], key_id)["totals"]["duplex_seconds"] > 0


def test_usage_needs_admin_and_counts_speech(live):
    url, _, keys = live
    secret, key_id = keys["speak"]
    assert httpx.get(f"{url}/usage").status_code == 401
    assert httpx.get(f"{url}/usage", headers=_auth(secret)).status_code == 403
    before = _usage(url, keys["admin"][0], key_id)["totals"]
    assert _speak(url, secret, "Count me.").status_code == 200
    openai = httpx.post(
        f"{url}/v1/audio/speech",
        json={"model": QWEN, "voice": SPEAKER, "input": "And me."},
        headers=_auth(secret),
        timeout=120,
    )
    assert openai.status_code == 200, openai.text
    entry = _usage(url, keys["admin"][0], key_id)
    after = entry["totals"]
    assert after["characters"] == before["characters"] + len("Count me.") + len("And me.")
    assert after["audio_seconds"] > before["audio_seconds"]
    assert after["requests"] >= before["requests"] + 2
    assert entry["days"][0]["characters"] >= len("Count me.")
    assert entry["label"] == ""


def test_metrics_carry_key_ids_and_never_a_secret(live):
    url, path, keys = live
    assert _speak(url, keys["speak"][0]).status_code == 200
    text = httpx.get(f"{url}/metrics", headers=_auth(keys["admin"][0]), timeout=30).text
    assert f'voicefoundry_key_characters_total{{key="{keys["speak"][1]}"}}' in text
    for secret, _ in keys.values():
        assert secret not in text and secret.split("_", 2)[2] not in text
    for stored in json.loads(path.read_text())["keys"]:
        assert stored["hash"] not in text


def test_revoke_and_rotate_on_a_live_server(live):
    url, path, _ = live
    secret, key_id = _create(path, "speak")
    assert httpx.get(f"{url}/voices", headers=_auth(secret)).status_code == 200
    rotated = _cli("rotate", key_id, "--file", str(path))
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["secret"]
    assert new_secret.startswith(f"vf_{key_id}_") and new_secret != secret
    assert httpx.get(f"{url}/voices", headers=_auth(secret)).status_code == 401
    assert httpx.get(f"{url}/voices", headers=_auth(new_secret)).status_code == 200
    listed = _cli("list", "--file", str(path))
    assert listed.returncode == 0 and key_id in listed.stdout
    assert new_secret not in listed.stdout and "pbkdf2" not in listed.stdout
    for line in listed.stdout.splitlines():
        assert set(json.loads(line)) == {"id", "scope", "label", "limits"}
    revoked = _cli("revoke", key_id, "--file", str(path))
    assert revoked.returncode == 0, revoked.stderr
    assert httpx.get(f"{url}/voices", headers=_auth(new_secret)).status_code == 401
    assert _cli("revoke", key_id, "--file", str(path)).returncode == 2  # already gone
    assert sorted(p.name for p in path.parent.glob("*.tmp")) == []  # atomic writes


def test_usage_survives_a_restart(tmp_path, tiny_qwen3_custom):
    path = tmp_path / "keys.json"
    admin, _ = _create(path, "admin")
    secret, key_id = _create(path, "speak")
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {QWEN: {"path": str(tiny_qwen3_custom)}},
        "api_keys_file": str(path),
        "usage_flush_s": 3600,  # only the stop writes it
    }
    with server_process(settings) as url:
        assert _speak(url, secret, "Remember me.").status_code == 200
    with server_process(settings) as url:
        totals = _usage(url, admin, key_id)["totals"]
    assert totals["characters"] == len("Remember me.") and totals["audio_seconds"] > 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(tmp_path_factory.mktemp("upload"), 8, seed=7, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    files = [
        ("clips", (r["audio"], (train.parent / r["audio"]).read_bytes(), "audio/wav")) for r in rows
    ]
    files.append(("ref", ("ref.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    return files, {r["audio"]: r["text"] for r in rows}


def _wait_for_job(url: str, admin: str, job_id: str) -> dict:
    for _ in range(1000):  # bounded: 300 s
        job = httpx.get(f"{url}/jobs/{job_id}", headers=_auth(admin), timeout=30).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end: {job}")


def test_training_jobs_limit_and_training_seconds(tmp_path, tiny_qwen3_base, clips):
    path = tmp_path / "keys.json"
    admin, _ = _create(path, "admin")
    trainer, trainer_id = _create(path, "admin", "--training-jobs", "1")
    settings = {
        "data_dir": str(tmp_path / "data"),
        "models": {QWEN: {"path": str(tiny_qwen3_base)}},
        "api_keys_file": str(path),
        "max_tokens_per_sentence": 6,
    }
    files, texts = clips

    def post(name: str) -> httpx.Response:
        data = {"name": name, "transcripts": json.dumps(texts), "max_steps": "2"}
        return httpx.post(
            f"{url}/voices", files=files, data=data, headers=_auth(trainer), timeout=120
        )

    with server_process(settings) as url:
        first = post("first")
        assert first.status_code == 202, first.text
        # Refused before the upload is read, while the first job is queued or training.
        _assert_429(post("second"), "training_jobs")
        assert not list((tmp_path / "data/jobs").glob(".incoming-*"))
        job = _wait_for_job(url, admin, first.json()["id"])
        assert job["state"] == "succeeded", job
        third = post("third")  # the slot is free again
        assert third.status_code == 202, third.text
        cancelled = httpx.delete(f"{url}/jobs/{third.json()['id']}", headers=_auth(trainer))
        assert cancelled.status_code == 200
        seconds = _usage(url, admin, trainer_id)["totals"]["training_seconds"]
    assert seconds > 0
