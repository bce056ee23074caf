"""ONE thread owns every MLX call. Requests are queued with a cancel event each, batched per
base model, and their audio handed back to the event loop as it is made.

The engine knows no model family: it drives any `SpeechModel` (server/engine/family.py)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from server.engine.bank import AdapterTensors, BankFull
from server.engine.family import SpeechModel, SpeechRow
from server.engine.requests import ContextClip, Done, Sampling, SpeakJob, Voicing


class QueueFull(RuntimeError):
    pass


class EngineStats:
    def __init__(self) -> None:
        self.batch_sizes: dict[int, int] = {}
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0

    def batch(self, size: int) -> None:
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1


class Engine:
    def __init__(
        self,
        *,
        max_queue: int,
        max_batch: int,
        batch_window_s: float = 0.01,
        codes_log: Path | None = None,
    ) -> None:
        self.max_queue = max_queue
        # Debugging aid (settings.codes_log): every finished segment's codec codes, as JSON lines.
        self.codes_log = codes_log
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.models: dict[str, SpeechModel] = {}
        self.stats = EngineStats()
        self._inbox: queue.Queue[SpeakJob | tuple[Callable[[], Any], Future]] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._current: list[SpeakJob] = []
        self._thread = threading.Thread(target=self._run, name="voicefoundry-mlx", daemon=True)

    # --- lifecycle (called from the event loop) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight (up to `timeout`), then fail whatever is still queued."""
        self._stop.set()
        self._inbox.put((lambda: None, Future()))
        self._thread.join(timeout)
        for job in self._current:
            job.cancel.set()
        self._thread.join(timeout)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, SpeakJob):
                self._finish(item, RuntimeError("server shutting down"))
            else:
                item[1].cancel()

    @property
    def queue_depth(self) -> int:
        return self._pending

    # --- control tasks run on the MLX thread between batches --------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    # --- speech ---------------------------------------------------------------------------
    def submit(self, job: SpeakJob) -> None:
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests queued")
            self._pending += 1
        self._inbox.put(job)

    def _run(self) -> None:
        deferred: deque[SpeakJob] = deque()
        while not self._stop.is_set():
            try:
                item = deferred.popleft() if deferred else self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, tuple):
                self._control(*item)
                continue
            batch = [item]
            # Wait a moment for companions: requests arriving together run as one batch.
            deadline = time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    more = (
                        self._inbox.get(timeout=remaining)
                        if remaining > 0
                        else self._inbox.get_nowait()
                    )
                except queue.Empty:
                    break
                if isinstance(more, tuple):
                    self._control(*more)
                elif more.voicing.model == item.voicing.model:
                    batch.append(more)
                else:
                    deferred.append(more)
            self._current = batch
            again = self._speak(batch)
            self._current = []
            deferred.extendleft(reversed(again))
        for job in list(deferred):
            self._finish(job, RuntimeError("server shutting down"))

    @staticmethod
    def _control(fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the awaiting coroutine
            future.set_exception(exc)

    def _speak(self, jobs: list[SpeakJob]) -> list[SpeakJob]:
        """Run one segment of every job together; return the jobs with segments left."""
        started = time.perf_counter()
        live: list[tuple[SpeakJob, SpeechRow]] = []
        model = self.models.get(jobs[0].voicing.model)
        for job in jobs:
            if job.cancel.is_set():
                self._finish(job, RuntimeError("cancelled"))
                continue
            if model is None:
                self._finish(job, KeyError(f"model {job.voicing.model!r} is not loaded"))
                continue
            try:
                live.append((job, self._row(model, job)))
            except Exception as exc:  # a bad voice fails its own request, never the worker
                self._finish(job, exc)
        if not live:
            return []
        self.stats.batch(len(live))
        try:
            model.run([row for _, row in live])
        except Exception as exc:
            for job, row in live:
                model.bank.release(row.slot)
                self._finish(job, exc)
            return []
        again = []
        for job, row in live:
            model.bank.release(row.slot)
            if job.cancel.is_set():
                self._finish(job, RuntimeError("cancelled"))
                continue
            try:
                self._deliver(model, job, row)
            except Exception as exc:
                self._finish(job, exc)
                continue
            job.next_segment += 1
            if job.next_segment < len(job.segments):
                again.append(job)
            else:
                self._finish(job, None)
        self.stats.busy_seconds += time.perf_counter() - started
        return again

    @staticmethod
    def _acquire_slot(model: SpeechModel, adapter: Path | None) -> int:
        if adapter is None:
            return 0
        slot = model.bank.slot_of(str(adapter)) or 0
        if not slot:
            slot = model.bank.ensure(
                AdapterTensors.read(adapter, model.adapter_module, model.adapter_riders)
            )
        model.bank.acquire(slot)
        return slot

    def _row(self, model: SpeechModel, job: SpeakJob) -> SpeechRow:
        slot = self._acquire_slot(model, job.voicing.adapter)
        try:
            row = model.make_row(job, slot=slot)
        except BaseException:
            model.bank.release(slot)
            raise
        if job.stream:
            job.sent = 0
            row.on_frames = self._streamer(model, job, row)
        return row

    @staticmethod
    def _streamer(model: SpeechModel, job: SpeakJob, row: SpeechRow) -> Callable:
        def on_frames(_: np.ndarray) -> None:
            made = len(row.frames)
            if made - job.sent >= job.chunk_frames:
                job.send(model.decode_chunk(row, job.sent, made))
                job.sent = made

        return on_frames

    def _deliver(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> None:
        if self.codes_log is not None:
            self._log_codes(model, job, row)
        job.frames_made += len(row.frames)
        job.audio_seconds += len(row.frames) / model.frame_rate
        if not row.frames:
            return
        if job.stream:
            if job.sent < len(row.frames):
                job.send(model.decode_chunk(row, job.sent, len(row.frames)))
            return
        job.send(model.decode_all(row))

    def _log_codes(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> None:
        record = {
            "model": model.name,
            "text": job.text,
            "cancelled": job.cancel.is_set(),
            "codes": [np.asarray(f).astype(int).tolist() for f in row.frames],
            **model.debug_record(row),
        }
        assert self.codes_log is not None
        with self.codes_log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _finish(self, job: SpeakJob, error: BaseException | None) -> None:
        with self._pending_lock:
            self._pending = max(self._pending - 1, 0)
        if error is not None:
            job.send(error)
        else:
            seconds = time.perf_counter() - job.started
            self.stats.audio_seconds += job.audio_seconds
            job.send(Done(frames=job.frames_made, seconds=seconds))


__all__ = [
    "BankFull",
    "ContextClip",
    "Done",
    "Engine",
    "QueueFull",
    "Sampling",
    "SpeakJob",
    "Voicing",
]
