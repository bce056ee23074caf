"""Tests for server.registry: CRUD, names, slots, jobs, atomicity, crash survival, locking.

One suite, two backends: every test that takes `reg` or `open_registry` runs on SQLite (the
embedded default) and on PostgreSQL (a fresh schema per test in the session's test database).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.db import migrate
from server.registry import (
    InvalidVoiceName,
    JobNotFound,
    Registry,
    RegistryError,
    SlotInUse,
    Voice,
    VoiceExists,
    VoiceNotFound,
    validate_name,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """This test's database: None (SQLite under the data dir) or a PostgreSQL URL whose
    search_path is a schema of its own."""
    if request.param == "sqlite":
        yield None
        return
    server = sa.make_url(request.getfixturevalue("postgres_url"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield server.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def open_registry(database: str | None, tmp_path: Path) -> Iterator[Callable[[], Registry]]:
    """Opens a Registry on this test's database; each call is another "replica"."""
    opened: list[Registry] = []

    def factory() -> Registry:
        registry = Registry(tmp_path / "data" / "registry.sqlite3", database_url=database)
        opened.append(registry)
        return registry

    yield factory
    for registry in opened:
        registry.close()


@pytest.fixture
def reg(open_registry: Callable[[], Registry]) -> Registry:
    return open_registry()


def _voice(name: str, base: str = "qwen3-0.6b", **fields) -> Voice:
    return Voice(name=name, base_model=base, kind=fields.pop("kind", "adapter"), **fields)


# ---- names ----------------------------------------------------------------------------------


def test_validate_name_lowers_and_accepts_the_rule() -> None:
    assert validate_name("Alice") == "alice"
    assert validate_name("a") == "a"
    assert validate_name("0-voice_2") == "0-voice_2"
    assert validate_name("x" * 64) == "x" * 64


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "x/y", "x" * 65, "-lead", "_lead", "has space", "dot.name", "é", "\u212aate"],
)
def test_validate_name_rejects(bad: str) -> None:
    with pytest.raises(InvalidVoiceName) as info:
        validate_name(bad)
    message = str(info.value)
    assert repr(bad) in message and "1-64 characters" in message
    assert isinstance(info.value, RegistryError) and isinstance(info.value, ValueError)


def test_validate_name_rejects_non_strings() -> None:
    with pytest.raises(InvalidVoiceName):
        validate_name(None)  # type: ignore[arg-type]


def test_voice_normalises_and_validates() -> None:
    voice = _voice("Bob", meta={"k": [1, 2]})
    assert voice.name == "bob"
    assert voice.created_at.endswith("Z")
    assert voice.to_dict()["meta"] == {"k": [1, 2]}
    assert Voice.from_dict(voice.to_dict()) == voice
    with pytest.raises(InvalidVoiceName):
        _voice("../etc")
    with pytest.raises(ValueError, match="kind"):
        Voice(name="v", base_model="m", kind="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slot"):
        _voice("v", slot=-1)
    with pytest.raises(ValueError, match="slot"):
        _voice("v", slot=True)
    with pytest.raises(ValueError, match="base_model"):
        _voice("v", base="")
    with pytest.raises(TypeError, match="JSON"):
        _voice("v", meta={"x": object()})
    with pytest.raises(ValueError, match="unknown voice field"):
        Voice.from_dict({**voice.to_dict(), "path": "/etc/passwd"})


# ---- CRUD -----------------------------------------------------------------------------------


def test_add_get_delete_round_trip(reg: Registry) -> None:
    voice = _voice(
        "alice",
        adapter="voices/alice/adapter",
        ref_clip="voices/alice/ref.wav",
        default_language="en",
        meta={"epochs": 3, "note": "ünïcode"},
    )
    assert reg.add(voice) == voice
    got = reg.get("alice")
    assert got == voice
    assert got.meta == {"epochs": 3, "note": "ünïcode"}
    assert reg.exists("alice") and not reg.exists("bob")
    assert reg.delete("alice") == voice
    with pytest.raises(VoiceNotFound, match="'alice'"):
        reg.get("alice")
    with pytest.raises(VoiceNotFound, match="'alice'"):
        reg.delete("alice")


