# Frozen copy of server/registry.py at commit 3da3423 (the last sqlite3-only registry), used by
# tests/test_registry_migrations.py to write a data dir exactly as that code did. Never edit.
"""The voice registry: voice name -> base model, adapter, baked slot, ref clip, language.

One SQLite file in the data dir (WAL, ``synchronous=FULL``); every write is one transaction, so a
crash leaves either the whole write or none of it.

Threading: ONE connection (``check_same_thread=False``) guarded by a re-entrant lock. The app calls
the registry from anyio's thread pool; its queries are point lookups on a table of at most a few
thousand rows, so serialising them costs nothing measurable, and a single connection means
``close()`` really closes everything, from any thread. Other processes (a CLI, a second server)
may open the same file: SQLite's file locks and the busy timeout arbitrate between them.

Per-name locks (``lock`` / ``alock``) are separate from the connection lock: they make a whole
import or delete (load the adapter, then register; unregister, then unload) atomic per voice name.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

VoiceKind = Literal["builtin", "baked", "adapter", "clone", "language", "duplex"]
VOICE_KINDS: frozenset[str] = frozenset(get_args(VoiceKind))

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0

NAME_RULE = (
    "1-64 characters: lower-case ASCII letters, digits, '_' or '-', "
    "starting with a letter or digit (upper case is lowered)"
)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS voices (
    name             TEXT PRIMARY KEY,
    base_model       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    adapter          TEXT,
    slot             INTEGER,
    ref_clip         TEXT,
    default_language TEXT,
    meta             TEXT NOT NULL DEFAULT '{}',
    created_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS voices_base_model ON voices (base_model);
CREATE UNIQUE INDEX IF NOT EXISTS voices_slot ON voices (base_model, slot)
    WHERE slot IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    payload    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""

_VOICE_COLUMNS = (
    "name",
    "base_model",
    "kind",
    "adapter",
    "slot",
    "ref_clip",
    "default_language",
    "meta",
    "created_at",
)
_JOB_FIELDS = frozenset({"name", "state", "payload"})


class RegistryError(Exception):
    """Base class of the registry's errors."""


class VoiceExists(RegistryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"voice {name!r} already exists")
        self.name = name


class VoiceNotFound(RegistryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"voice {name!r} not found")
        self.name = name


class InvalidVoiceName(RegistryError, ValueError):
    def __init__(self, name: object) -> None:
        super().__init__(f"invalid voice name {name!r}: a voice name is {NAME_RULE}")
        self.name = name


class SlotInUse(RegistryError):
    def __init__(self, name: str, base_model: str, slot: int, holder: str) -> None:
        super().__init__(
            f"cannot register voice {name!r}: slot {slot} of base model {base_model!r} "
            f"already holds voice {holder!r}"
        )
        self.name = name
        self.slot = slot
        self.holder = holder


