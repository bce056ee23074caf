"""`Trainings`: the runs of fine-tune jobs in this process, each a trainer process
(`runner.TrainerRun`) whose progress the job's registry row follows and whose events go to
`publish`. Both job runners use it: a server running its own jobs (`service.JobService`) and a
`voicefoundry worker` (`server.worker`); what happens to a finished package is theirs
(`on_package`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from finetune.progress import Phase, ProgressEvent, Quality, Step

from server.jobs.events import PublicEvent, preview_url, public_progress, public_state
from server.jobs.runner import Outcome, TrainerRun
from server.registry import Job, Registry

ACTIVE = ("queued", "preparing", "training", "baking")
TERMINAL = ("succeeded", "failed", "cancelled")

# The job state each trainer phase means.
PHASE_STATES: dict[str, str] = {
    "validate": "preparing",
    "preprocess": "preparing",
    "training": "training",
    "baking": "baking",
}

Publish = Callable[[str, PublicEvent], None]
OnPackage = Callable[[str, Path, list[str]], Awaitable[None]]


class Trainings:
    def __init__(
        self,
        registry: Registry,
        root: Path,
        publish: Publish,
        on_package: OnPackage,
        *,
        min_free_bytes: int = 0,
        interrupted_note: str = "the server stopped; the job resumes from its checkpoint",
    ) -> None:
        self.registry = registry
        self.root = root
        self.publish = publish
        self.on_package = on_package
        self.min_free_bytes = min_free_bytes
        self.interrupted_note = interrupted_note
        self.runs: dict[str, TrainerRun] = {}
        self.cancelled: set[str] = set()
        self.stopping = False
        # Told each trainer process's wall time when it exits (per-key usage: server/usage.py).
        self.on_trained: Callable[[str, float], None] | None = None
        # More `run-job` arguments for a job (a worker spreading jobs over hosts).
        self.trainer_args: Callable[[str], tuple[str, ...]] = lambda job_id: ()

    async def run(self, job_id: str) -> None:
        """Train job `job_id` to its end (a trainer that resumes from the newest checkpoint)."""
        self.set(job_id, "preparing")
        run = TrainerRun(
            job_id,
            self.root / job_id,
            lambda event: self.on_event(job_id, event),
            min_free_bytes=self.min_free_bytes,
            extra_args=self.trainer_args(job_id),
        )
        pid = await run.start()
        started = time.monotonic()
        self.runs[job_id] = run
        try:
            self.set(job_id, None, pid=pid)
            outcome = await run.supervise()
        finally:
            self.runs.pop(job_id, None)
            if self.on_trained is not None:
                self.on_trained(job_id, time.monotonic() - started)
        await self.finish(job_id, outcome)

    async def finish(self, job_id: str, outcome: Outcome) -> None:
        tail = outcome.tail
        if job_id in self.cancelled:
            self.set(job_id, "cancelled", log_tail=tail)
        elif outcome.code == 0 and outcome.package is not None:
            await self.on_package(job_id, Path(outcome.package), tail)
        elif outcome.code == 0 and outcome.stopped and self.stopping:
            self.set(job_id, "interrupted", log_tail=tail, note=self.interrupted_note)
        else:
            self.set(job_id, "failed", reason=outcome.reason(), log_tail=tail)

    def terminate(self, job_id: str) -> bool:
        """Ask job `job_id`'s trainer, if it runs here, to checkpoint and stop."""
        run = self.runs.get(job_id)
        if run is None:
            return False
        run.terminate()
        return True

    async def stop(self, grace_s: float) -> None:
        """Every trainer here checkpoints and stops (killed after `grace_s`)."""
        self.stopping = True
        runs = list(self.runs.values())
        for run in runs:
            run.terminate()
        for run in runs:
            await run.wait_or_kill(grace_s)

    def on_event(self, job_id: str, event: ProgressEvent) -> None:
        """A trainer's progress event: the job's row follows it, listeners see it."""
        if isinstance(event, Phase):
            self.set(job_id, PHASE_STATES.get(event.phase))
        elif isinstance(event, Step):
            self.set(
                job_id,
                "training",
                step=event.step,
                total_steps=event.total_steps,
                losses=event.losses(),
                eta_s=event.eta_s,
            )
        elif isinstance(event, Quality):
            self._record_quality(job_id, event)
        self.publish(job_id, public_progress(job_id, event))

    def _record_quality(self, job_id: str, event: Quality) -> None:
        """One point of the similarity curve (a report for a step already seen replaces it)."""
        step = event.step
        point: dict[str, Any] = {
            "step": step,
            "similarity": event.similarity,
            "preview": preview_url(job_id, step) if event.preview else None,
        }
        if event.reason:
            point["reason"] = event.reason
        job = self.registry.get_job(job_id)
        curve = [q for q in job.payload.get("quality", []) if q["step"] != step]
        self.set(job_id, None, quality=sorted([*curve, point], key=lambda q: q["step"]))

    def set(self, job_id: str, state: str | None, **fields: Any) -> Job:
        """Update the job's row (`state` None: unchanged) and tell its listeners."""
        job = self.registry.get_job(job_id)
        payload = {**job.payload, **fields}
        updated = self.registry.update_job(job_id, state=state or job.state, payload=payload)
        if (state is not None and state != job.state) or fields:
            self.publish(job_id, public_state(updated.state, fields))
        return updated
