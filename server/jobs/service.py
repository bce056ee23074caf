"""`JobService`: fine-tune jobs from upload to registered voice. It ties together the intake
(upload -> request), the spec (request -> trainer files), the runner (the trainer process) and
the events (what listeners see), and keeps each job's row in the registry.

States: queued -> preparing -> training -> baking -> succeeded | failed | cancelled, and
interrupted (the server stopped mid-job; it resumes from its checkpoint at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.families import get_family
from finetune.quality import preview_name

import anyio
import sqlalchemy as sa

from server.artifacts import Artifacts
from server.errors import Conflict, NotFound
from server.jobs.events import JobEvents, PublicEvent
from server.jobs.intake import Intake, JobRequest
from server.jobs.runner import stop_orphan
from server.jobs.spec import PREVIEWS, write_job_files
from server.jobs.training import ACTIVE, TERMINAL, Trainings
from server.registry import Job, JobNotFound, Registry, VoiceNotFound
from server.settings import Settings
from server.uploads import Upload
from server.voices import VoiceService

if TYPE_CHECKING:
    from server.jobs.queue import JobQueue

__all__ = ["ACTIVE", "TERMINAL", "JobService", "quality_meta"]

INCOMING_AGE_S = 6 * 3600.0  # replicas: an upload folder this old is a crash's leftover


class JobService:
    def __init__(self, registry: Registry, voices: VoiceService, settings: Settings) -> None:
        self.registry = registry
        self.voices = voices
        self.settings = settings
        self.root = Artifacts.of(settings).jobs  # job folders and uploads in flight
        self.root.mkdir(parents=True, exist_ok=True)
        self.events = JobEvents()
        self.intake = Intake(self._models_for, self._check_name_free, settings)
        self.trainings = Trainings(
            registry,
            self.root,
            self._publish,
            self._register,
            min_free_bytes=settings.min_free_bytes,
        )
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        # Held from the name check to the job's row: two uploads of one name cannot both pass.
        self._names = threading.Lock()
        # Replicas sharing the registry (server/replicas.py): this one's id. With the server as
        # job runner it runs and resumes only the jobs it accepted; the others' rows and uploads
        # in flight are left alone.
        self.replica: str | None = None
        # job_runner "workers": the task queue the jobs go to (workers train them; this server
        # registers the voices they make). None: this server trains its own jobs.
        self.queue: JobQueue | None = None
        # Where this process's job events also go (the replicas' notifications), besides its
        # own listeners.
        self.broadcast: Callable[[str, PublicEvent], None] | None = None

    @property
    def on_trained(self) -> Callable[[str, float], None] | None:
        return self.trainings.on_trained

    @on_trained.setter
    def on_trained(self, hook: Callable[[str, float], None] | None) -> None:
        self.trainings.on_trained = hook

    def _publish(self, job_id: str, event: PublicEvent) -> None:
        self.events.publish(job_id, event)
        if self.broadcast is not None:
            self.broadcast(job_id, event)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        # Uploads cut off by a crash (replicas: only old ones; young ones may be in flight).
        cutoff = time.time() - (INCOMING_AGE_S if self.replica is not None else 0.0)
        for stale in self.root.glob(".incoming-*"):
            with contextlib.suppress(OSError):
                if stale.stat().st_mtime <= cutoff:
                    shutil.rmtree(stale, ignore_errors=True)
        if self.queue is not None:  # the workers train (and resume); this server registers
            await anyio.to_thread.run_sync(self.sweep)
            await self.queue.start(self)
            return
        for job in self.registry.list_jobs():
            if self.replica is not None and job.payload.get("replica") != self.replica:
                continue  # another replica's job: its pid is not ours to stop
            if job.state in ACTIVE or job.state == "interrupted":
                await anyio.to_thread.run_sync(stop_orphan, job.payload.get("pid"))
                self.trainings.set(job.id, "queued", note="resumed after a server restart")
                self._queue.put_nowait(job.id)
        await anyio.to_thread.run_sync(self.sweep)
        self._workers = [
            asyncio.create_task(self._worker())
            for _ in range(max(1, self.settings.job_concurrency))
        ]

    def sweep(self) -> list[str]:
        """Remove the folders of failed and cancelled jobs older than the retention setting
        (uploads, checkpoints, logs: megabytes each); their rows stay, with a note."""
        hours = self.settings.failed_job_retention_hours
        if hours is None:
            return []
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
        removed = []
        for job in self.registry.list_jobs():
            folder = self.root / job.id
            if job.state not in ("failed", "cancelled") or not folder.exists():
                continue
            if dt.datetime.fromisoformat(job.updated_at) <= cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(job.id)
        return removed

    async def stop(self) -> None:
        if self.queue is not None:
            await self.queue.stop()
        await self.trainings.stop(self.settings.shutdown_grace_s)
        for task in self._workers:
            task.cancel()

    # --- creating -----------------------------------------------------------------------
    def validate(self, upload: Upload, folder: Path) -> JobRequest:
        """Every check before a job exists; raises a 4xx error with the reason."""
        return self.intake.read(upload, folder)

    def _models_for(self, strategy: str) -> dict[str, Any]:
        """The loaded models (of either engine) whose family trains `strategy`."""
        return {
            name: model
            for name, model in self.voices.served_models().items()
            if strategy in get_family(model.family).strategies
        }

    def _check_name_free(self, name: str) -> None:
        if self.registry.exists(name) or name in self.voices.builtin():
            raise Conflict(f"voice {name!r} already exists")
        pending = [
            j.id
            for j in self.registry.list_jobs()
            if j.name == name and (j.state in ACTIVE or j.state == "interrupted")
        ]
        if pending:
            raise Conflict(f"job {pending[0]} is already making voice {name!r}")

    def create(self, request: JobRequest, folder: Path) -> Job:
        """The job's row and folder; the name is reserved from here until the job ends."""
        shared = self.replica is not None  # PostgreSQL: one name at a time across replicas
        guard = self.registry.transaction() if shared else contextlib.nullcontext()
        with self._names, guard as conn:
            if conn is not None:
                key = f"voicefoundry-job-name:{request.name}"
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
            self._check_name_free(request.name)
            job = self._create(request, folder)
        # After the commit: the runner reads the row.
        if self.queue is not None:
            self.queue.submit(job.id)
        else:
            self._queue.put_nowait(job.id)
        return job

    def _create(self, request: JobRequest, folder: Path) -> Job:
        job_id = uuid.uuid4().hex[:12]
        job_dir = self.root / job_id
        folder.rename(job_dir)
        request = request.rebased(folder, job_dir)
        model = self._models_for(request.strategy)[request.base_model]
        write_job_files(request, job_dir, model.loaded.path)
        ref_clip = request.refs[0] if request.refs else request.clips[0].audio
        payload = {
            "base_model": request.base_model,
            "strategy": request.strategy,
            "clips": len(request.clips),
            "step": 0,
            "total_steps": None,
            "losses": {},
            "eta_s": None,
            "log_tail": [],
            "reason": None,
            "pid": None,
            "hyper": request.hyper,
            "ref_clip": str(ref_clip),
            "quality": [],
            "replica": self.replica,
        }
        return self.registry.put_job(job_id, request.name, "queued", payload)

    # --- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        try:
            return self.registry.get_job(job_id)
        except JobNotFound as exc:
            raise NotFound(str(exc)) from exc

    def preview(self, job_id: str, step: int) -> Path:
        """The preview WAV of `step`'s quality report (404 for an unknown job or step)."""
        job = self.get(job_id)
        reported = any(
            q.get("step") == step and q.get("preview") for q in job.payload.get("quality", [])
        )
        path = self.root / job.id / PREVIEWS / preview_name(step)
        if not reported or not path.is_file():
            raise NotFound(f"job {job_id} has no preview for step {step}")
        return path

    def subscribe(self, job_id: str) -> asyncio.Queue[PublicEvent]:
        return self.events.subscribe(job_id)

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[PublicEvent]) -> None:
        self.events.unsubscribe(job_id, queue)

    # --- cancelling ---------------------------------------------------------------------
    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in TERMINAL:
            raise Conflict(f"job {job_id} already {job.state}")
        if self.queue is not None:
            return await self.queue.cancel(job)
        self.trainings.cancelled.add(job_id)
        if self.trainings.terminate(job_id):
            return self.get(job_id)
        return self.trainings.set(job_id, "cancelled", note="cancelled before it started")

    # --- running ------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id in self.trainings.cancelled or self.get(job_id).state in TERMINAL:
                continue
            try:
                await self.trainings.run(job_id)
            except Exception as exc:  # a job failure never stops the worker
                self.trainings.set(job_id, "failed", reason=f"{type(exc).__name__}: {exc}")
            await anyio.to_thread.run_sync(self.sweep)

    async def register_trained(self, job_id: str) -> None:
        """A worker's finished job (job_runner "workers"): its package becomes a voice here."""
        job = await anyio.to_thread.run_sync(self.get, job_id)
        if job.state in TERMINAL:
            return
        package = job.payload.get("package")
        if not package:
            self.trainings.set(job_id, "failed", reason="the worker reported no voice package")
            return
        await self._register(job_id, Path(package), list(job.payload.get("log_tail") or []))

    async def _register(self, job_id: str, package: Path, tail: list[str]) -> None:
        """The trained voice's package becomes a served voice (or the job fails saying why)."""
        job = self.get(job_id)
        payload = job.payload
        ref = Path(payload["ref_clip"]).read_bytes() if payload.get("ref_clip") else None
        try:
            voice = await self.voices.import_directory(
                package, name=job.name, base_model=payload["base_model"], ref_clip=ref
            )
        except Exception as exc:
            self.trainings.set(
                job_id,
                "failed",
                reason=f"the trained voice did not load: {exc}",
                log_tail=tail,
            )
            return
        quality = quality_meta(payload.get("quality", []))
        if quality:
            async with self.registry.alock(voice.name):
                with contextlib.suppress(VoiceNotFound):  # deleted already: nothing to note
                    current = self.registry.get(voice.name)
                    meta = {**current.meta, **quality}
                    self.registry.replace(dataclasses.replace(current, meta=meta))
        self.trainings.set(job_id, "succeeded", voice=voice.name, log_tail=tail)
        shutil.rmtree(self.root / job_id / "run", ignore_errors=True)  # previews/ stays


def quality_meta(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """What the registered voice's meta says of its quality: the similarity of its final
    checkpoint (the last report; the package is made from it) and of the untrained baseline."""
    if not curve:
        return {}
    final = max(curve, key=lambda q: q["step"])
    meta: dict[str, Any] = {"similarity": final["similarity"], "similarity_step": final["step"]}
    baseline = next((q for q in curve if q["step"] == 0), None)
    if baseline is not None:
        meta["similarity_baseline"] = baseline["similarity"]
    if final["similarity"] is None and final.get("reason"):
        meta["similarity_reason"] = final["reason"]
    return meta