def test_names_are_unique_and_case_insensitive(reg: Registry) -> None:
    reg.add(_voice("Carol"))
    with pytest.raises(VoiceExists, match="'carol'"):
        reg.add(_voice("carol", base="other-model"))
    with pytest.raises(VoiceExists):
        reg.add(_voice("CAROL"))
    assert reg.get("CaRoL").name == "carol"
    assert [v.name for v in reg.list()] == ["carol"]
    # Stored lower-case in the database itself.
    with reg.transaction() as conn:
        assert conn.execute(sa.text("SELECT name FROM voices")).all() == [("carol",)]
    with pytest.raises(InvalidVoiceName):
        reg.get("../carol")


def test_list_filters_by_base_model_and_sorts_by_name(reg: Registry) -> None:
    for name, base in [("zed", "m1"), ("amy", "m2"), ("mia", "m1"), ("bo", "m1")]:
        reg.add(_voice(name, base=base))
    assert [v.name for v in reg.list()] == ["amy", "bo", "mia", "zed"]
    assert [v.name for v in reg.list("m1")] == ["bo", "mia", "zed"]
    assert [v.name for v in reg.list("m2")] == ["amy"]
    assert reg.list("m3") == []


def test_replace_overwrites_and_returns_previous(reg: Registry) -> None:
    old = reg.add(_voice("dan", adapter="a/1"))
    new = dataclasses.replace(old, adapter="a/2", meta={"v": 2})
    assert reg.replace(new) == old
    assert reg.get("dan") == new
    with pytest.raises(VoiceNotFound):
        reg.replace(_voice("nobody"))


def test_used_slots_and_slot_clash(reg: Registry) -> None:
    reg.add(_voice("b1", kind="baked", slot=3000))
    reg.add(_voice("b2", kind="baked", slot=3001))
    reg.add(_voice("b3", base="qwen3-1.7b", kind="baked", slot=3000))
    reg.add(_voice("a1"))
    assert reg.used_slots("qwen3-0.6b") == {3000, 3001}
    assert reg.used_slots("qwen3-1.7b") == {3000}
    assert reg.used_slots("absent") == set()
    with pytest.raises(SlotInUse, match="'b1'"):
        reg.add(_voice("b4", kind="baked", slot=3000))
    with pytest.raises(SlotInUse):
        reg.replace(_voice("b2", kind="baked", slot=3000))
    assert not reg.exists("b4")
    reg.replace(_voice("b2", kind="baked", slot=3002))  # moving to a free slot is fine
    assert reg.used_slots("qwen3-0.6b") == {3000, 3002}


