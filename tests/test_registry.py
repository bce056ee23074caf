"""Tests for server.registry: CRUD, names, slots, jobs, atomicity, crash survival, locking."""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(tmp_path / "data" / "registry.sqlite3")
    yield registry
    registry.close()


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
    with sqlite3.connect(reg.path) as raw:
        assert raw.execute("SELECT name FROM voices").fetchall() == [("carol",)]
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


def test_reopen_keeps_data_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    with Registry(path) as first:
        first.add(_voice("eve", meta={"a": 1}))
    with Registry(path) as second:
        assert second.get("eve").meta == {"a": 1}
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    Registry(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match="schema 99"):
        Registry(path)


def test_closed_registry_raises(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite3")
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


def _run_child(db: Path, body: str) -> subprocess.Popen[str]:
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        from server.registry import Registry, Voice
        reg = Registry(Path(sys.argv[1]))
        def voice(name):
            return Voice(name=name, base_model="m", kind="adapter", meta={"pad": "x" * 5000})
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def test_commit_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    child = _run_child(
        db,
        """
        reg.add(voice("kept"))
        reg.put_job("job1", "kept", "succeeded", {"step": 7})
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert child.wait(timeout=30) == -signal.SIGKILL
    with Registry(db) as reg:
        assert reg.get("kept").meta["pad"] == "x" * 5000
        assert reg.get_job("job1").payload == {"step": 7}


def test_sigkill_mid_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    Registry(db).close()
    child = _run_child(
        db,
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
    with Registry(db) as reg:
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