class JobNotFound(RegistryError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


def validate_name(name: str) -> str:
    """Return the canonical (lower-case) voice name, or raise `InvalidVoiceName`."""
    # isascii() first: str.lower() maps some non-ASCII letters onto ASCII (KELVIN SIGN -> "k").
    if not isinstance(name, str) or not name.isascii():
        raise InvalidVoiceName(name)
    canonical = name.lower()
    if _NAME_RE.fullmatch(canonical) is None:
        raise InvalidVoiceName(name)
    return canonical


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a ``Z`` suffix (millisecond precision)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_copy(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a JSON object (dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def _optional_str(value: object, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{what} must be a non-empty string or None, got {value!r}")


@dataclass(frozen=True)
class Voice:
    """One registered voice. Paths (``adapter``, ``ref_clip``) are relative to the data dir."""

    name: str
    base_model: str
    kind: VoiceKind
    adapter: str | None = None
    slot: int | None = None
    ref_clip: str | None = None
    default_language: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    created_at: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so every Voice holds canonical values.
        object.__setattr__(self, "name", validate_name(self.name))
        object.__setattr__(self, "meta", _json_copy(self.meta, f"voice {self.name!r}: meta"))
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"voice {self.name!r}: base_model must be a non-empty model name")
        if self.kind not in VOICE_KINDS:
            raise ValueError(
                f"voice {self.name!r}: kind {self.kind!r} is not one of {sorted(VOICE_KINDS)}"
            )
        if self.slot is not None and (
            isinstance(self.slot, bool) or not isinstance(self.slot, int) or self.slot < 0
        ):
            raise ValueError(f"voice {self.name!r}: slot must be a row index >= 0 or None")
        _optional_str(self.adapter, f"voice {self.name!r}: adapter")
        _optional_str(self.ref_clip, f"voice {self.name!r}: ref_clip")
        _optional_str(self.default_language, f"voice {self.name!r}: default_language")
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"voice {self.name!r}: created_at {self.created_at!r} is not ISO 8601"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Voice:
        unknown = sorted(set(data) - set(_VOICE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown voice field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Job:
    """One row of the jobs table (fine-tune jobs; the job service owns ``state`` values)."""

    id: str
    name: str
    state: str
    created_at: str
    updated_at: str
    payload: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _voice_from_row(row: sqlite3.Row) -> Voice:
    data = {key: row[key] for key in _VOICE_COLUMNS}
    data["meta"] = json.loads(data["meta"])
    return Voice(**data)


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        name=row["name"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        payload=json.loads(row["payload"]),
    )


class Registry:
    """The voice registry (and the jobs table) in one SQLite file. See the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting, only touched while holding self._lock
        self._name_locks: dict[str, threading.Lock] = {}
        self._async_locks: dict[str, asyncio.Lock] = {}
        self._name_locks_guard = threading.Lock()
        # isolation_level=None: no implicit BEGINs; transactions are explicit (transaction()).
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed write also survives power loss, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def data_dir(self) -> Path:
        return self.path.parent

    def _migrate(self) -> None:
        with self.transaction() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path} has registry schema {version}; this voicefoundry reads "
                    f"schema {SCHEMA_VERSION} or older"
                )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"registry {self.path} is closed")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction; registry calls made inside it join it.

        E.g. register a trained voice and mark its job done in one step::

            with registry.transaction():
                registry.add(voice)
                registry.update_job(job_id, state="succeeded")
        """
        with self._lock:
            conn = self._connection()
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            # IMMEDIATE takes the write lock up front: check-then-write sequences cannot race
            # with another process.
            conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    # ---- voices -------------------------------------------------------------------------------

    def add(self, voice: Voice) -> Voice:
        """Register a new voice; `VoiceExists` if the name is taken, `SlotInUse` on a slot clash."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM voices WHERE name = ?", (voice.name,)).fetchone():
                raise VoiceExists(voice.name)
            self._check_slot(conn, voice)
            conn.execute(
                f"INSERT INTO voices ({', '.join(_VOICE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_VOICE_COLUMNS))})",
                self._voice_values(voice),
            )
        return voice

    def get(self, name: str) -> Voice:
        canonical = validate_name(name)
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT * FROM voices WHERE name = ?", (canonical,))
                .fetchone()
            )
        if row is None:
            raise VoiceNotFound(canonical)
        return _voice_from_row(row)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except VoiceNotFound:
            return False
        return True

    def list(self, base_model: str | None = None) -> list[Voice]:
        """All voices (of one base model when given), sorted by name."""
        query = "SELECT * FROM voices"
        params: tuple[str, ...] = ()
        if base_model is not None:
            query, params = query + " WHERE base_model = ?", (base_model,)
        with self._lock:
            rows = self._connection().execute(query + " ORDER BY name", params).fetchall()
        return [_voice_from_row(row) for row in rows]

    def delete(self, name: str) -> Voice:
        """Unregister a voice and return it (the caller removes its files)."""
        canonical = validate_name(name)
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM voices WHERE name = ?", (canonical,)).fetchone()
            if row is None:
                raise VoiceNotFound(canonical)
            conn.execute("DELETE FROM voices WHERE name = ?", (canonical,))
        return _voice_from_row(row)

    def replace(self, voice: Voice) -> Voice:
        """Overwrite an existing voice with `voice`; return the PREVIOUS record (for cleanup)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM voices WHERE name = ?", (voice.name,)).fetchone()
            if row is None:
                raise VoiceNotFound(voice.name)
            self._check_slot(conn, voice)
            columns = _VOICE_COLUMNS[1:]
            conn.execute(
                f"UPDATE voices SET {', '.join(f'{c} = ?' for c in columns)} WHERE name = ?",
                (*self._voice_values(voice)[1:], voice.name),
            )
        return _voice_from_row(row)

    def used_slots(self, base_model: str) -> set[int]:
        """The codec_embedding rows taken by voices of `base_model`."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT slot FROM voices WHERE base_model = ? AND slot IS NOT NULL",
                    (base_model,),
                )
                .fetchall()
            )
        return {int(row[0]) for row in rows}

    @staticmethod
    def _voice_values(voice: Voice) -> tuple[Any, ...]:
        values = voice.to_dict()
        values["meta"] = json.dumps(values["meta"], sort_keys=True)
        return tuple(values[c] for c in _VOICE_COLUMNS)

    @staticmethod
    def _check_slot(conn: sqlite3.Connection, voice: Voice) -> None:
        if voice.slot is None:
            return
        row = conn.execute(
            "SELECT name FROM voices WHERE base_model = ? AND slot = ? AND name != ?",
            (voice.base_model, voice.slot, voice.name),
        ).fetchone()
        if row is not None:
            raise SlotInUse(voice.name, voice.base_model, voice.slot, row[0])

    # ---- per-name locks -----------------------------------------------------------------------

    def lock(self, name: str) -> threading.Lock:
        """The lock of one voice name (a context manager), for atomic import/delete in threads.

        Locks are created on demand and kept for the registry's life (one small object per name
        ever used).
        """
        canonical = validate_name(name)
        with self._name_locks_guard:
            return self._name_locks.setdefault(canonical, threading.Lock())

    def alock(self, name: str) -> asyncio.Lock:
        """The asyncio lock of one voice name, for atomic import/delete in async handlers.

        Independent of `lock(name)`: use one kind consistently for a given operation.
        """
        canonical = validate_name(name)
        with self._name_locks_guard:
            return self._async_locks.setdefault(canonical, asyncio.Lock())

    # ---- jobs ---------------------------------------------------------------------------------

    def put_job(
        self, job_id: str, name: str, state: str, payload: Mapping[str, Any] | None = None
    ) -> Job:
        """Insert a job, or overwrite its name/state/payload (keeping ``created_at``)."""
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
        body = json.dumps(_json_copy(payload or {}, f"job {job_id!r}: payload"), sort_keys=True)
        now = utc_now()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, name, state, created_at, updated_at, payload) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "name = excluded.name, state = excluded.state, "
                "updated_at = excluded.updated_at, payload = excluded.payload",
                (job_id, name, state, now, now, body),
            )
            return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job:
        with self._lock:
            row = (
                self._connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            )
        if row is None:
            raise JobNotFound(job_id)
        return _job_from_row(row)

    def list_jobs(self, state: str | None = None) -> builtins.list[Job]:
        """All jobs (in one state when given), oldest first."""
        query = "SELECT * FROM jobs"
        params: tuple[str, ...] = ()
        if state is not None:
            query, params = query + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._connection().execute(query + " ORDER BY created_at, id", params).fetchall()
        return [_job_from_row(row) for row in rows]

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Set some of ``name``, ``state``, ``payload`` (replaced whole) and bump ``updated_at``."""
        unknown = sorted(set(fields) - _JOB_FIELDS)
        if unknown:
            raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
        if "payload" in fields:
            payload = _json_copy(fields["payload"], f"job {job_id!r}: payload")
            fields["payload"] = json.dumps(payload, sort_keys=True)
        fields["updated_at"] = utc_now()
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self.transaction() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id)
            )
            if cursor.rowcount == 0:
                raise JobNotFound(job_id)
            return self.get_job(job_id)

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise `RegistryError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
