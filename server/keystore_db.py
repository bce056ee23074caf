"""API keys in the registry's database (`api_keys: database`): one set of keys for every
replica sharing a `database_url` (or for one server on the embedded SQLite file).

The table (`api_keys`, revision 0004) holds what a key file's entry holds: id, scope, PBKDF2
hash, label, limits. A revoked key keeps its row (hash cleared, `revoked_at` set), and every
edit stamps the rows it touches with the next `edit_seq`, so ``max(edit_seq)`` only grows.

Server side, `DatabaseKeys` is `KeyStore`'s read side (enabled, keys, get, authenticate). A
thread polls ``SELECT max(edit_seq), count(*)`` every `POLL_S` and reloads the keys when that
changed: a key created, revoked, rotated or limited by any process on any host is in effect on
every server within `POLL_S` (1 s) plus one query. Fail closed, as a key file: no keys in the
database (every one revoked) or a row that does not parse refuses every key until fixed; it
never turns auth off. The database unreachable: the last keys read stay in use for `STALE_S`
(30 s) after the last poll that succeeded (a database restart or failover does not refuse
everyone), then every key is refused until a poll succeeds again; that bound holds even if a
poll hangs, since it is checked at each authentication.

Edits (`voicefoundry keys ... --config` / `--database-url`) are one transaction each, taken in
turn (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), so two hosts' edits never
lose one another and `edit_seq` values never repeat.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa

from server.auth import ApiKey, ChangingKeys, KeyStore
from server.db.engine import READ_OPTION, make_engine, redacted, sqlite_url
from server.db.schema import api_keys
from server.limits import KeyLimits
from server.registry import utc_now
from server.settings import Settings

log = logging.getLogger("voicefoundry.auth")

POLL_S = 1.0
STALE_S = 30.0
CONNECT_TIMEOUT_S = 5
# pg_advisory_xact_lock key of an edit of the api_keys table ("vfky" in ASCII).
_PG_LOCK_KEY = 0x76666B79

Stamp = tuple[int, int]
_STAMP_QUERY = sa.select(sa.func.coalesce(sa.func.max(api_keys.c.edit_seq), 0), sa.func.count())
_ACTIVE_QUERY = (
    sa.select(api_keys).where(api_keys.c.revoked_at.is_(None)).order_by(api_keys.c.created_at)
)


def database_url(settings: Settings) -> str:
    """The registry's database: `database_url`, or the embedded SQLite file."""
    return settings.database_url or sqlite_url(settings.data_path / "registry.sqlite3")


