"""API keys in the shared PostgreSQL database (`api_keys: database`, server/keystore_db.py): two
`voicefoundry serve` replicas as processes; keys made, used and revoked with the real
`voicefoundry keys` CLI in subprocesses. A key created once is accepted by both replicas within
the bound (the 1 s poll plus a query and the request), and refused by both once revoked. A server
configured so but with no keys in the database does not start.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import postgres_schema, server_process

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
# server/keystore_db.py POLL_S (1 s) plus one query; slack for a loaded 2-core machine.
BOUND_S = 1.0 + 2.0


@contextlib.contextmanager
def _schema(postgres_url: str) -> Iterator[str]:
    with postgres_schema(postgres_url, "ks") as scoped:
        yield scoped


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _keys(config: Path, *args: str) -> dict:
    done = _run("keys", *args, "--config", str(config))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _status(base: str, secret: str | None) -> int:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.get(f"{base}/voices", headers=headers, timeout=30).status_code


def _until(bases: list[str], secret: str, status: int) -> float:
    """Seconds until every replica answers `status` to `secret`; fails past BOUND_S."""
    start = time.monotonic()
    while any(_status(base, secret) != status for base in bases):
        if time.monotonic() - start > BOUND_S:
            answers = [_status(base, secret) for base in bases]
            pytest.fail(f"not {status} on every replica within {BOUND_S} s: {answers}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_keys_in_the_database_are_shared_by_replicas(
    tmp_path: Path, postgres_url: str, tiny_qwen3_base: Path
) -> None:
    with _schema(postgres_url) as database_url:
        settings = {
            "database_url": database_url,
            "api_keys": "database",
            "artifacts_dir": str(tmp_path / "artifacts"),
            "models": {MODEL: {"path": str(tiny_qwen3_base)}},
        }
        config = tmp_path / "settings.json"
        config.write_text(json.dumps({**settings, "data_dir": str(tmp_path / "cli")}))

        # Configured for database keys but none there: no start, one line saying what to do.
        refused = _run("serve", "--config", str(config))
        assert refused.returncode == 2
        assert "holds no API keys" in refused.stderr and "keys create" in refused.stderr
        assert "Traceback" not in refused.stderr

        admin = _keys(config, "create", "--scope", "admin", "--label", "ops")
        with contextlib.ExitStack() as stack:
            bases = [
                stack.enter_context(server_process({**settings, "data_dir": str(tmp_path / n)}))
                for n in ("a", "b")
            ]
            for base in bases:
                assert _status(base, None) == 401
                assert _status(base, admin["secret"]) == 200
            speak = _keys(config, "create", "--scope", "speak", "--label", "app")
            seen = _until(bases, speak["secret"], 200)
            usage = httpx.get(
                f"{bases[1]}/usage",
                headers={"Authorization": f"Bearer {speak['secret']}"},
                timeout=30,
            )
            assert usage.status_code == 403  # a speak key: the scope is the database's
            assert _keys(config, "revoke", speak["id"]) == {"id": speak["id"], "revoked": True}
            gone = _until(bases, speak["secret"], 401)
            for base in bases:
                assert _status(base, admin["secret"]) == 200
            print(f"created: accepted by both replicas in {seen:.2f} s; revoked: {gone:.2f} s")
