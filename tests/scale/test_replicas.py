"""Two `voicefoundry serve` replicas as separate processes on 127.0.0.1, sharing one PostgreSQL
database (a fresh schema) and one artifacts dir, each with its own data dir (server/replicas.py).
One pair of servers for the module.

The bound (server/replicas.py): `replica_poll_s` plus the install. Notifications make it far
shorter; the poll is checked alone by a registry row written without one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.arrays import load_arrays
from finetune.families.qwen3_tts.bake import EMBEDDING_FILE

import httpx
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from server.registry import Registry, Voice
from server.voices import pack_directory
from tests.service_helpers import postgres_schema, server_process

MODEL = "tiny"
POLL_S = 5.0
# Through a notification: well under one poll period (a lost notification waits for the poll).
NOTIFIED_S = 2.5
BOUND_S = POLL_S + 3.0  # the stated bound: a poll period plus the install (and HTTP) time


@dataclass
class Pair:
    a: str
    b: str
    artifacts: Path
    database_url: str
    data_a: Path


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, tiny_qwen3_base: Path
) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("replicas")

    def settings(name: str) -> dict:
        return {
            "data_dir": str(root / name),
            "artifacts_dir": str(root / "shared"),
            "database_url": plain,
            "replica_poll_s": POLL_S,
            "models": {MODEL: {"path": str(tiny_qwen3_base)}},
        }

    with postgres_schema(postgres_url, "r") as plain, contextlib.ExitStack() as stack:
        # Both start at once (the migration takes an advisory lock): half the wall time.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starting = [
                pool.submit(stack.enter_context, server_process(settings(n), timeout=300))
                for n in ("a", "b")
            ]
            a, b = (f.result() for f in starting)
        yield Pair(a, b, root / "shared", plain, root / "a")


def clip(seconds: float, seed: int) -> bytes:
    """A voiced-like clip (a wavering tone with noise), 24 kHz mono WAV."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24_000)) / 24_000
    tone = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(3 * t)) * t)
    buffer = io.BytesIO()
    audio = (tone + 0.02 * rng.normal(size=t.size)).astype(np.float32)
    sf.write(buffer, audio, 24_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def speak(url: str, voice: str) -> httpx.Response:
    body = {"speaker": voice, "text": "Good morning.", "seed": 7, "max_tokens": 8}
    return httpx.post(f"{url}/speak", json=body, timeout=120)


def import_package(url: str, package: Path, name: str) -> httpx.Response:
    files = {"package": ("p.tar.gz", pack_directory(package), "application/gzip")}
    return httpx.post(f"{url}/voices/import", files=files, data={"name": name}, timeout=120)


def post_clone(url: str, name: str, seed: int = 0) -> httpx.Response:
    files = {"ref": ("ref.wav", clip(2.0, seed), "audio/wav")}
    data = {"name": name, "strategy": "clone"}
    return httpx.post(f"{url}/voices", data=data, files=files, timeout=120)


def until(check: Callable[[], httpx.Response], status: int, limit: float) -> tuple[float, bytes]:
    """Seconds until `check()` answers `status` (and its body); fails past `limit`."""
    start = time.monotonic()
    while True:
        answer = check()
        elapsed = time.monotonic() - start
        if answer.status_code == status:
            return elapsed, answer.content
        assert elapsed < limit, f"still {answer.status_code} after {elapsed:.1f} s: {answer.text}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def other_package(voice_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`voice_package` with another speaker embedding: a voice that sounds different."""
    package = tmp_path_factory.mktemp("other_package") / "package"
    shutil.copytree(voice_package, package)
    file = package / EMBEDDING_FILE
    embedding = np.array(load_arrays(file)["embedding"], dtype=np.float32)
    mx.save_safetensors(str(file), {"embedding": mx.array(-embedding[::-1].copy())})
    return package


def test_voice_imported_on_a_speaks_on_b(pair: Pair, voice_package: Path) -> None:
    imported = import_package(pair.a, voice_package, "shared-one")
    assert imported.status_code == 201, imported.text
    on_a = speak(pair.a, "shared-one")
    assert on_a.status_code == 200, on_a.text
    took, on_b = until(lambda: speak(pair.b, "shared-one"), 200, BOUND_S)
    print(f"imported on A -> speaks on B after {took:.3f} s")
    assert took < NOTIFIED_S
    assert on_b == on_a.content  # the same row, the same embedding: the same audio


def test_voice_deleted_on_b_is_refused_by_a(pair: Pair) -> None:
    made = post_clone(pair.a, "short-lived")
    assert made.status_code == 201, made.text
    until(lambda: speak(pair.b, "short-lived"), 200, BOUND_S)
    deleted = httpx.delete(f"{pair.b}/voices/short-lived", timeout=60)
    assert deleted.status_code == 200, deleted.text
    took, _ = until(lambda: speak(pair.a, "short-lived"), 404, BOUND_S)
    print(f"deleted on B -> refused by A after {took:.3f} s")
    assert httpx.get(f"{pair.a}/voices/short-lived", timeout=30).status_code == 404
    assert not (pair.artifacts / "voices" / "short-lived").exists()
    # Made again under the same name on A (another voice): B serves the new one.
    again = post_clone(pair.a, "short-lived", seed=5)
    assert again.status_code == 201, again.text
    on_a = speak(pair.a, "short-lived")
    _, on_b = until(lambda: speak(pair.b, "short-lived"), 200, BOUND_S)
    assert on_b == on_a.content


def test_concurrent_creates_of_one_name(pair: Pair) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda url: post_clone(url, "contested"), (pair.a, pair.b)))
    assert sorted(r.status_code for r in answers) == [201, 409], [r.text for r in answers]
    voices = httpx.get(f"{pair.b}/voices", timeout=30).json()["voices"]
    assert [v["name"] for v in voices].count("contested") == 1
    until(lambda: speak(pair.a, "contested"), 200, BOUND_S)
    until(lambda: speak(pair.b, "contested"), 200, BOUND_S)


