"""Failed and cancelled jobs do not keep their folders forever: `failed_job_retention_hours`
after they ended, the job service removes them (uploads, checkpoints, logs); rows stay."""

from __future__ import annotations

from pathlib import Path

from server.jobs import JobService
from server.registry import Registry
from server.settings import Settings


def _service(data: Path, hours: float | None) -> tuple[JobService, Registry]:
    registry = Registry(data / "registry.sqlite3")
    settings = Settings(data_dir=str(data), failed_job_retention_hours=hours)
    return JobService(registry, voices=None, settings=settings), registry  # type: ignore[arg-type]


def _job(service: JobService, registry: Registry, job_id: str, state: str) -> Path:
    registry.put_job(job_id, f"voice-{job_id}", state, {})
    folder = service.root / job_id
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "clip_000.wav").write_bytes(b"x" * 1000)
    return folder


def test_ended_jobs_lose_their_folders_after_the_retention_and_keep_their_rows(tmp_path):
    service, registry = _service(tmp_path / "data", hours=0)
    failed = _job(service, registry, "f1", "failed")
    cancelled = _job(service, registry, "c1", "cancelled")
    running = _job(service, registry, "t1", "training")
    succeeded = _job(service, registry, "s1", "succeeded")
    assert sorted(service.sweep()) == ["c1", "f1"]
    assert not failed.exists() and not cancelled.exists()
    assert running.exists() and succeeded.exists()
    assert registry.get_job("f1").state == "failed"
    registry.close()


def test_within_the_retention_or_without_one_folders_stay(tmp_path):
    for hours in (1.0, None):
        service, registry = _service(tmp_path / f"data-{hours}", hours=hours)
        failed = _job(service, registry, "f1", "failed")
        assert service.sweep() == [] and failed.exists()
        registry.close()
