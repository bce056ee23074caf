"""API keys in the registry's database (`api_keys: database`, server/keystore_db.py).

One suite, two backends (as tests/test_registry.py): every test taking `url` runs on SQLite and
on PostgreSQL (a fresh schema per test). The "server" is a `DatabaseKeys`; the other "host" is
a second engine or a `voicefoundry keys` subprocess. No model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from server import keys_cli
from server.auth import KeyStore, Unauthorized
from server.db.engine import sqlite_url
from server.keystore_db import (
    DatabaseKeys,
    cli_engine,
    edit_key_table,
    import_keys,
    list_keys,
    preflight,
)
from server.limits import KeyLimits
from server.settings import SettingsError, load_settings
from tests.service_helpers import postgres_schema

POLL_S = 0.1  # the servers' poll here; the bound checked is that plus one query, with slack
BOUND_S = 3.0


@contextlib.contextmanager
def _schema(postgres_url: str) -> Iterator[sa.URL]:
    """The session's PostgreSQL database with a schema of its own as the search path."""
    with postgres_schema(postgres_url, "k") as scoped:
        yield sa.make_url(scoped)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """This test's database URL: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "data" / "registry.sqlite3")
        return
    with _schema(request.getfixturevalue("postgres_url")) as target:
        yield target.render_as_string(hide_password=False)


@pytest.fixture
def host(url: str) -> Iterator[sa.Engine]:
    """Another host's engine on the database (migrated, as `voicefoundry keys` does)."""
    engine = cli_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def serve(url: str) -> Iterator[Callable[..., DatabaseKeys]]:
    """Opens the server's view of the keys; closed at the end."""
    opened: list[DatabaseKeys] = []

    def factory(**kwargs: float) -> DatabaseKeys:
        kwargs.setdefault("poll_s", POLL_S)
        store = DatabaseKeys(url, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def _create(engine: sa.Engine, scope: str = "speak", label: str = "") -> tuple[str, str]:
    with edit_key_table(engine) as store:
        secret, key = store.add(scope, label)
    return secret, key.id


def _within(check: Callable[[], bool], bound: float = BOUND_S) -> float:
    """Seconds until `check()` holds; fails past `bound`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > bound:
            pytest.fail(f"not within {bound} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _accepted(store: DatabaseKeys, secret: str) -> bool:
    try:
        store.authenticate(secret, "speak")
    except Unauthorized:
        return False
    return True


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`voicefoundry keys ARGS`, in this process (its own engine: another "host"; the real
    subprocess is tests/scale/test_keys_shared.py's)."""
    parser = argparse.ArgumentParser(prog="voicefoundry")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["keys", *args])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = parsed.handler(parsed)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_edits_by_another_process_take_effect_within_the_bound(
    url: str, host: sa.Engine, serve: Callable[..., DatabaseKeys]
) -> None:
    admin_secret, _ = _create(host, "admin", "ops")
    server = serve()
    assert server.enabled and server.authenticate(admin_secret, "admin").label == "ops"
    # Created by the CLI in another process, as on another host.
    made = _cli("create", "--database-url", url, "--scope", "speak", "--label", "app")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    _within(lambda: _accepted(server, created["secret"]))
    assert server.get(created["id"]) is not None and server.get(created["id"]).label == "app"
    with pytest.raises(Unauthorized):
        server.authenticate(created["secret"] + "x", "speak")
    # limit, rotate, revoke: each seen by the server within the bound.
    with edit_key_table(host) as store:
        store.set_limits(created["id"], KeyLimits(requests_per_minute=7))
    _within(lambda: server.get(created["id"]).limits.requests_per_minute == 7)
    with edit_key_table(host) as store:
        rotated, _ = store.rotate(created["id"])
    _within(lambda: _accepted(server, rotated) and not _accepted(server, created["secret"]))
    assert server.get(created["id"]).limits.requests_per_minute == 7
    revoked = _cli("revoke", created["id"], "--database-url", url)
    assert revoked.returncode == 0, revoked.stderr
    _within(lambda: not _accepted(server, rotated))
    assert server.get(created["id"]) is None
    assert [key.id for key in server.keys] == [key.id for key in list_keys(host)]
    assert _accepted(server, admin_secret)
    listed = _cli("list", "--database-url", url)
    assert [json.loads(line)["label"] for line in listed.stdout.splitlines()] == ["ops"]
    assert "hash" not in listed.stdout and "vf_" not in listed.stdout


def test_no_keys_refuses_every_key_never_auth_off(
    host: sa.Engine, serve: Callable[..., DatabaseKeys], url: str
) -> None:
    with pytest.raises(ValueError, match="holds no API keys"):
        DatabaseKeys(url)  # an empty table: no start
    secret, key_id = _create(host)
    server = serve()
    with edit_key_table(host) as store:
        store.remove(key_id)
    _within(lambda: server.current() is None)
    assert server.enabled and server.keys == ()
    with pytest.raises(Unauthorized):
        server.authenticate(secret, "speak")
    with pytest.raises(Unauthorized):
        server.authenticate(None, "speak")  # never ANONYMOUS
    again, _ = _create(host)
    _within(lambda: _accepted(server, again))
    assert not _accepted(server, secret)  # a revoked key stays revoked