def open_engine(url: str) -> sa.Engine:
    """An engine for the keys; on PostgreSQL a connection attempt gives up after a few seconds
    (unless the URL says otherwise), so a poll does not wait on an unreachable host for long."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)})
    return make_engine(parsed.render_as_string(hide_password=False))


def _key_of(row: sa.Row[Any]) -> ApiKey:
    try:
        limits = msgspec.json.decode(row.limits, type=KeyLimits)
    except msgspec.DecodeError as exc:
        raise ValueError(f"API key {row.id!r}: limits: {exc}") from None
    return ApiKey(id=row.id, scope=row.scope, hash=row.hash, label=row.label, limits=limits)


def _active(connection: sa.Connection) -> KeyStore:
    """The keys not revoked; ValueError naming the rows that do not parse."""
    keys: list[ApiKey] = []
    problems: list[str] = []
    for row in connection.execute(_ACTIVE_QUERY):
        try:
            keys.append(_key_of(row))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("invalid API keys in the database: " + "; ".join(problems))
    return KeyStore(keys)


def _stamp(connection: sa.Connection) -> Stamp:
    top, count = connection.execute(_STAMP_QUERY).one()
    return int(top), int(count)


def _no_keys(where: str) -> str:
    return (
        f"api_keys: database, and {where} holds no API keys; add one (voicefoundry keys create "
        "--config SETTINGS) or move a key file's (voicefoundry keys import --file FILE "
        "--config SETTINGS)"
    )


def _read_configured(engine: sa.Engine, where: str) -> tuple[Stamp, KeyStore]:
    """What a server starts with; ValueError (one line) if it cannot read keys or finds none."""
    try:
        with engine.connect() as connection:
            connection.execution_options(**{READ_OPTION: True})
            if not sa.inspect(connection).has_table("api_keys"):
                raise ValueError(_no_keys(where))
            stamp = _stamp(connection)
            store = _active(connection)
    except sa.exc.SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        raise ValueError(
            f"api_keys: database: cannot read the API keys in {where}: {reason}"
        ) from None
    if not store.enabled:
        raise ValueError(_no_keys(where))
    return stamp, store


def preflight(settings: Settings) -> None:
    """What `voicefoundry serve` checks before it starts: the database holds keys it can read
    (one-line ValueError otherwise). Changes nothing: a missing SQLite file is not made."""
    url = database_url(settings)
    engine = open_engine(url)
    where = redacted(url)
    try:
        if (
            engine.dialect.name == "sqlite"
            and not (settings.data_path / "registry.sqlite3").is_file()
        ):
            raise ValueError(_no_keys(where))
        _read_configured(engine, where)
    finally:
        engine.dispose()


class DatabaseKeys(ChangingKeys):
    """`KeyStore`'s read side over the `api_keys` table; always enabled. Raises ValueError at
    construction if the table cannot be read or holds no keys (no start). `close` stops its
    polling thread."""

    def __init__(self, url: str, *, poll_s: float = POLL_S, stale_s: float = STALE_S) -> None:
        self.where = redacted(url)
        self._poll_s = poll_s
        self._stale_s = stale_s
        self._engine = open_engine(url)
        try:
            self._stamp, store = _read_configured(self._engine, self.where)
        except BaseException:
            self._engine.dispose()
            raise
        self._store: KeyStore | None = store
        self._last_ok = time.monotonic()
        self._failing = False
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="api-keys-poll", daemon=True)
        self._thread.start()

    def current(self) -> KeyStore | None:
        """The keys as last read; None while they are unusable or older than `stale_s`."""
        if time.monotonic() - self._last_ok > self._stale_s:
            return None
        return self._store

    def refresh(self) -> None:
        """One poll: reload the keys if the table changed since the last one."""
        with self._refresh_lock:
            try:
                with self._engine.connect() as connection:
                    connection.execution_options(**{READ_OPTION: True})
                    # The stamp first: keys read after it are at least as new, so a change
                    # committed in between is seen again at the next poll, never missed.
                    stamp = _stamp(connection)
                    store = _active(connection) if stamp != self._stamp else self._store
            except sa.exc.SQLAlchemyError as exc:
                if not self._failing:
                    log.error(
                        "cannot read the API keys in %s (%s); the last ones read stay in use "
                        "for %.0f s, then every key is refused until it answers",
                        self.where,
                        getattr(exc, "orig", None) or exc,
                        self._stale_s,
                    )
                    self._failing = True
                return
            except ValueError as exc:
                log.error("%s; every API key is refused until that is fixed", exc)
                store = None
            if store is not None and not store.enabled:
                log.error("%s", _no_keys(self.where) + "; every API key is refused until then")
                store = None
            if stamp != self._stamp and store is not None:
                log.info("API keys reloaded from %s: %d keys", self.where, len(store))
            if self._failing:
                log.info("the API keys in %s can be read again", self.where)
                self._failing = False
            self._store = store
            self._stamp = stamp
            self._last_ok = time.monotonic()

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.refresh()
            except Exception:  # the poller must outlive any one failure; staleness refuses
                log.exception("polling the API keys failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._poll_s + CONNECT_TIMEOUT_S + 5)
        self._engine.dispose()


# ---- edits (voicefoundry keys) ---------------------------------------------------------------


def _lock(connection: sa.Connection) -> None:
    # SQLite: the engine opened this transaction with BEGIN IMMEDIATE, which already serialises.
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK_KEY)))


def _next_seq(connection: sa.Connection) -> Iterator[int]:
    top = connection.execute(sa.select(sa.func.coalesce(sa.func.max(api_keys.c.edit_seq), 0)))
    seq = int(top.scalar_one())
    while True:
        seq += 1
        yield seq


def _values(key: ApiKey) -> dict[str, Any]:
    return {
        "scope": key.scope,
        "hash": key.hash,
        "label": key.label,
        "limits": msgspec.json.encode(key.limits).decode(),
    }


def _insert(connection: sa.Connection, key: ApiKey, seq: int, now: str) -> None:
    connection.execute(
        api_keys.insert().values(
            id=key.id, created_at=now, updated_at=now, revoked_at=None, edit_seq=seq, **_values(key)
        )
    )


def _revoked_ids(connection: sa.Connection, ids: Iterable[str]) -> set[str]:
    query = sa.select(api_keys.c.id).where(
        api_keys.c.id.in_(list(ids)), api_keys.c.revoked_at.is_not(None)
    )
    return set(connection.execute(query).scalars())


@contextlib.contextmanager
def edit_key_table(engine: sa.Engine) -> Iterator[KeyStore]:
    """The keys in the database as a `KeyStore` the caller changes (add, remove, rotate,
    set_limits: the same calls as on a key file); its changes are written when the block ends,
    all in the one transaction that read them. An exception writes nothing."""
    with engine.begin() as connection:
        _lock(connection)
        before = {key.id: key for key in _active(connection).keys}
        store = KeyStore(before.values())
        yield store
        after = {key.id: key for key in store.keys}
        now = utc_now()
        seqs = _next_seq(connection)
        added = [key for key_id, key in after.items() if key_id not in before]
        reused = _revoked_ids(connection, (key.id for key in added))
        if reused:  # a fresh random id that a revoked key had: 1 in 2**32 per revoked key
            raise ValueError(f"key id {sorted(reused)[0]!r} belonged to a revoked key; run again")
        for key in added:
            _insert(connection, key, next(seqs), now)
        for key_id, key in after.items():
            if key_id in before and before[key_id] != key:
                connection.execute(
                    api_keys.update()
                    .where(api_keys.c.id == key_id)
                    .values(updated_at=now, edit_seq=next(seqs), **_values(key))
                )
        for key_id in before.keys() - after.keys():
            connection.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id)
                .values(hash="", revoked_at=now, updated_at=now, edit_seq=next(seqs))
            )


def list_keys(engine: sa.Engine) -> tuple[ApiKey, ...]:
    with engine.connect() as connection:
        connection.execution_options(**{READ_OPTION: True})
        return _active(connection).keys


def import_keys(engine: sa.Engine, source: KeyStore) -> tuple[list[str], list[str]]:
    """Copy a key file's keys (hashes, scopes, labels, limits: no secret is needed) into the
    database in one transaction: (ids imported, ids already there identical). A key whose id is
    in the database with other values, or revoked there, stops the whole import (ValueError)."""
    with engine.begin() as connection:
        _lock(connection)
        ids = [key.id for key in source.keys]
        rows = {
            row.id: row
            for row in connection.execute(sa.select(api_keys).where(api_keys.c.id.in_(ids)))
        }
        imported: list[str] = []
        present: list[str] = []
        problems: list[str] = []
        for key in source.keys:
            row = rows.get(key.id)
            if row is None:
                imported.append(key.id)
            elif row.revoked_at is not None:
                problems.append(f"key {key.id!r} was revoked in the database")
            elif _key_of(row) != key:
                problems.append(f"key {key.id!r} is in the database with another hash or fields")
            else:
                present.append(key.id)
        if problems:
            raise ValueError("nothing imported: " + "; ".join(problems))
        now = utc_now()
        seqs = _next_seq(connection)
        for key in source.keys:
            if key.id in imported:
                _insert(connection, key, next(seqs), now)
    return imported, present


def cli_engine(url: str) -> sa.Engine:
    """An engine for `voicefoundry keys`, its database migrated to this version's head (as a
    server's start would), so keys can be made before the first server start."""
    from server.db import migrate

    if sa.make_url(url).get_backend_name() == "sqlite":
        database = sa.make_url(url).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = open_engine(url)
    try:
        migrate.upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
