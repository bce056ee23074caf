"""The training workers' task queue (`job_runner: workers`): procrastinate on the registry's
PostgreSQL database (its tables come with registry revision 0003).

Two tasks, both locked per job (procrastinate runs tasks of one lock one at a time):
- `train(job_id)` on queue "training": a `voicefoundry worker` (server/worker.py) runs the job's
  trainer as the server would, following it in the job's registry row.
- `register(job_id)` on queue "register": a serving replica (it has the base model loaded)
  turns the package a worker made into a voice, as a server running its own job does.

A worker that stops answering (killed, its host gone) is found by its procrastinate heartbeat
going stale (`worker_stalled_s`); a live worker then puts its tasks back (`sweep_stalled`) and
the job resumes from its last checkpoint. The trainer's own lock (finetune/job_guard.py) keeps
a job to one trainer process even if the dead worker's trainer is still stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import procrastinate
from procrastinate.exceptions import ProcrastinateException

from server.errors import Conflict
from server.registry import Job
from server.replicas import libpq_url
from server.settings import Settings

if TYPE_CHECKING:
    from server.jobs.service import JobService

log = logging.getLogger("voicefoundry.jobs")

NAMESPACE = "voicefoundry"
TRAINING = "training"
REGISTER = "register"
TRAIN_TASK = f"{NAMESPACE}:train"
REGISTER_TASK = f"{NAMESPACE}:register"

tasks = procrastinate.Blueprint()


@tasks.task(name="train", queue=TRAINING, pass_context=True)
async def train(context: procrastinate.JobContext, job_id: str) -> None:
    await context.additional_context["worker"].train(job_id, context)


@tasks.task(name="register", queue=REGISTER, pass_context=True)
async def register(context: procrastinate.JobContext, job_id: str) -> None:
    await context.additional_context["jobs"].register_trained(job_id)


def task_app(database_url: str) -> procrastinate.App:
    """The procrastinate app over `database_url` (a SQLAlchemy PostgreSQL URL); not opened."""
    connector = procrastinate.PsycopgConnector(conninfo=libpq_url(database_url))
    app = procrastinate.App(connector=connector)
    app.add_tasks_from(tasks, namespace=NAMESPACE)
    return app


def job_lock(job_id: str) -> str:
    return f"voicefoundry-job:{job_id}"


async def defer(app: procrastinate.App, task: str, job_id: str) -> int:
    """Queue `task` for job `job_id`; the task queue's id of it."""
    return await app.tasks[task].configure(lock=job_lock(job_id)).defer_async(job_id=job_id)


def worker_options(settings: Settings, name: str) -> dict[str, Any]:
    """The procrastinate worker options both kinds of process use."""
    return {
        "name": name,
        "install_signal_handlers": False,  # each process stops its trainers first
        "update_heartbeat_interval": settings.worker_heartbeat_s,
        "stalled_worker_timeout": settings.worker_stalled_s,
        "fetch_job_polling_interval": min(5.0, settings.worker_heartbeat_s),
        "abort_job_polling_interval": min(5.0, settings.worker_heartbeat_s),
    }


async def sweep_stalled(app: procrastinate.App, stalled_s: float) -> list[Any]:
    """Put back the tasks of workers silent for `stalled_s`; those put back."""
    retried = []
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_s):
        try:
            await app.job_manager.retry_job(job)
        except ProcrastinateException:  # another process put it back first
            continue
        retried.append(job)
    return retried


class JobQueue:
    """A serving replica's side of the queue: it submits and cancels training tasks, and runs
    the register tasks (concurrency 1) in its own event loop."""

    def __init__(self, settings: Settings, name: str) -> None:
        assert settings.database_url is not None  # checked by Settings
        self.settings = settings
        self.name = name
        self.app = task_app(settings.database_url)
        self._service: JobService | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self, service: JobService) -> None:
        self._service = service
        await self.app.open_async()
        self._worker = asyncio.create_task(
            self.app.run_worker_async(
                queues=[REGISTER],
                concurrency=1,
                additional_context={"jobs": service},
                **worker_options(self.settings, f"register@{self.name}"),
            )
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()  # procrastinate stops gracefully: a running task finishes
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.app.close_async()

    def submit(self, job_id: str) -> None:
        """Queue job `job_id`'s training (called from a worker thread of the event loop); a
        queue that refuses it fails the job, saying so."""
        service = self._service
        assert service is not None
        try:
            task_id = anyio.from_thread.run(defer, self.app, TRAIN_TASK, job_id)
        except Exception as exc:
            service.trainings.set(job_id, "failed", reason=f"the task queue refused it: {exc}")
            raise
        service.trainings.set(job_id, None, task_id=task_id)

    async def cancel(self, job: Job) -> Job:
        """Cancel a queued job at once; ask the worker training one to stop it (the job is
        `cancelled` when its trainer has stopped)."""
        service = self._service
        assert service is not None
        task_id = job.payload.get("task_id")
        manager = self.app.job_manager
        if task_id is not None and await manager.cancel_job_by_id_async(task_id):
            return service.trainings.set(job.id, "cancelled", note="cancelled before it started")
        if task_id is not None and await manager.cancel_job_by_id_async(task_id, abort=True):
            return service.trainings.set(job.id, None, note="cancelling: the worker stops it")
        raise Conflict(f"job {job.id} is not running in any worker; it cannot be cancelled now")