def test_unreadable_keys_keep_the_last_set_for_a_bound_then_refuse(
    host: sa.Engine, serve: Callable[..., DatabaseKeys], caplog: pytest.LogCaptureFixture
) -> None:
    secret, _ = _create(host)
    server = serve(stale_s=0.5)
    with host.begin() as conn:  # the table gone from under the server: every poll fails
        conn.exec_driver_sql("ALTER TABLE api_keys RENAME TO api_keys_away")
    time.sleep(2 * POLL_S)
    assert _accepted(server, secret)  # within stale_s: the last keys read
    _within(lambda: not _accepted(server, secret), bound=0.5 + BOUND_S)
    assert "cannot read the API keys" in caplog.text
    with host.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE api_keys_away RENAME TO api_keys")
    _within(lambda: _accepted(server, secret))


def test_a_row_that_does_not_parse_refuses_every_key(
    host: sa.Engine, serve: Callable[..., DatabaseKeys]
) -> None:
    secret, key_id = _create(host)
    server = serve()
    with host.begin() as conn:
        conn.execute(
            sa.text("UPDATE api_keys SET scope = 'root', edit_seq = edit_seq + 1 WHERE id = :id"),
            {"id": key_id},
        )
    _within(lambda: not _accepted(server, secret))
    assert server.current() is None


def test_concurrent_edits_from_two_hosts_lose_nothing(url: str, host: sa.Engine) -> None:
    other = cli_engine(url)
    made: list[str] = []
    errors: list[BaseException] = []

    def create_many(engine: sa.Engine) -> None:
        try:
            for _ in range(5):
                made.append(_create(engine)[1])
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=create_many, args=(e,)) for e in (host, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other.dispose()
    assert errors == []
    assert sorted(key.id for key in list_keys(host)) == sorted(made) and len(made) == 10
    with host.connect() as conn:
        seqs = conn.execute(sa.text("SELECT edit_seq FROM api_keys")).scalars().all()
    assert sorted(seqs) == list(range(1, 11))


def test_import_moves_a_key_file_and_its_keys_keep_working(
    url: str, tmp_path: Path, host: sa.Engine, serve: Callable[..., DatabaseKeys]
) -> None:
    file = KeyStore()
    admin, _ = file.add("admin", "ops")
    speak, speak_key = file.add("speak", "app")
    file.set_limits(speak_key.id, KeyLimits(characters_per_day=100))
    path = tmp_path / "keys.json"
    file.save(path)
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"database_url": url, "api_keys": "database"}))
    moved = _cli("import", "--file", str(path), "--config", str(config))
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) == {
        "imported": [key.id for key in file.keys],
        "already_there": [],
    }
    server = serve()
    assert server.authenticate(admin, "admin").label == "ops"
    assert server.authenticate(speak, "speak").limits.characters_per_day == 100
    # Again: nothing changes. A different key under an imported id: refused, nothing written.
    again = _cli("import", "--file", str(path), "--config", str(config))
    assert json.loads(again.stdout)["already_there"] == [key.id for key in file.keys]
    clash = KeyStore(list(file.keys))
    clash.rotate(speak_key.id)
    clash.add("speak")
    with pytest.raises(ValueError, match="nothing imported"):
        import_keys(host, clash)
    assert len(list_keys(host)) == 2
    # A key revoked in the database is not brought back by importing the old file.
    with edit_key_table(host) as store:
        store.remove(speak_key.id)
    with pytest.raises(ValueError, match="revoked"):
        import_keys(host, file)
    _within(lambda: not _accepted(server, speak))
    # The CLI edits the configured database (api_keys: database) with --config alone.
    listed = _cli("list", "--config", str(config))
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [file.keys[0].id]


def test_preflight_and_settings(tmp_path: Path, url: str) -> None:
    settings = load_settings(data_dir=str(tmp_path / "data"), api_keys="database")
    if url.startswith("postgresql"):
        settings = load_settings(database_url=url, api_keys="database")
    with pytest.raises(ValueError, match="holds no API keys"):
        preflight(settings)  # nothing there yet: the server does not start
    engine = cli_engine(url)
    try:
        _create(engine)
    finally:
        engine.dispose()
    preflight(settings)
    with pytest.raises(SettingsError, match="remove api_keys_file"):
        load_settings(api_keys="database", api_keys_file="keys.json")
    assert load_settings().api_keys == "file"  # the default: as before


def test_a_database_that_does_not_answer_stops_the_start() -> None:
    dead = "postgresql+psycopg://voicefoundry:voicefoundry@127.0.0.1:9/none"
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot read the API keys"):
        DatabaseKeys(dead)
    assert time.monotonic() - start < 30


class _Proxy:
    """A TCP proxy to PostgreSQL that can be cut and restored: the database unreachable."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() (close alone does not)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()


def test_postgresql_unreachable_keeps_the_last_keys_for_a_bound_then_refuses(
    postgres_url: str,
) -> None:
    with _schema(postgres_url) as real:
        _cut_off_and_back(real)


def _cut_off_and_back(real: sa.URL) -> None:
    proxy = _Proxy((real.host or "127.0.0.1", real.port or 5432))
    proxy.start()
    via = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    engine = cli_engine(real.render_as_string(hide_password=False))
    server: DatabaseKeys | None = None
    try:
        secret, _ = _create(engine)
        server = DatabaseKeys(via, poll_s=POLL_S, stale_s=0.8)
        proxy.cut()
        time.sleep(3 * POLL_S)
        assert _accepted(server, secret)  # a blip: the last keys read
        _within(lambda: not _accepted(server, secret), bound=0.8 + BOUND_S)
        proxy.start()
        _within(lambda: _accepted(server, secret), bound=BOUND_S + 5)
    finally:
        if server is not None:
            server.close()
        proxy.cut()
        engine.dispose()