def test_baked_voices_made_at_once_get_different_rows(
    pair: Pair, voice_package: Path, other_package: Path
) -> None:
    jobs = ((pair.a, voice_package, "baked-a"), (pair.b, other_package, "baked-b"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda job: import_package(*job), jobs))
    assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
    slots = {r.json()["name"]: r.json()["slot"] for r in answers}
    assert slots["baked-a"] != slots["baked-b"], slots
    for url in (pair.a, pair.b):
        rows = [v["slot"] for v in httpx.get(f"{url}/voices", timeout=30).json()["voices"]]
        rows = [r for r in rows if r is not None]
        assert len(rows) == len(set(rows)), rows  # no row holds two voices
    audio = {}
    for name in ("baked-a", "baked-b"):
        for url in (pair.a, pair.b):
            _, audio[name, url] = until(lambda u=url, n=name: speak(u, n), 200, BOUND_S)
        assert audio[name, pair.a] == audio[name, pair.b], name
    assert audio["baked-a", pair.a] != audio["baked-b", pair.a]  # each voice its own row


def test_a_row_written_without_a_notification_arrives_by_the_poll(pair: Pair) -> None:
    """The safety net alone: a registry row (and its folder) written behind the replicas' backs
    is served by both within the bound."""
    made = post_clone(pair.a, "template")
    assert made.status_code == 201, made.text
    source = pair.artifacts / "voices" / "template"
    shutil.copytree(source, pair.artifacts / "voices" / "polled")
    with Registry(pair.data_a / "registry.sqlite3", database_url=pair.database_url) as reg:
        template = reg.get("template")
        reg.add(
            Voice(
                name="polled",
                base_model=MODEL,
                kind="clone",
                ref_clip="voices/polled/ref.wav",
                meta=template.meta,
            )
        )
    for url in (pair.a, pair.b):
        took, _ = until(lambda u=url: speak(u, "polled"), 200, BOUND_S)
        print(f"row without a notification -> served by {url} after {took:.3f} s")


def _language_package(voice_package: Path, out: Path, row: int, seed: int) -> Path:
    """`voice_package` plus a new language ("hindi") it wants at codec row `row`, with its own
    vector: what a language job's package holds (voice.json language_rows + the adapter's
    language_rows.weight)."""
    import json

    from finetune.families.qwen3_tts.languages import WEIGHT_KEY

    shutil.copytree(voice_package, out)
    weights_file = out / "adapter" / "adapters.safetensors"
    weights = dict(load_arrays(weights_file))
    width = 64  # the tiny talker's hidden size
    vector = np.random.default_rng(seed).normal(size=(1, width)).astype(np.float32)
    weights[WEIGHT_KEY] = mx.array(vector)
    mx.save_safetensors(str(weights_file), {k: mx.array(v) for k, v in weights.items()})
    meta = json.loads((out / "voice.json").read_text())
    meta["language_rows"] = [{"name": "hindi", "row": row}]
    (out / "voice.json").write_text(json.dumps(meta))
    config_file = out / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["language_rows"] = [{"name": "hindi", "row": row}]
    config["trained_tensors"] = [WEIGHT_KEY]
    config_file.write_text(json.dumps(config))
    return out


def test_language_rows_made_at_once_on_two_replicas_get_different_rows(
    pair: Pair, voice_package: Path, tmp_path: Path
) -> None:
    """Two new-language voices imported at once on A and B, both trained at row 2900: the
    registry reserves the rows, so they get different rows and every replica installs both."""
    packages = [
        _language_package(voice_package, tmp_path / f"lang{i}", 2900, seed=i) for i in (0, 1)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda args: import_package(*args),
                [(pair.a, packages[0], "hindi-a"), (pair.b, packages[1], "hindi-b")],
            )
        )
    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    registry = Registry(pair.data_a / "unused.sqlite3", database_url=pair.database_url)
    try:
        rows = {
            name: [e["row"] for e in registry.get(name).meta["language_rows"]]
            for name in ("hindi-a", "hindi-b")
        }
    finally:
        registry.close()
    assert len(rows["hindi-a"]) == len(rows["hindi-b"]) == 1
    assert rows["hindi-a"] != rows["hindi-b"], rows
    for url in (pair.a, pair.b):
        for name in ("hindi-a", "hindi-b"):
            body = {"speaker": name, "text": "Namaste.", "language": "hindi", "max_tokens": 4}
            _, audio = until(
                lambda u=url, b=body: httpx.post(f"{u}/speak", json=b, timeout=120), 200, BOUND_S
            )
            assert audio
