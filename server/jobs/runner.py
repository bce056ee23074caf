"""The trainer process of one job: `python -m finetune run-job --spec <job>/spec.json`, started in
its own session, its stdout decoded line by line against the progress union
(`finetune.progress`), its stderr kept; both go to `<job>/job.log` and a short tail.

A line that is not a progress event (a library's print, a truncated or unknown event) is logged
and counted and never stops the supervision of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from finetune.progress import Failed, Package, ProgressEvent, Stopped, decode_event

import msgspec

from server.jobs.spec import SPEC_FILE

log = logging.getLogger("voicefoundry")

LOG_TAIL = 40
MAX_LINE_BYTES = 1 << 20  # a longer line is cut (and counted as malformed), never buffered whole
LOGGED_BAD_LINES = 5  # per job: the rest are only counted
JOB_LOG = "job.log"


class Outcome(msgspec.Struct, kw_only=True):
    """How a trainer process ended, as its own lines told it."""

    code: int
    package: str | None = None  # the voice package it wrote
    stopped: bool = False  # it checkpointed and stopped on SIGTERM
    failure: str | None = None  # its own one-line reason
    tail: list[str] = msgspec.field(default_factory=list)
    rejected_lines: int = 0  # stdout lines that were not progress events

    def reason(self) -> str:
        """Why a failed run failed, for a person."""
        if self.failure:
            return self.failure
        error = next((line for line in reversed(self.tail) if line.startswith("error:")), None)
        if error:
            return error
        if self.code < 0:
            return f"training process killed by signal {signal.Signals(-self.code).name}"
        return f"training process exited with code {self.code}"


class TrainerRun:
    """One run of a job's trainer: `start`, then `supervise` until it exits."""

    def __init__(
        self,
        job_id: str,
        job_dir: Path,
        on_event: Callable[[ProgressEvent], None],
        command: tuple[str, ...] | None = None,
        min_free_bytes: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.job_id = job_id
        self.job_dir = job_dir
        self.on_event = on_event
        self.command = command or (
            sys.executable,
            "-m",
            "finetune",
            "run-job",
            "--spec",
            str(job_dir / SPEC_FILE),
            # The server's disk floor now (not when the job was made): checkpoints below it fail.
            "--min-free-bytes",
            str(min_free_bytes),
            *extra_args,  # e.g. --hosts / --ranks: the job on several hosts
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.rejected = 0
        self._package: str | None = None
        self._stopped = False
        self._failure: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> int:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=MAX_LINE_BYTES,
        )
        return self.proc.pid

    async def supervise(self) -> Outcome:
        """Follow the process to its end; every progress event goes to `on_event`."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        with (self.job_dir / JOB_LOG).open("a") as job_log:
            await asyncio.gather(
                self._follow(proc.stdout, job_log), self._drain(proc.stderr, job_log)
            )
        code = await proc.wait()
        if self.rejected:
            log.warning(
                "job %s: %d trainer output line(s) were not progress events",
                self.job_id,
                self.rejected,
            )
        return Outcome(
            code=code,
            package=self._package,
            stopped=self._stopped,
            failure=self._failure,
            tail=list(self.tail),
            rejected_lines=self.rejected,
        )

    def terminate(self) -> None:
        """Ask the trainer to checkpoint and exit (SIGTERM)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    async def wait_or_kill(self, grace_s: float) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), grace_s)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def _follow(self, stream: asyncio.StreamReader, job_log: IO[str]) -> None:
        async for raw in _lines(stream):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            job_log.write(line + "\n")
            try:
                event = decode_event(raw)
            except msgspec.DecodeError as exc:
                self._reject(line, exc)
                continue
            if isinstance(event, Package):
                self._package = event.path
            elif isinstance(event, Stopped):
                self._stopped = True
            elif isinstance(event, Failed):
                self._failure = event.reason
            try:
                self.on_event(event)
            except Exception:  # a listener's bug must not stop the supervision
                log.exception("job %s: handling a %s event failed", self.job_id, type(event))

    def _reject(self, line: str, exc: msgspec.DecodeError) -> None:
        self.tail.append(line)
        self.rejected += 1
        if self.rejected <= LOGGED_BAD_LINES and line.lstrip().startswith("{"):
            log.warning("job %s: not a progress event (%s): %.200s", self.job_id, exc, line)

    async def _drain(self, stream: asyncio.StreamReader, job_log: IO[str]) -> None:
        async for raw in _lines(stream):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            job_log.write(line + "\n")
            self.tail.append(line)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines; one longer than the stream's limit comes back cut to the limit."""
    while True:
        try:
            yield await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                yield exc.partial
            return
        except asyncio.LimitOverrunError as exc:
            head = await stream.readexactly(exc.consumed)
            while True:  # drop the rest of the line
                try:
                    await stream.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await stream.readexactly(more.consumed)
                except asyncio.IncompleteReadError:
                    break
            yield head


def stop_orphan(pid: int | None) -> None:
    """A training process left behind by a server that died: stop it before resuming."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"run-job" not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
