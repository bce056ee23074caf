"""`voicefoundry worker`: trains the fine-tune jobs that serving replicas queue
(`job_runner: workers`), on this host or another that mounts the shared artifacts dir.

It claims `train` tasks from the PostgreSQL task queue (server/jobs/queue.py) and runs each job
exactly as a server running its own jobs does (`Trainings`: a separate trainer process that
resumes from the job's newest checkpoint, its progress in the job's registry row, its events to
every replica through PostgreSQL notifications). A finished package goes back to the replicas
as a `register` task: they have the base model loaded to install the voice.

Stopping (SIGTERM / SIGINT): every trainer checkpoints and stops, its job is queued again (any
worker resumes it), then the worker leaves the queue. Killed outright, its heartbeat goes stale
and another worker queues its jobs again after `worker_stalled_s` (`sweep_stalled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from finetune.families import get_family

import anyio
import procrastinate

from server.artifacts import Artifacts
from server.jobs.broadcast import JobBroadcast
from server.jobs.queue import (
    REGISTER_TASK,
    TRAIN_TASK,
    TRAINING,
    defer,
    sweep_stalled,
    task_app,
    worker_options,
)
from server.jobs.spec import SPEC_FILE
from server.jobs.training import TERMINAL, Trainings
from server.registry import Registry
from server.settings import Settings

log = logging.getLogger("voicefoundry.worker")

INTERRUPTED = "its worker stopped; the job resumes from its checkpoint on a worker"


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        assert settings.database_url is not None  # job_runner "workers" is checked by Settings
        self.settings = settings
        self.name = name or f"{os.uname().nodename}-{os.getpid()}"
        artifacts = Artifacts.of(settings).ensure()
        self.registry = Registry(
            settings.data_path / "registry.sqlite3",
            database_url=settings.database_url,
            artifacts_dir=artifacts.root,
        )
        self.broadcast = JobBroadcast(self.registry, origin=self.name)
        self.trainings = Trainings(
            self.registry,
            artifacts.jobs,
            self.broadcast,
            self._hand_over,
            min_free_bytes=settings.min_free_bytes,
            interrupted_note=INTERRUPTED,
        )
        self.trainings.trainer_args = self._spread
        self.app = task_app(settings.database_url)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Claim and train jobs until asked to stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        async with self.app.open_async():
            claiming = asyncio.create_task(
                self.app.run_worker_async(
                    queues=[TRAINING],
                    concurrency=self.settings.worker_concurrency,
                    additional_context={"worker": self},
                    **worker_options(self.settings, self.name),
                )
            )
            sweeping = asyncio.create_task(self._sweep())
            log.info("worker %s: claiming fine-tune jobs", self.name)
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({claiming, stopped}, return_when=asyncio.FIRST_COMPLETED)
            sweeping.cancel()
            # Trainers first (they checkpoint; their jobs are queued again), then the queue.
            await self.trainings.stop(self.settings.shutdown_grace_s)
            claiming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claiming
        self.registry.close()
        log.info("worker %s: stopped", self.name)

    async def train(self, job_id: str, context: procrastinate.JobContext) -> None:
        """The `train` task: run job `job_id`'s trainer to its end."""
        job = await anyio.to_thread.run_sync(self.registry.get_job, job_id)
        if job.state in TERMINAL:
            return
        attempt = (context.job.attempts or 0) + 1
        self.trainings.set(job_id, None, worker=self.name, attempt=attempt)
        running = asyncio.ensure_future(self.trainings.run(job_id))
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            # procrastinate aborts the task: DELETE /jobs/{id} on a replica.
            self.trainings.cancelled.add(job_id)
            self.trainings.terminate(job_id)
            await running
            raise
        except Exception as exc:
            self.trainings.set(job_id, "failed", reason=f"{type(exc).__name__}: {exc}")
            return
        if self.registry.get_job(job_id).state == "interrupted":  # this worker is stopping
            task_id = await defer(self.app, TRAIN_TASK, job_id)
            self.trainings.set(job_id, "queued", task_id=task_id)

    def _spread(self, job_id: str) -> tuple[str, ...]:
        """`run-job` arguments that put job `job_id` on `worker_hosts` (families that train
        data-parallel only; the others train in this one process)."""
        hosts, ranks = self.settings.worker_hosts, self.settings.worker_ranks_per_host
        if max(len(hosts), 1) * ranks <= 1:
            return ()
        spec = json.loads((self.trainings.root / job_id / SPEC_FILE).read_text())
        if not get_family(spec["config"]["model"]["family"]).data_parallel:
            return ()
        return ("--hosts", ",".join(hosts or ["127.0.0.1"]), "--ranks", str(ranks))

    async def _hand_over(self, job_id: str, package: Path, tail: list[str]) -> None:
        """A finished package: a replica installs it as the voice (the `register` task)."""
        self.trainings.set(job_id, "baking", package=str(package), log_tail=tail)
        task_id = await defer(self.app, REGISTER_TASK, job_id)
        self.trainings.set(job_id, None, task_id=task_id, note="registering the voice")

    async def _sweep(self) -> None:
        """Queue again the tasks of workers that stopped answering (killed, host gone)."""
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_s)
            try:
                for task in await sweep_stalled(self.app, self.settings.worker_stalled_s):
                    job_id = task.task_kwargs.get("job_id")
                    log.warning(
                        "worker %s: %s of job %s queued again", self.name, task.task_name, job_id
                    )
                    if task.task_name == TRAIN_TASK and job_id:
                        note = "its worker stopped answering; it resumes from its checkpoint"
                        self.trainings.set(job_id, "queued", note=note)
            except Exception:  # the database away a moment: the next round tries again
                log.exception("worker %s: the stalled-task sweep failed", self.name)


def run_worker(settings: Settings, name: str | None = None) -> int:
    asyncio.run(Worker(settings, name).run())
    return 0
