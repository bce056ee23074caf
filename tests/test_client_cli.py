"""The client commands of `voicefoundry` (say, voices, jobs) as subprocesses against a REAL
server process (demo mode, API keys on). One server for the whole module."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from voicefoundry_client import Client, ProgressEvent

from server.auth import KeyStore
from tests.service_helpers import ROOT, copy_demo_data, free_port, server_process

DEMO_VOICES = {"demo-baked", "demo-adapter", "demo-clone"}
BASE = "qwen3-tiny"  # the demo's Qwen3-TTS model (it serves a CSM model beside it)


@dataclass(frozen=True)
class Server:
    url: str
    key: str
    data: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_data_dir: Path):
    root = tmp_path_factory.mktemp("cli_server")
    copy_demo_data(demo_data_dir, root / "data")
    keys = KeyStore()
    key, _ = keys.add("admin", "cli tests")
    keys.save(root / "keys.json")
    settings = {
        "demo": True,
        "data_dir": str(root / "data"),
        "api_keys_file": str(root / "keys.json"),
        "max_tokens_per_sentence": 8,
    }
    with server_process(settings, timeout=600) as url:
        yield Server(url, key, root / "data")


def cli(
    server: Server, *args: str, key: bool = True, url: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """`python -m server ARGS` with the URL as a flag and the key from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEFOUNDRY_")}
    if key:
        env["VOICEFOUNDRY_API_KEY"] = server.key
    command = [sys.executable, "-m", "server", *args]
    if url:
        command += ["--url", server.url]
    return subprocess.run(command, capture_output=True, cwd=ROOT, env=env, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr.decode()
    return lines[0]


def test_say_writes_a_wav(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    result = cli(server, "say", "Hello there.", "--speaker", "demo-baked", "-o", str(out),
                 "--seed", "1", "--max-tokens", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 24_000 and 0 < audio.size <= 4 * 1920

    streamed = tmp_path / "streamed.wav"
    result = cli(server, "say", "Streaming.", "-s", "demo-clone", "-o", str(streamed),
                 "--stream", "--max-tokens", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    raw = streamed.read_bytes()
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8  # real sizes, not 0xFFFFFFFF
    assert sf.read(streamed)[0].size > 0

    result = cli(server, "say", "Raw.", "-s", "demo-baked", "-o", "-", "--format", "pcm",
                 "--max-tokens", "3")  # fmt: skip
    assert result.returncode == 0 and 0 < len(result.stdout) <= 3 * 1920 * 2
    assert np.frombuffer(result.stdout, "<i2").size == len(result.stdout) // 2


def test_voices_list_get_import_delete(server: Server) -> None:
    listed = cli(server, "voices", "list")
    assert listed.returncode == 0, listed.stderr.decode()
    assert {v["name"] for v in json.loads(listed.stdout)["voices"]} >= DEMO_VOICES
    # The connection flags also work on the group, before the sub-command.
    env_key = {**os.environ, "VOICEFOUNDRY_API_KEY": server.key}
    before = subprocess.run(
        [sys.executable, "-m", "server", "voices", "--url", server.url, "get", "demo-baked"],
        capture_output=True, cwd=ROOT, env=env_key, timeout=300,
    )  # fmt: skip
    assert before.returncode == 0, before.stderr.decode()
    assert json.loads(before.stdout)["kind"] == "baked"

    package = server.data / "demo" / "package"  # the demo's own baked voice package
    assert (package / "voice.json").is_file()
    made = cli(server, "voices", "import", str(package), "--name", "cli-imported",
               "--ref-clip", str(package / "ref.wav"), "--base-model", BASE)  # fmt: skip
    assert made.returncode == 0, made.stderr.decode()
    assert json.loads(made.stdout)["name"] == "cli-imported"
    again = cli(server, "voices", "import", str(package), "--name", "cli-imported",
                "--base-model", BASE)  # fmt: skip
    assert again.returncode == 1 and "409 Conflict" in _one_error_line(again)
    assert cli(server, "voices", "delete", "cli-imported").returncode == 0
    gone = cli(server, "voices", "get", "cli-imported")
    assert gone.returncode == 1 and _one_error_line(gone).startswith("error: 404 Not Found: ")


def test_errors_are_one_line_and_non_zero(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "never.wav"
    missing = cli(server, "say", "Hi.", "--speaker", "nobody-here", "-o", str(out))
    assert missing.returncode == 1 and not out.exists()
    line = _one_error_line(missing)
    assert line.startswith("error: 404 Not Found: ") and "nobody-here" in line

    no_key = cli(server, "voices", "list", key=False)
    assert no_key.returncode == 1
    assert _one_error_line(no_key) == "error: 401 Unauthorized: missing API key"

    bad = cli(server, "say", "Hi.", "-s", "demo-baked", "-o", str(out), "--temperature", "-2")
    assert bad.returncode == 1 and "422" in _one_error_line(bad)

    env = {**os.environ, "VOICEFOUNDRY_URL": f"http://127.0.0.1:{free_port()}"}
    down = subprocess.run(
        [sys.executable, "-m", "server", "jobs", "list"],
        capture_output=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert down.returncode == 1 and "cannot reach" in _one_error_line(down)

    no_clip = cli(server, "voices", "create", "x", "--clips", str(tmp_path / "none.wav"),
                  "--transcript", "hi")  # fmt: skip
    assert no_clip.returncode == 2 and "none.wav" in _one_error_line(no_clip)


def _clip_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three synthetic clips in a folder, their transcripts as JSON, and a reference clip."""
    from finetune.data import synthetic_dataset

    train = synthetic_dataset(tmp_path / "raw", 3, seed=5, with_ref=True, min_s=1.6, max_s=2.0)
    clips = tmp_path / "clips"
    clips.mkdir()
    texts = {}
    for line in train.read_text().splitlines():
        row = json.loads(line)
        shutil.copy(train.parent / row["audio"], clips / row["audio"])
        texts[row["audio"]] = row["text"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    return clips, tmp_path / "texts.json", train.parent / "ref.wav"


def test_create_then_watch_exits_0_and_the_voice_speaks(server: Server, tmp_path: Path) -> None:
    clips, texts, ref = _clip_folder(tmp_path)
    created = cli(server, "voices", "create", "clivoice", "--clips", str(clips),
                  "--transcripts", str(texts), "--ref", str(ref), "--max-steps", "2",
                  "--lora-rank", "4", "--base-model", BASE)  # fmt: skip
    assert created.returncode == 0, created.stderr.decode()
    job = json.loads(created.stdout)
    assert job["state"] == "queued" and job["name"] == "clivoice"

    watched = cli(server, "jobs", "watch", job["id"])
    assert watched.returncode == 0, watched.stderr.decode()
    assert json.loads(watched.stdout)["state"] == "succeeded"
    progress = watched.stderr.decode()
    assert "2/2" in progress and f"job {job['id']} succeeded" in progress

    listed = cli(server, "jobs", "list")
    assert job["id"] in {j["id"] for j in json.loads(listed.stdout)["jobs"]}
    out = tmp_path / "new.wav"
    spoke = cli(server, "say", "New voice.", "-s", "clivoice", "-o", str(out), "--max-tokens", "3")
    assert spoke.returncode == 0 and sf.read(io.BytesIO(out.read_bytes()))[0].size > 0
    finished = cli(server, "jobs", "cancel", job["id"])
    assert finished.returncode == 1 and "409 Conflict" in _one_error_line(finished)


def test_cancelled_job_makes_watch_exit_1(server: Server, tmp_path: Path) -> None:
    clips, texts, ref = _clip_folder(tmp_path)
    created = cli(server, "voices", "create", "clicancel", "--clips", str(clips),
                  "--transcripts", str(texts), "--ref", str(ref), "--max-steps", "5000",
                  "--base-model", BASE)  # fmt: skip
    job_id = json.loads(created.stdout)["id"]
    with Client(server.url, api_key=server.key) as client:
        deadline = time.monotonic() + 300
        for event in client.jobs.events(job_id, read_timeout=300):
            if isinstance(event, ProgressEvent) or time.monotonic() > deadline:
                break  # training is under way
    cancelled = cli(server, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    watched = cli(server, "jobs", "watch", job_id)
    assert watched.returncode == 1
    assert f"job {job_id} cancelled" in watched.stderr.decode()
    assert json.loads(watched.stdout)["state"] == "cancelled"


def test_say_offers_every_format_the_server_encodes() -> None:
    from voicefoundry_client.cli import FORMATS

    from server.audio_formats import FORMATS as SERVER_FORMATS

    assert sorted(FORMATS) == sorted(SERVER_FORMATS)
