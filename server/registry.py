"""The voice registry: voice name -> base model, adapter, baked slot, ref clip, language; the
jobs table; and the speaker rows reserved while a voice is installed.

On SQLAlchemy (server/db): a SQLite file in the data dir by default (WAL, ``synchronous=FULL``,
``BEGIN IMMEDIATE`` writes), or PostgreSQL (``database_url``) shared by several replicas. The
schema is alembic's: opening a registry migrates it (server/db/migrate.py), in place for a file
made before alembic. Every write is one transaction, so a crash leaves the whole write or none.

Threading: `transaction()` binds one connection to the calling thread; registry calls made in
it (on that thread) join it. Reads outside a transaction take a pooled connection each. On
SQLite a per-object lock also serialises this process's writers (instead of spinning in the busy
handler); other processes, and every replica on PostgreSQL, are arbitrated by the database:
uniqueness by constraints (a lost race is reported as `VoiceExists` / `SlotInUse`), and speaker
rows by `allocate_slot`, which retries when another replica took the row it chose.

Per-name locks (``lock`` / ``alock``) are separate: they make a whole import or delete (load the
adapter, then register; unregister, then unload) atomic per voice name within this process.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from server.db import migrate
from server.db.engine import READ_OPTION, make_engine, redacted, sqlite_url
from server.db.schema import jobs as jobs_table
from server.db.schema import slot_reservations
from server.db.schema import voices as voices_table

# A reservation whose voice never got registered (its replica died mid-install) is free again
# after this long; an install takes seconds.
SLOT_RESERVATION_TTL_S = 900.0
SLOT_ATTEMPTS = 16

VoiceKind = Literal["builtin", "baked", "adapter", "clone", "language", "duplex"]
VOICE_KINDS: frozenset[str] = frozenset(get_args(VoiceKind))

NAME_RULE = (
    "1-64 characters: lower-case ASCII letters, digits, '_' or '-', "
    "starting with a letter or digit (upper case is lowered)"
)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

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
    """One registered voice. Paths (``adapter``, ``ref_clip``) are relative to the artifacts
    dir (the data dir by default)."""

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


def _voice_from_row(row: sa.Row[Any]) -> Voice:
    data = {key: row._mapping[key] for key in _VOICE_COLUMNS}
    data["meta"] = json.loads(data["meta"])
    return Voice(**data)


def _job_from_row(row: sa.Row[Any]) -> Job:
    data = row._mapping
    return Job(
        id=data["id"],
        name=data["name"],
        state=data["state"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        payload=json.loads(data["payload"]),
    )


def upsert(connection: sa.Connection, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT`` of `connection`'s dialect (SQLite and PostgreSQL spell
    `on_conflict_do_update` alike; each has its own construct)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


class Registry:
    """The voice registry and the jobs table. See the module docstring.

    `path` is the SQLite file of the embedded default; its folder is the data dir. With
    `database_url` the tables live in that database instead and `path` only names the data dir.
    The voices' relative paths (adapter, ref_clip) start from `artifacts_dir` (default: the
    data dir).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        database_url: str | None = None,
        artifacts_dir: Path | str | None = None,
    ) -> None:
        self.path = Path(path)
        self._artifacts = Path(artifacts_dir) if artifacts_dir is not None else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = database_url or sqlite_url(self.path)
        self._engine: sa.Engine | None = make_engine(self.url)
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._write_lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self._sqlite else contextlib.nullcontext()
        )
        self._local = threading.local()
        self._name_locks: dict[str, threading.Lock] = {}
        self._async_locks: dict[str, asyncio.Lock] = {}
        self._name_locks_guard = threading.Lock()
        try:
            migrate.upgrade(self._engine)
        except migrate.MigrationError as exc:
            self.close()
            raise RegistryError(f"{self.where}: {exc}") from exc
        except sa.exc.OperationalError as exc:
            self.close()
            raise RegistryError(f"cannot open the registry {self.where}: {exc.orig}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def data_dir(self) -> Path:
        return self.path.parent

    @property
    def artifacts_dir(self) -> Path:
        """Where the voices' relative paths (adapter, ref_clip) start: server/artifacts.py."""
        return self._artifacts if self._artifacts is not None else self.data_dir

    @property
    def where(self) -> str:
        """The database, for messages (a URL's password hidden)."""
        return str(self.path) if self._sqlite else redacted(self.url)

    @property
    def dialect(self) -> str:
        return "sqlite" if self._sqlite else "postgresql"

    def _engine_open(self) -> sa.Engine:
        if self._engine is None:
            raise RegistryError(f"registry {self.where} is closed")
        return self._engine

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One atomic write transaction; registry calls made inside it (on this thread) join it.

        E.g. register a trained voice and mark its job done in one step::

            with registry.transaction():
                registry.add(voice)
                registry.update_job(job_id, state="succeeded")
        """
        joined = getattr(self._local, "connection", None)
        if joined is not None:
            yield joined
            return
        engine = self._engine_open()
        with self._write_lock, engine.connect() as connection, connection.begin():
            self._local.connection = connection
            try:
                yield connection
            finally:
                self._local.connection = None

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        joined = getattr(self._local, "connection", None)
        if joined is not None:  # see this thread's own uncommitted writes
            yield joined
            return
        with self._engine_open().connect() as connection:
            connection.execution_options(**{READ_OPTION: True})
            yield connection

    # ---- voices -------------------------------------------------------------------------------

    def add(self, voice: Voice) -> Voice:
        """Register a new voice; `VoiceExists` if the name is taken, `SlotInUse` on a slot clash.
        A reservation of the voice's slot under its name (`allocate_slot`) is used up."""
        with self.transaction() as conn:
            if self._row(conn, voice.name) is not None:
                raise VoiceExists(voice.name)
            self._check_slot(conn, voice)
            try:
                with conn.begin_nested():
                    conn.execute(voices_table.insert().values(self._voice_values(voice)))
            except sa.exc.IntegrityError:
                self._raise_conflict(conn, voice, inserting=True)  # another replica won a race
                raise
            # Its rows' reservations are used up: the voice's row (and meta) holds them now.
            conn.execute(
                slot_reservations.delete().where(
                    slot_reservations.c.base_model == voice.base_model,
                    slot_reservations.c.name.in_([voice.name, _rows_holder(voice.name)]),
                )
            )
        return voice

    def get(self, name: str) -> Voice:
        canonical = validate_name(name)
        with self._reading() as conn:
            row = self._row(conn, canonical)
        if row is None:
            raise VoiceNotFound(canonical)
        return _voice_from_row(row)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except VoiceNotFound:
            return False
        return True

    def list(self, base_model: str | None = None) -> builtins.list[Voice]:
        """All voices (of one base model when given), sorted by name (code points, on every
        backend: PostgreSQL's collation would order '-' and '_' differently)."""
        query = sa.select(voices_table)
        if base_model is not None:
            query = query.where(voices_table.c.base_model == base_model)
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return sorted((_voice_from_row(row) for row in rows), key=lambda v: v.name)

    def delete(self, name: str) -> Voice:
        """Unregister a voice and return it (the caller removes its files)."""
        canonical = validate_name(name)
        with self.transaction() as conn:
            row = self._row(conn, canonical, for_update=True)
            if row is None:
                raise VoiceNotFound(canonical)
            conn.execute(voices_table.delete().where(voices_table.c.name == canonical))
        return _voice_from_row(row)

    def replace(self, voice: Voice) -> Voice:
        """Overwrite an existing voice with `voice`; return the PREVIOUS record (for cleanup)."""
        with self.transaction() as conn:
            row = self._row(conn, voice.name, for_update=True)
            if row is None:
                raise VoiceNotFound(voice.name)
            self._check_slot(conn, voice)
            values = self._voice_values(voice)
            del values["name"]
            try:
                with conn.begin_nested():
                    conn.execute(
                        voices_table.update()
                        .where(voices_table.c.name == voice.name)
                        .values(values)
                    )
            except sa.exc.IntegrityError:
                self._raise_conflict(conn, voice, inserting=False)
                raise
        return _voice_from_row(row)

    def used_slots(self, base_model: str) -> set[int]:
        """The speaker rows taken by voices of `base_model`, or reserved for voices being
        installed."""
        with self._reading() as conn:
            return self._taken(conn, base_model)

    # ---- speaker rows (slots) -----------------------------------------------------------------

    def allocate_slot(
        self, base_model: str, name: str, choose: Callable[[set[int]], int | None]
    ) -> int | None:
        """Reserve a speaker row of `base_model` for the voice `name` being installed; the row,
        or None when `choose` finds none free.

        `choose` gets the taken rows and picks one (e.g. ``lambda taken:
        model.free_speaker_slot(wanted, taken)``). The reservation is a row whose primary key is
        (base_model, slot): when another replica reserved the same row first, the insert fails
        and this chooses again. `add` of the voice with that slot uses the reservation up;
        `release_slot` gives it back when the install fails. Asked again for the same name, it
        returns that name's reservation.
        """
        canonical = validate_name(name)

        def one(taken: set[int]) -> builtins.list[int] | None:
            slot = choose(taken)
            return None if slot is None else [slot]

        rows = self._reserve(base_model, canonical, 1, one, "a speaker row")
        return rows[0] if rows else None

    def allocate_rows(
        self,
        base_model: str,
        name: str,
        count: int,
        choose: Callable[[set[int]], builtins.list[int] | None],
    ) -> builtins.list[int] | None:
        """Reserve `count` more codec rows of `base_model` for the voice `name` being installed
        (a new language's rows: they share the speakers' row space); the rows, or None when
        `choose` finds too few. As `allocate_slot`, against every replica's voices and
        reservations; `add` uses them up, `release_rows` gives them back."""
        holder = _rows_holder(validate_name(name))
        return self._reserve(base_model, holder, count, choose, f"{count} codec rows")

    def _reserve(
        self,
        base_model: str,
        holder: str,
        count: int,
        choose: Callable[[set[int]], builtins.list[int] | None],
        what: str,
    ) -> builtins.list[int] | None:
        """`count` rows of `base_model` reserved under `holder` (the ones it already holds, if
        any): `choose` picks among the free ones; a row another replica reserved meanwhile
        fails the insert (primary key (base_model, slot)) and this chooses again."""
        for _ in range(SLOT_ATTEMPTS):
            with self.transaction() as conn:
                self._expire_reservations(conn, base_model)
                held = conn.execute(
                    sa.select(slot_reservations.c.slot).where(
                        slot_reservations.c.base_model == base_model,
                        slot_reservations.c.name == holder,
                    )
                ).scalars()
                rows = sorted(int(r) for r in held)
                if rows:
                    return rows
                taken = self._taken(conn, base_model)
                chosen = choose(set(taken))
                if chosen is None:
                    return None
                if len(set(chosen)) != count or set(chosen) & taken:
                    raise ValueError(
                        f"choose() picked {chosen}: {count} free rows were asked, none taken"
                    )
                try:
                    with conn.begin_nested():
                        stamp = utc_now()
                        for row in chosen:
                            conn.execute(
                                slot_reservations.insert().values(
                                    base_model=base_model, slot=row, name=holder, reserved_at=stamp
                                )
                            )
                except sa.exc.IntegrityError:
                    continue  # another replica reserved one of them meanwhile: choose again
                return list(chosen)
        raise RegistryError(
            f"could not reserve {what} of {base_model!r} for {holder!r}: "
            f"{SLOT_ATTEMPTS} attempts lost to concurrent installs"
        )

    def release_rows(self, base_model: str, name: str) -> None:
        """Give back the rows `allocate_rows` reserved for `name` (nothing if none)."""
        holder = _rows_holder(validate_name(name))
        with self.transaction() as conn:
            conn.execute(
                slot_reservations.delete().where(
                    slot_reservations.c.base_model == base_model,
                    slot_reservations.c.name == holder,
                )
            )

    def release_slot(self, base_model: str, name: str) -> None:
        """Give back the row `allocate_slot` reserved for `name` (nothing if none)."""
        canonical = validate_name(name)
        with self.transaction() as conn:
            conn.execute(
                slot_reservations.delete().where(
                    slot_reservations.c.base_model == base_model,
                    slot_reservations.c.name == canonical,
                )
            )

    @staticmethod
    def _expire_reservations(conn: sa.Connection, base_model: str) -> None:
        cutoff = datetime.now(UTC) - timedelta(seconds=SLOT_RESERVATION_TTL_S)
        stamp = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        conn.execute(
            slot_reservations.delete().where(
                slot_reservations.c.base_model == base_model,
                slot_reservations.c.reserved_at < stamp,
            )
        )

    @staticmethod
    def _taken(conn: sa.Connection, base_model: str) -> set[int]:
        voice_slots = sa.select(voices_table.c.slot).where(
            voices_table.c.base_model == base_model, voices_table.c.slot.is_not(None)
        )
        reserved = sa.select(slot_reservations.c.slot).where(
            slot_reservations.c.base_model == base_model
        )
        rows = conn.execute(sa.union(voice_slots, reserved)).scalars()
        taken = {int(slot) for slot in rows}
        # Rows voices hold beyond their slot (a new language's rows), kept in their meta.
        metas = conn.execute(
            sa.select(voices_table.c.meta).where(voices_table.c.base_model == base_model)
        ).scalars()
        for meta in metas:
            for entry in (json.loads(meta or "{}") or {}).get("language_rows") or []:
                taken.add(int(entry["row"]))
        return taken

    # ---- voice rows ---------------------------------------------------------------------------

    @staticmethod
    def _row(conn: sa.Connection, name: str, *, for_update: bool = False) -> sa.Row[Any] | None:
        query = sa.select(voices_table).where(voices_table.c.name == name)
        if for_update:  # PostgreSQL: holds the row to the commit; SQLite: already exclusive
            query = query.with_for_update()
        return conn.execute(query).first()

    @staticmethod
    def _voice_values(voice: Voice) -> dict[str, Any]:
        values = voice.to_dict()
        values["meta"] = json.dumps(values["meta"], sort_keys=True)
        return {c: values[c] for c in _VOICE_COLUMNS}

    @staticmethod
    def _slot_holder(conn: sa.Connection, voice: Voice) -> str | None:
        if voice.slot is None:
            return None
        holder = conn.execute(
            sa.select(voices_table.c.name).where(
                voices_table.c.base_model == voice.base_model,
                voices_table.c.slot == voice.slot,
                voices_table.c.name != voice.name,
            )
        ).scalar_one_or_none()
        if holder is None:
            cutoff = datetime.now(UTC) - timedelta(seconds=SLOT_RESERVATION_TTL_S)
            stamp = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            holder = conn.execute(
                sa.select(slot_reservations.c.name).where(
                    slot_reservations.c.base_model == voice.base_model,
                    slot_reservations.c.slot == voice.slot,
                    slot_reservations.c.name != voice.name,
                    slot_reservations.c.reserved_at >= stamp,
                )
            ).scalar_one_or_none()
        return holder

    def _check_slot(self, conn: sa.Connection, voice: Voice) -> None:
        holder = self._slot_holder(conn, voice)
        if holder is not None and voice.slot is not None:
            raise SlotInUse(voice.name, voice.base_model, voice.slot, holder)

    def _raise_conflict(self, conn: sa.Connection, voice: Voice, *, inserting: bool) -> None:
        """After a unique violation (its savepoint rolled back): say which, as the checks before
        the write would have if the other replica's commit had come first."""
        if inserting and self._row(conn, voice.name) is not None:
            raise VoiceExists(voice.name) from None
        self._check_slot(conn, voice)

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
            insert = upsert(conn, jobs_table).values(
                id=job_id, name=name, state=state, created_at=now, updated_at=now, payload=body
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[jobs_table.c.id],
                    set_={
                        "name": insert.excluded.name,
                        "state": insert.excluded.state,
                        "updated_at": insert.excluded.updated_at,
                        "payload": insert.excluded.payload,
                    },
                )
            )
            return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job:
        with self._reading() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(job_id)
        return _job_from_row(row)

    def list_jobs(self, state: str | None = None) -> builtins.list[Job]:
        """All jobs (in one state when given), oldest first."""
        query = sa.select(jobs_table)
        if state is not None:
            query = query.where(jobs_table.c.state == state)
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return sorted((_job_from_row(row) for row in rows), key=lambda j: (j.created_at, j.id))

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Set some of ``name``, ``state``, ``payload`` (replaced whole) and bump ``updated_at``."""
        unknown = sorted(set(fields) - _JOB_FIELDS)
        if unknown:
            raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
        if "payload" in fields:
            payload = _json_copy(fields["payload"], f"job {job_id!r}: payload")
            fields["payload"] = json.dumps(payload, sort_keys=True)
        fields["updated_at"] = utc_now()
        with self.transaction() as conn:
            result = conn.execute(
                jobs_table.update().where(jobs_table.c.id == job_id).values(fields)
            )
            if result.rowcount == 0:
                raise JobNotFound(job_id)
            return self.get_job(job_id)

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pooled connections (idempotent); later calls raise `RegistryError`."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _rows_holder(name: str) -> str:
    """The reservation name of a voice's extra rows: never a valid voice name, so never its
    slot's reservation."""
    return f"{name}#rows"