def test_reopen_keeps_data_and_schema(open_registry: Callable[[], Registry]) -> None:
    first = open_registry()
    first.add(_voice("eve", meta={"a": 1}))
    first.close()
    second = open_registry()
    assert second.get("eve").meta == {"a": 1}
    with second.transaction() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).all() == [(1,)]
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
            (migrate.head(),)
        ]
    if second.dialect == "sqlite":
        with sqlite3.connect(second.path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unknown_newer_revision_is_refused(open_registry: Callable[[], Registry]) -> None:
    registry = open_registry()
    with registry.transaction() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    registry.close()
    with pytest.raises(RegistryError, match=r"'9999'.*newer version"):
        open_registry()


def test_closed_registry_raises(open_registry: Callable[[], Registry]) -> None:
    registry = open_registry()
    registry.close()
    registry.close()
    with pytest.raises(RegistryError, match="closed"):
        registry.list()


# ---- transactions ---------------------------------------------------------------------------


def test_transaction_rolls_back_every_write_on_error(reg: Registry) -> None:
    reg.put_job("j1", "fay", "running")
    with pytest.raises(RuntimeError), reg.transaction():
        reg.add(_voice("fay"))
        reg.update_job("j1", state="succeeded")
        raise RuntimeError("boom")
    assert not reg.exists("fay")
    assert reg.get_job("j1").state == "running"
    with reg.transaction():
        reg.add(_voice("fay"))
        reg.update_job("j1", state="succeeded")
    assert reg.exists("fay") and reg.get_job("j1").state == "succeeded"


def _run_child(db: Path, url: str | None, body: str) -> subprocess.Popen[str]:
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        from server.registry import Registry, Voice
        reg = Registry(Path(sys.argv[1]), database_url=sys.argv[2] or None)
        def voice(name):
            return Voice(name=name, base_model="m", kind="adapter", meta={"pad": "x" * 5000})
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(db), url or ""],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_commit_survives_sigkill(
    tmp_path: Path, database: str | None, open_registry: Callable[[], Registry]
) -> None:
    db = tmp_path / "data" / "registry.sqlite3"
    child = _run_child(
        db,
        database,
        """
        reg.add(voice("kept"))
        reg.put_job("job1", "kept", "succeeded", {"step": 7})
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert child.wait(timeout=30) == -signal.SIGKILL
    reg = open_registry()
    assert reg.get("kept").meta["pad"] == "x" * 5000
    assert reg.get_job("job1").payload == {"step": 7}


def test_sigkill_mid_transaction_leaves_nothing(
    tmp_path: Path, database: str | None, open_registry: Callable[[], Registry]
) -> None:
    db = tmp_path / "data" / "registry.sqlite3"
    open_registry().close()
    child = _run_child(
        db,
        database,
        """
        reg.add(voice("before"))
        with reg.transaction():
            for i in range(200):  # enough pages that SQLite may spill them to the WAL
                reg.add(voice(f"partial-{i}"))
            print("in transaction", flush=True)
            time.sleep(60)
        """,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in transaction"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    reg = open_registry()
    assert [v.name for v in reg.list()] == ["before"]
    reg.add(_voice("after"))  # the dead writer left no lock behind
    assert [v.name for v in reg.list()] == ["after", "before"]


# ---- threads and locks ----------------------------------------------------------------------


def test_concurrent_adds_from_threads(reg: Registry) -> None:
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(5):
                reg.add(_voice(f"t{i}-{j}"))
                reg.list()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = sorted(f"t{i}-{j}" for i in range(8) for j in range(5))
    assert sorted(v.name for v in reg.list()) == expected


def test_concurrent_adds_of_one_name_exactly_one_wins(reg: Registry) -> None:
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def work() -> None:
        barrier.wait()
        try:
            reg.add(_voice("same"))
            outcomes.append("added")
        except VoiceExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["added"] + ["exists"] * 7


def test_name_lock_serialises_same_name(reg: Registry) -> None:
    assert reg.lock("Gus") is reg.lock("gus")
    assert reg.lock("gus") is not reg.lock("hal")
    events: list[str] = []
    barrier = threading.Barrier(2)

    def work(tag: str) -> None:
        barrier.wait()
        with reg.lock("gus"):
            events.append(f"{tag}-in")
            time.sleep(0.05)
            events.append(f"{tag}-out")

    threads = [threading.Thread(target=work, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(events) == 4
    # Never interleaved: each "in" is directly followed by the same thread's "out".
    assert events[0][0] == events[1][0] and events[2][0] == events[3][0]
    assert [e[2:] for e in events] == ["in", "out", "in", "out"]


def test_name_lock_does_not_block_other_names(reg: Registry) -> None:
    with reg.lock("ivy"):
        got: list[bool] = []
        thread = threading.Thread(target=lambda: got.append(reg.lock("jon").acquire(timeout=1)))
        thread.start()
        thread.join()
        assert got == [True]
        assert not reg.lock("ivy").acquire(blocking=False)


def test_async_lock_per_name(reg: Registry) -> None:
    assert reg.alock("Kim") is reg.alock("kim")
    assert reg.alock("kim") is not reg.alock("lee")

    async def main() -> list[str]:
        events: list[str] = []

        async def work(tag: str) -> None:
            async with reg.alock("kim"):
                events.append(f"{tag}-in")
                await asyncio.sleep(0.01)
                events.append(f"{tag}-out")

        await asyncio.gather(work("a"), work("b"))
        return events

    assert asyncio.run(main()) == ["a-in", "a-out", "b-in", "b-out"]


# ---- jobs -----------------------------------------------------------------------------------


def test_jobs_round_trip(reg: Registry) -> None:
    job = reg.put_job("j1", "mo", "queued", {"config": {"epochs": 2}})
    assert (job.id, job.name, job.state) == ("j1", "mo", "queued")
    assert job.payload == {"config": {"epochs": 2}}
    assert job.created_at == job.updated_at
    assert reg.get_job("j1") == job
    reg.put_job("j0", "ned", "queued")
    time.sleep(0.002)
    updated = reg.update_job("j1", state="running", payload={"step": 5})
    assert updated.state == "running" and updated.payload == {"step": 5}
    assert updated.created_at == job.created_at and updated.updated_at > job.updated_at
    assert {j.id for j in reg.list_jobs()} == {"j0", "j1"}
    assert [j.id for j in reg.list_jobs(state="running")] == ["j1"]
    again = reg.put_job("j1", "mo", "failed", {"error": "x"})
    assert again.created_at == job.created_at and again.state == "failed"
    assert reg.get_job("j1").to_dict()["payload"] == {"error": "x"}
    with pytest.raises(JobNotFound):
        reg.get_job("nope")
    with pytest.raises(JobNotFound):
        reg.update_job("nope", state="x")
    with pytest.raises(ValueError, match="created_at"):
        reg.update_job("j1", created_at="2020-01-01T00:00:00Z")


# ---- replicas: two Registry objects on one database ------------------------------------------


def _lowest_free(start: int, calls: list[int]) -> Callable[[set[int]], int | None]:
    def choose(taken: set[int]) -> int | None:
        calls.append(1)
        return next(slot for slot in range(start, start + 10_000) if slot not in taken)

    return choose


def test_two_replicas_racing_for_slots_never_share_one(
    open_registry: Callable[[], Registry],
) -> None:
    replicas = [open_registry(), open_registry()]
    per_replica = 15
    barrier = threading.Barrier(len(replicas))
    won: dict[str, int] = {}
    calls: list[int] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        registry = replicas[index]
        try:
            barrier.wait()
            for i in range(per_replica):
                name = f"r{index}-v{i}"
                slot = registry.allocate_slot("qwen3-0.6b", name, _lowest_free(3000, calls))
                assert slot is not None
                won[name] = slot
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(won) == 2 * per_replica
    assert len(set(won.values())) == len(won)  # never one row for two voices
    assert set(won.values()) == set(range(3000, 3000 + len(won)))  # and none skipped
    # Every reservation becomes its voice's row through either replica.
    for name, slot in won.items():
        replicas[slot % 2].add(_voice(name, kind="baked", slot=slot))
    assert replicas[0].used_slots("qwen3-0.6b") == set(won.values())
    with replicas[1].transaction() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM slot_reservations")).scalar() == 0
    print(f"{replicas[0].dialect}: {len(calls)} choices for {len(won)} rows")


def test_allocate_slot_reserves_until_add_or_release(reg: Registry) -> None:
    calls: list[int] = []
    reg.add(_voice("old", kind="baked", slot=3000))
    slot = reg.allocate_slot("qwen3-0.6b", "New", _lowest_free(3000, calls))
    assert slot == 3001
    assert reg.allocate_slot("qwen3-0.6b", "new", _lowest_free(3000, calls)) == 3001  # kept
    assert reg.used_slots("qwen3-0.6b") == {3000, 3001}
    with pytest.raises(SlotInUse, match="'new'"):  # reserved for another voice
        reg.add(_voice("other", kind="baked", slot=3001))
    other = reg.allocate_slot("qwen3-0.6b", "other", _lowest_free(3000, calls))
    assert other == 3002
    reg.release_slot("qwen3-0.6b", "other")
    assert reg.used_slots("qwen3-0.6b") == {3000, 3001}
    assert reg.allocate_slot("qwen3-0.6b", "x", lambda taken: None) is None
    with pytest.raises(ValueError, match="taken"):
        reg.allocate_slot("qwen3-0.6b", "y", lambda taken: 3000)
    reg.add(_voice("new", kind="baked", slot=3001))
    assert reg.used_slots("qwen3-0.6b") == {3000, 3001}
    assert reg.allocate_slot("qwen3-1.7b", "new", _lowest_free(3000, calls)) == 3000


def test_language_rows_are_reserved_in_the_registry_with_the_slots(reg: Registry) -> None:
    """A new language's rows share the speakers' row space: reserved like slots, held by the
    voices' meta once added, so no replica gives one row to two voices."""
    model = "qwen3-0.6b"
    held = {"language_rows": [{"name": "hindi", "row": 2100}]}
    reg.add(_voice("hindi-voice", meta=held))
    reg.add(_voice("baked", kind="baked", slot=2101))
    assert reg.allocate_slot(model, "pending", lambda taken: 2102) == 2102

    def lowest(count: int) -> Callable[[set[int]], list[int] | None]:
        return lambda taken: [r for r in range(2100, 2200) if r not in taken][:count]

    rows = reg.allocate_rows(model, "Tamil", 2, lowest(2))
    assert rows == [2103, 2104]  # not the other voice's language row, slot or reservation
    assert reg.allocate_rows(model, "tamil", 2, lowest(2)) == rows  # kept for that voice
    assert reg.allocate_rows(model, "other", 1, lowest(1)) == [2105]
    assert {2103, 2104, 2105} <= reg.used_slots(model)  # a speaker slot never takes them
    reg.release_rows(model, "other")
    assert 2105 not in reg.used_slots(model)
    with pytest.raises(ValueError, match="free rows"):
        reg.allocate_rows(model, "clash", 1, lambda taken: [2100])
    assert reg.allocate_rows(model, "none", 3, lambda taken: None) is None
    meta = {"language_rows": [{"name": "tamil", "row": r} for r in rows]}
    reg.add(_voice("tamil", meta=meta))  # its reservation is used up; its meta holds the rows
    with reg.transaction() as conn:
        names = conn.execute(sa.text("SELECT name FROM slot_reservations")).scalars().all()
    assert names == ["pending"]
    assert {2100, 2101, 2102, 2103, 2104} <= reg.used_slots(model)


def test_stale_reservations_expire(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.registry as registry_module

    assert reg.allocate_slot("m", "dead", lambda taken: 7) == 7  # its replica never adds it
    monkeypatch.setattr(registry_module, "SLOT_RESERVATION_TTL_S", -1.0)
    assert reg.used_slots("m") == {7}  # until an allocation expires it
    assert reg.allocate_slot("m", "alive", lambda taken: min({7, 8} - taken)) == 7


def test_two_replicas_adding_one_name_exactly_one_wins(
    open_registry: Callable[[], Registry],
) -> None:
    replicas = [open_registry() for _ in range(4)]
    barrier = threading.Barrier(len(replicas))
    outcomes: list[str] = []

    def work(registry: Registry) -> None:
        barrier.wait()
        try:
            registry.add(_voice("same", kind="baked", slot=3000))
            outcomes.append("added")
        except VoiceExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=work, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["added"] + ["exists"] * (len(replicas) - 1)


def test_two_replicas_one_slot_by_direct_adds(open_registry: Callable[[], Registry]) -> None:
    replicas = [open_registry() for _ in range(4)]
    barrier = threading.Barrier(len(replicas))
    outcomes: list[str] = []

    def work(index: int) -> None:
        barrier.wait()
        try:
            replicas[index].add(_voice(f"v{index}", kind="baked", slot=3000))
            outcomes.append("added")
        except SlotInUse:
            outcomes.append("slot")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["added"] + ["slot"] * (len(replicas) - 1)
