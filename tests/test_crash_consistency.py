"""`kill -9` of the server at random points of voice imports and deletes: after each restart,
every voice is either fully there (registered, its package complete, it speaks) or fully gone
(no row, no folder). Bounded: a few kills at seeded random moments."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from server.voices import pack_directory
from tests.service_helpers import server_process

KILLS = 4


def _server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    out = subprocess.run(["pgrep", "-f", f"settings-{port}"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def _check_consistent(url: str, data: Path) -> set[str]:
    voices = {v["name"]: v for v in httpx.get(f"{url}/voices", timeout=30).json()["voices"]}
    registered = {n for n, v in voices.items() if v["kind"] != "builtin"}
    folders = {p.name for p in (data / "voices").iterdir()}
    assert folders == registered, f"folders {folders} vs registered voices {registered}"
    for name in registered:
        assert voices[name]["available"], voices[name]
        spoken = httpx.post(
            f"{url}/speak", json={"speaker": name, "text": "Hi.", "max_tokens": 2}, timeout=60
        )
        assert spoken.status_code == 200, spoken.text
    return registered


def test_voices_are_whole_or_gone_after_kill_9_mid_import_or_delete(
    tmp_path, tiny_qwen3_base, voice_package
):
    rng = random.Random(7)
    data = tmp_path / "data"
    settings = {"data_dir": str(data), "models": {"m": {"path": str(tiny_qwen3_base)}}}
    archive = pack_directory(voice_package)
    for attempt in range(KILLS):
        with server_process(settings) as url:
            present = _check_consistent(url, data)

            def work(url: str = url, present: set[str] = present, attempt: int = attempt) -> None:
                try:
                    for name in sorted(present):
                        httpx.delete(f"{url}/voices/{name}", timeout=30)
                    for i in range(3):
                        files = {"package": ("p.tar.gz", archive, "application/gzip")}
                        data_ = {"name": f"v{attempt}-{i}"}
                        httpx.post(f"{url}/voices/import", files=files, data=data_, timeout=30)
                except httpx.HTTPError:
                    pass  # the server was killed under it

            worker = threading.Thread(target=work)
            worker.start()
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(_server_pid(url), signal.SIGKILL)
            worker.join(60)
            assert not worker.is_alive()
    with server_process(settings) as url:
        _check_consistent(url, data)
