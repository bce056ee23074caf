"""Models named by hub id: downloaded on first start or by `voicefoundry pull`, through the real
huggingface_hub client, from a loopback hub (tests/hub_server.py: the only stand-in; no model
hub is reachable from CI) serving a tiny checkpoint under the hub's URL scheme."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

from finetune.families import get_family

import httpx
import pytest
from hub_server import HubServer, Repo, repo_from_dir
from service_helpers import ROOT, free_port, server_process, wav_samples

REPO = "mlx-community/Qwen3-TTS-12Hz-tiny-CustomVoice-8bit"
BIG = "speech_tokenizer/model.safetensors"  # the largest file: held / cut mid-transfer
# Files a real repository also holds that a Qwen3-TTS download must not fetch.
EXTRAS = {
    "README.md": b"# a model card\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "assets/demo.wav": b"RIFF" + bytes(4000),
    "pytorch_model.bin": bytes(5000),
}
HELD_BYTES = 16 << 20  # past huggingface_hub's 10 MiB write chunk, so bytes reach the disk


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("hub") / "q"
    make_tiny_qwen3_tts(out, variant="custom_voice", seed=1, layout="mlx-community")
    return repo_from_dir(out, EXTRAS)


@pytest.fixture
def hub(hub_repo: Repo, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        server.repos[REPO] = hub_repo
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        for name in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE"):
            monkeypatch.delenv(name, raising=False)
        yield server


def family_files(repo: Repo) -> set[str]:
    patterns = get_family("qwen3_tts").hub_files
    return {name for name in repo.files if any(fnmatch(name, p) for p in patterns)}


def settings(data: Path, **model: object) -> dict:
    return {"data_dir": str(data), "models": {"q": {"path": REPO, **model}}, "min_free_bytes": 0}


def voicefoundry(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def speak(url: str) -> None:
    body = {"speaker": "vivian", "text": "Hello from the hub.", "max_tokens": 6, "seed": 1}
    answer = httpx.post(f"{url}/speak", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(wav_samples(answer.content)) > 0


def wait_for(url: str, ready: bool, deadline_s: float = 240) -> httpx.Response:
    """Poll /readyz until it says ready (200), or, with ready=False, until a download has bytes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"{url}/readyz", timeout=10)
        if ready and answer.status_code == 200:
            return answer
        if not ready and answer.status_code == 503:
            downloads = answer.json().get("downloads") or []
            if downloads and downloads[0]["bytes_done"] > 0:
                return answer
        time.sleep(0.2)
    raise TimeoutError(answer.text)


def test_a_start_downloads_the_family_files_shows_progress_then_speaks(
    hub: HubServer, hub_repo: Repo, tmp_path: Path
) -> None:
    hub.hold(BIG, HELD_BYTES)  # the transfer stalls there until released: no timing involved
    data = tmp_path / "data"
    with server_process(settings(data, revision=hub_repo.commit), probe="/healthz") as url:
        progress = wait_for(url, ready=False)
        assert progress.headers["content-type"].startswith("application/problem+json")
        problem = progress.json()
        assert problem["status"] == 503
        assert "downloading model 'q'" in problem["detail"]
        [download] = problem["downloads"]
        wanted = family_files(hub_repo)
        assert download["model"] == "q" and download["commit"] == hub_repo.commit
        assert download["state"] == "downloading"
        assert download["bytes_total"] == sum(len(hub_repo.files[n]) for n in wanted)
        assert 0 < download["bytes_done"] < download["bytes_total"]
        assert (
            httpx.post(f"{url}/speak", json={"speaker": "vivian", "text": "Hi"}).status_code != 200
        )

        hub.release()
        ready = wait_for(url, ready=True)
        assert ready.json()["models"] == ["q"]
        speak(url)
        log = (data / f"settings-{url.rsplit(':', 1)[1]}.log").read_text()

    assert hub.fetched_files() == wanted  # only the family's files, each once
    assert len(hub.resolved("GET")) == len(wanted)
    assert not wanted & set(EXTRAS)
    assert "downloading model 'q'" in log
    snapshot = data / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub_repo.commit
    for name in wanted:
        assert (snapshot / name).read_bytes() == hub_repo.files[name]


def test_pull_then_an_offline_start_serves_from_the_cache(
    hub: HubServer, hub_repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(data, revision=hub_repo.commit)))
    pulled = voicefoundry("pull", "q", "--config", str(config))
    assert pulled.returncode == 0, pulled.stderr
    report = json.loads(pulled.stdout)
    assert report["downloaded"] is True and report["repo_id"] == REPO
    assert Path(report["path"]).name == hub_repo.commit
    assert "downloading model 'q'" in pulled.stderr
    assert hub.fetched_files() == family_files(hub_repo)

    again = voicefoundry("pull", "q", "--config", str(config))  # in the cache: nothing fetched
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded"] is False

    before = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with server_process(settings(data, revision=hub_repo.commit)) as url:
        speak(url)
    assert len(hub.requests) == before  # the offline start never asked the hub


def test_an_unpinned_pull_records_the_branch_for_offline_starts(
    hub: HubServer, hub_repo: Repo, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    pulled = voicefoundry("pull", REPO, "--data-dir", str(data))
    assert pulled.returncode == 0, pulled.stderr
    assert f"pin it with `revision: {hub_repo.commit}`" in pulled.stderr
    offline = voicefoundry("pull", REPO, "--data-dir", str(data), env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["path"] == json.loads(pulled.stdout)["path"]


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_no_local_copy_and_no_hub_is_one_line(how: str, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1"} if how == "offline" else {}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    data = tmp_path / "data"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({**settings(data, revision="a" * 40), "port": free_port()}))
    for args in (["serve", "--config", str(config)], ["pull", "q", "--config", str(config)]):
        result = voicefoundry(*args, env=env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        [line] = lines
        assert line.startswith("error: model 'q' (" + REPO), line
        assert f"voicefoundry pull {REPO} --revision {'a' * 40}" in line
        assert "HF_HUB_OFFLINE" in line if how == "offline" else "cannot be reached" in line
        assert "Traceback" not in result.stderr


def test_an_interrupted_transfer_resumes_where_it_stopped(
    hub: HubServer, hub_repo: Repo, tmp_path: Path
) -> None:
    from server.hub import Download, HubModel, fetch

    cut_at = 3 * HELD_BYTES  # the connection drops after this many bytes of the big file
    hub.cut(BIG, cut_at)
    model = HubModel("q", REPO, hub_repo.commit, "qwen3_tts")
    snapshot = fetch(Download(model), tmp_path, report=lambda line: None)

    gets = [r for r in hub.resolved("GET") if r.path.endswith("/" + BIG)]
    assert [r.range is None for r in gets] == [True, False]  # whole, then the rest
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut_at  # bytes already written were not fetched again
    data = (snapshot / BIG).read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(hub_repo.files[BIG]).digest()
