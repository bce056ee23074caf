"""Waiting for a fine-tune job: the decisions (`JobWatcher`) and the progress line (stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from voicefoundry_client.errors import JobFailed, WaitTimeout
from voicefoundry_client.models import Job, JobEvent, ProgressEvent, StateEvent

ProgressOption = bool | Callable[[JobEvent], None]
BAR_WIDTH = 24


class ProgressDisplay:
    """A redrawn bar on a terminal; on a pipe or file, one plain line per state or 10% step."""

    def __init__(self, job_id: str, stream: TextIO | None = None) -> None:
        self.job_id = job_id
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.state: str | None = None
        self.step = 0
        self.total: int | None = None
        self.loss: float | None = None
        self.eta: float | None = None
        self._last_plain = ""
        self._last_decile = -1
        self._width = 0

    def update(self, event: JobEvent) -> None:
        if isinstance(event, StateEvent):
            changed = event.state != self.state
            self.state = event.state
            self._absorb(event.step, event.total_steps, event.losses, event.eta_s)
        elif isinstance(event, ProgressEvent):
            changed = self.state != "training"
            self.state = "training"  # a trainer step: whatever state event may still be queued
            self._absorb(event.step, event.total_steps, event.losses, event.eta_s)
        else:
            return
        if self.tty:
            self._draw(self._line())
        else:
            decile = self.step * 10 // self.total if self.total else -1
            if changed or decile > self._last_decile:
                self._last_decile = max(decile, self._last_decile)
                self._plain(self._line())

    def finish(self, job: Job) -> None:
        if job.state == "succeeded":
            line = f"job {job.id} succeeded: voice {job.voice or job.name!r} is ready"
        else:
            line = f"job {job.id} {job.state}: {job.reason or job.note or 'no reason given'}"
        if self.tty:
            self._draw(self._line())
            self.stream.write("\n" + line + "\n")
            self._width = 0
        else:
            self._plain(line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _absorb(
        self,
        step: int | None,
        total: int | None,
        losses: dict[str, float] | None,
        eta: float | None,
    ) -> None:
        self.step = step if step is not None else self.step
        self.total = total if total is not None else self.total
        if losses:
            self.loss = losses.get("loss", next(iter(losses.values())))
        self.eta = eta if eta is not None else self.eta

    def _line(self) -> str:
        parts = [f"job {self.job_id} {self.state}"]
        if self.total:
            done = min(self.step, self.total) / self.total
            filled = round(done * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            parts.append(f"[{bar}] {self.step}/{self.total} {done:4.0%}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eta is not None and self.state == "training":
            parts.append(f"eta {self.eta:.0f}s")
        return " ".join(parts)

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))

    def _plain(self, line: str) -> None:
        if line != self._last_plain:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_plain = line


class JobWatcher:
    """Everything `jobs.wait` decides, shared by the sync and async clients."""

    def __init__(
        self,
        job_id: str,
        progress: ProgressOption,
        timeout: float | None,
        stream: TextIO | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (or None to wait for ever)")
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.callback = progress if callable(progress) else None
        self.display = ProgressDisplay(job_id, stream) if progress is True else None
        self._reconnects = 0

    def read_timeout(self) -> float | None:
        """How long one read of the event stream may block (the time left, if any)."""
        if self.deadline is None:
            return None
        return max(0.05, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def feed(self, event: JobEvent) -> bool:
        """Show the event; True once the stream says the job reached a final state."""
        if self.callback is not None:
            self.callback(event)
        if self.display is not None:
            self.display.update(event)
        return (isinstance(event, StateEvent) and event.terminal) or self.expired()

    def settle(self, job: Job) -> Job | None:
        """The final job, JobFailed, WaitTimeout, or None to go on waiting."""
        if job.state == "succeeded" or job.state in ("failed", "cancelled"):
            if self.display is not None:
                self.display.finish(job)
            if job.state != "succeeded":
                raise JobFailed(job)
            return job
        if self.expired():
            raise WaitTimeout(job, self.timeout or 0.0)
        return None

    def reconnect_delay(self) -> float:
        """Pause before subscribing again after the event stream ended early."""
        self._reconnects += 1
        delay = min(2.0, 0.2 * 2.0 ** min(self._reconnects, 4))
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        return delay

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
