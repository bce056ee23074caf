"""Disk bounds: what the server writes on request (uploaded clips, import packages, unpacked
members, job checkpoints) is refused with 507 before the data dir's disk goes below
`min_free_bytes`, and leaves nothing behind. The floor is set above the real free space of the
test's tmp dir (statvfs), never by filling a disk; a disk that fills while an upload streams is
the statvfs probe answering less after its first call."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

from finetune import fsutil
from finetune.config import TrainConfig
from finetune.data import synthetic_dataset
from finetune.families.qwen3_tts.training import prepare_run
from finetune.progress import ProgressWriter
from finetune.trainer import Trainer, TrainerConfig

import anyio
import mlx.core as mx
import mlx.nn as nn
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from server.app import create_app
from server.disk import InsufficientStorage
from server.job_config import JOB_KEEP_CHECKPOINTS, job_train_config
from server.package_archive import ArchiveLimits, unpack
from server.settings import ModelSpec, Settings
from server.voices import pack_directory

pytestmark = pytest.mark.anyio
TIB = 1 << 40


def _above_free(path: Path) -> int:
    """A floor the disk holding `path` is below right now."""
    return fsutil.free_bytes(path) + TIB


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _clips(tmp_path: Path) -> tuple[list, dict]:
    train = synthetic_dataset(tmp_path / "clips", 6, seed=5, with_ref=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    files = [
        ("clips", (r["audio"], (train.parent / r["audio"]).read_bytes(), "audio/wav")) for r in rows
    ]
    files.append(("ref", ("ref.wav", (train.parent / "ref.wav").read_bytes(), "audio/wav")))
    data = {
        "name": "roomy",
        "strategy": "speaker",
        "transcripts": json.dumps({r["audio"]: r["text"] for r in rows}),
        "max_steps": "1",
    }
    return files, data


def _assert_problem(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/problem+json")
    detail = response.json()["detail"]
    assert all(w in detail for w in words), detail


async def test_uploads_are_refused_507_before_a_byte_is_written(
    tmp_path, tiny_qwen3_base, voice_package
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = Settings(
        data_dir=str(data_dir),
        models={"tiny": ModelSpec(path=str(tiny_qwen3_base))},
        min_free_bytes=_above_free(data_dir),
    )
    files, fields = _clips(tmp_path)
    async with AsyncTestClient(create_app(settings), timeout=120) as client:
        archive = pack_directory(voice_package)
        answer = await client.post(
            "/voices/import",
            files={"package": ("p.tar.gz", archive, "application/octet-stream")},
            data={"name": "packed"},
        )
        _assert_problem(answer, 507, "free disk space", "min_free_bytes")
        answer = await client.post("/voices", files=files, data=fields)
        _assert_problem(answer, 507, "free disk space")
        assert (await client.get("/voices/packed")).status_code == 404
        assert (await client.get("/jobs")).json()["jobs"] == []  # no row, no reserved name
    assert _tree(data_dir / "voices") == []
    assert _tree(data_dir / "jobs") == []


async def test_an_upload_is_refused_when_the_disk_fills_while_it_streams(
    tmp_path, tiny_qwen3_base, monkeypatch
):
    data_dir = tmp_path / "data"
    settings = Settings(
        data_dir=str(data_dir),
        models={"tiny": ModelSpec(path=str(tiny_qwen3_base))},
        min_free_bytes=1 << 30,
    )
    probes: list[Path] = []

    def filling(path: Path) -> int:  # roomy for the check before the upload, then full
        probes.append(path)
        return TIB if len(probes) == 1 else 1 << 20

    async with AsyncTestClient(create_app(settings), timeout=120) as client:
        monkeypatch.setattr(fsutil, "free_bytes", filling)
        big = os.urandom(3 << 20)
        answer = await client.post(
            "/voices/import",
            files={"package": ("p.tar.gz", big, "application/octet-stream")},
            data={"name": "filling"},
        )
        _assert_problem(answer, 507, "free disk space")
        assert len(probes) >= 2  # refused by a check while streaming, not the first one
        answer = await client.post(
            "/voices", files=[("clips", ("a.wav", big, "audio/wav"))], data={"name": "x"}
        )
        _assert_problem(answer, 507, "free disk space")
        assert (await client.get("/jobs")).json()["jobs"] == []
    assert _tree(data_dir / "voices") == []
    assert _tree(data_dir / "jobs") == []


def test_unpacking_a_package_is_refused_below_the_floor(tmp_path, voice_package, monkeypatch):
    into = tmp_path / "into"
    into.mkdir()
    limits = ArchiveLimits(min_free_bytes=_above_free(tmp_path))
    with pytest.raises(InsufficientStorage, match="free disk space"):
        unpack(pack_directory(voice_package), into, limits)
    assert list(into.iterdir()) == []
    # While members stream out: the floor is reached after the first MiB written.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("voice.json")
        payload = b"{" + b" " * (3 << 20) + b"}"
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    calls = iter([TIB, 1 << 20, 1 << 20, 1 << 20])
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: next(calls))
    with pytest.raises(InsufficientStorage):
        unpack(buffer.getvalue(), into, ArchiveLimits(min_free_bytes=1 << 30))
    written = (into / "voice.json").stat().st_size
    assert written <= 2 << 20  # stopped at the first check, not after the whole member


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


def _toy_trainer(out: Path, config: TrainerConfig) -> Trainer:
    def loss(module: _Toy, batch: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
        return mx.mean(module.proj(batch) ** 2), {}

    def batches(epoch: int, index: int):
        while True:
            yield epoch, index, mx.ones((2, 8))
            index += 1

    def save(module: nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(folder / "adapters.safetensors"), {"x": mx.zeros(1)})

    return Trainer(
        _Toy(),
        loss,
        batches,
        1,
        save,
        config,
        out,
        progress=ProgressWriter(stream=io.StringIO()),
    )


def test_a_checkpoint_below_the_floor_fails_the_run_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    config = TrainerConfig(max_steps=3, save_every=1, min_free_bytes=_above_free(tmp_path))
    with pytest.raises(fsutil.DiskSpaceError, match="checkpoint-000001"):
        _toy_trainer(out, config).train()
    assert _tree(out) == []


async def test_a_job_whose_checkpoint_would_pass_the_floor_fails_with_the_reason(
    tmp_path, tiny_qwen3_base, monkeypatch
):
    """The server (this process) sees a roomy disk: the upload is taken and the job made. The
    trainer, a separate process, sees the real one, which is below the floor: the job fails at
    its first checkpoint with the reason, and no voice is registered."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = Settings(
        data_dir=str(data_dir),
        models={"tiny": ModelSpec(path=str(tiny_qwen3_base))},
        min_free_bytes=_above_free(data_dir),
    )
    files, fields = _clips(tmp_path)
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 2 * settings.min_free_bytes)
    async with AsyncTestClient(create_app(settings), timeout=120) as client:
        answer = await client.post("/voices", files=files, data=fields)
        assert answer.status_code == 202, answer.text[:300]
        job_id = answer.json()["id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = (await client.get(f"/jobs/{job_id}")).json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            await anyio.sleep(0.5)
        assert (await client.get("/voices/roomy")).status_code == 404
    assert job["state"] == "failed", job
    assert "free disk space" in job["reason"] and "checkpoint" in job["reason"], job["reason"]
    run_dir = data_dir / "jobs" / job_id / "run"
    assert not list(run_dir.glob("*checkpoint*")), _tree(run_dir)
    assert not (data_dir / "jobs" / job_id / "package").exists()
    assert _tree(data_dir / "voices") == []


def test_a_job_keeps_at_most_its_bounded_number_of_periodic_checkpoints(
    tmp_path, tiny_qwen3_base, speaker_dataset
):
    """The server's job config (server/job_config.py) through the family's real trainer: eight
    steps saved every two leave the newest JOB_KEEP_CHECKPOINTS periodic checkpoints."""
    raw = job_train_config(
        family="qwen3_tts",
        strategy="speaker",
        model_path=tiny_qwen3_base,
        train_jsonl=speaker_dataset,
        output_dir=tmp_path / "run",
        voice_name="rotated",
        hyper={"max_steps": 8, "save_every": 2, "batch_size": 2, "grad_accumulation": 1},
        clip_seconds=(0.5, 30.0),
    )
    raw["trainer"]["prefetch"] = 0
    config = msgspec.convert(raw, TrainConfig)
    stream = io.StringIO()
    run = prepare_run(config, progress=ProgressWriter(stream=stream))
    on_disk: list[int] = []
    save = run.trainer.save_checkpoint

    def counting(path: Path) -> Path:  # how many periodic ones exist at each save
        saved = save(path)
        on_disk.append(len(list((tmp_path / "run").glob("checkpoint-[0-9]*"))))
        return saved

    run.trainer.save_checkpoint = counting  # type: ignore[method-assign]
    assert run.trainer.train().status == "finished"
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    saved = [e["path"] for e in events if e.get("event") == "checkpoint"]
    assert sum("checkpoint-0" in p for p in saved) == 4  # steps 2, 4, 6, 8
    periodic = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-[0-9]*"))
    assert periodic == ["checkpoint-000006", "checkpoint-000008"][-JOB_KEEP_CHECKPOINTS:]
    # Rotation follows each save: never more than one over the bound, even for a moment.
    assert max(on_disk) <= JOB_KEEP_CHECKPOINTS + 1
