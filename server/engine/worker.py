"""ONE thread owns every MLX call. Requests are queued with a cancel event each, batched per
base model, and their audio handed back to the event loop as it is made.

Scheduling (`scheduler`, default "continuous"): iteration-level. Each base model keeps one running
batch (`SpeechModel.open_batch`); a request's segment
joins it at the next decode step and leaves when it ends, so nobody waits for a whole batch.
Every turn of the loop, for each model with work in turn: the waiting segments of that model are
admitted (each prefilled alone, up to `max_batch` running rows; queue order), then the running rows
take ONE decode step. So a newcomer waits at most one decode step of the running rows (plus its
own prefill), and running rows wait at most one prefill between two of their steps: neither
starves. A job with more segments goes to the back of the queue when one ends. Adapters are
installed into the bank at admission, between steps.

Audio, streaming-first: after each step, every row with `chunk_frames` new frames (and every
row that just ended) has them decoded in one `decode_frames` call, continuing each row's own
audio stream; streamed jobs send the chunk, the others keep it and send the segment's chunks
joined when it ends (the same audio either way). A streamed job's first chunk is decoded alone
first, so of a burst of streams the first gets its audio after one row's vocoder pass, not all
rows'. A chunk that fails to decode is retried row by row; a row that fails alone stops only its
own request.

"rounds" (kept to measure against): fairness at segment granularity: the engine works in
rounds, each running ONE segment of up to `max_batch` jobs of one base model. Runnable jobs wait
in one queue ordered by when they last ran; a round takes the job at its head and the next jobs
of the same model in queue order. A new request joins the queue at the next round boundary,
ahead of the jobs that just ran, which go to the back. So no job waits more than about (jobs
ahead of it / max_batch) + 1 rounds for its next segment, whatever their length or model: a
long request never holds the engine for more than one segment at a time, and other models'
jobs alternate with the running model's.

Budgets: a request making more than `max_audio_s` of audio, or still unfinished `max_wall_s`
after it was queued, is stopped (checked at every frame and every round) and ends with
`BudgetExceeded`.

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
from typing import Any, Literal

import numpy as np

from server.engine.bank import AdapterTensors, BankFull
from server.engine.family import DecodeBatch, SpeechModel, SpeechRow
from server.engine.requests import ContextClip, Done, Sampling, SpeakJob, Voicing


class QueueFull(RuntimeError):
    pass


Budget = Literal["audio", "time"]
Scheduler = Literal["continuous", "rounds"]


class BudgetExceeded(RuntimeError):
    """A request went over its audio or wall-time budget and was stopped."""

    def __init__(self, budget: Budget, detail: str) -> None:
        super().__init__(detail)
        self.budget = budget


class EngineStats:
    def __init__(self) -> None:
        self.batch_sizes: dict[int, int] = {}
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0
        # Batches started (continuous: turns of the loop that started segments, each a prefill
        # joining a running batch); a job's wait is counted in these.
        self.rounds = 0
        self.budget_exceeded: dict[str, int] = {}
        # Continuous scheduling: running rows at each decode step, by count.
        self.step_rows: dict[int, int] = {}
        # Seconds from a request's arrival to its first admission, and to its first audio.
        self.queue_wait_s: deque[float] = deque(maxlen=1024)
        self.first_audio_s: deque[float] = deque(maxlen=1024)
        # Per family: audio made and the wall time of the requests that made it (RTF).
        self.family_audio_s: dict[str, float] = {}
        self.family_wall_s: dict[str, float] = {}

    def batch(self, size: int) -> None:
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def step(self, rows: int) -> None:
        self.step_rows[rows] = self.step_rows.get(rows, 0) + 1

    def finished(self, family: str, audio_s: float, wall_s: float) -> None:
        self.family_audio_s[family] = self.family_audio_s.get(family, 0.0) + audio_s
        self.family_wall_s[family] = self.family_wall_s.get(family, 0.0) + wall_s

    def over_budget(self, budget: Budget) -> None:
        self.budget_exceeded[budget] = self.budget_exceeded.get(budget, 0) + 1


class Engine:
    def __init__(
        self,
        *,
        max_queue: int,
        max_batch: int,
        batch_window_s: float = 0.01,
        codes_log: Path | None = None,
        max_audio_s: float | None = None,
        max_wall_s: float | None = None,
        scheduler: Scheduler = "continuous",
    ) -> None:
        self.max_queue = max_queue
        self.scheduler = scheduler
        self.max_audio_s = max_audio_s
        self.max_wall_s = max_wall_s
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
        # Runnable jobs in the order they get their next segment (touched on the MLX thread only).
        self._ready: deque[SpeakJob] = deque()
        # Continuous scheduling: each model's running batch and the job of each of its rows.
        self._running: dict[str, _Running] = {}
        # Jobs whose segment just ended, queued again after the requests that came meanwhile.
        self._next_segments: list[SpeakJob] = []
        self._admitted_this_turn = False
        self._thread = threading.Thread(target=self._run, name="voicefoundry-mlx", daemon=True)

    # --- lifecycle (called from the event loop) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight (up to `timeout`), then fail whatever is still queued."""
        self._stop.set()
        self._inbox.put((lambda: None, Future()))
        self._thread.join(timeout)
        for job in [*self._current, *self._running_jobs()]:
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

    def running_rows(self) -> dict[str, int]:
        """Rows decoding now, by model (read from any thread: the metrics endpoint)."""
        rows = {name: 0 for name in list(self.models)}
        if self.scheduler == "continuous":
            for name, running in list(self._running.items()):
                rows[name] = rows.get(name, 0) + len(running.rows)
        else:
            for job in list(self._current):
                rows[job.voicing.model] = rows.get(job.voicing.model, 0) + 1
        return rows

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
        job.queued_round = self.stats.rounds
        if self.max_wall_s is not None:
            job.deadline = time.perf_counter() + self.max_wall_s
        self._inbox.put(job)

    def _run(self) -> None:
        if self.scheduler == "continuous":
            self._run_continuous()
        else:
            self._run_rounds()

    def _run_rounds(self) -> None:
        while not self._stop.is_set():
            if not self._ready and not self._idle_wait():
                continue
            self._drain()
            self._expire()
            batch = self._next_batch()
            if not batch:
                continue
            self.stats.rounds += 1
            self._current = batch
            again = self._speak(batch)
            self._current = []
            self._drain()  # requests that came during the round go ahead of the ones that ran
            self._ready.extend(again)
        while self._ready:
            self._finish(self._ready.popleft(), RuntimeError("server shutting down"))

    # --- continuous scheduling ----------------------------------------------------------------
    def _run_continuous(self) -> None:
        turn = 0
        while not self._stop.is_set():
            runnable = self._ready or self._running or self._next_segments
            if not runnable and not self._idle_wait():
                continue
            self._drain()
            # Requests that came while a segment ran go ahead of its job's next segment.
            self._ready.extend(self._next_segments)
            self._next_segments.clear()
            self._expire()
            names = sorted({job.voicing.model for job in self._ready} | set(self._running))
            if not names:
                continue
            turn += 1
            start = turn % len(names)  # which model goes first rotates
            self._admitted_this_turn = False
            for name in names[start:] + names[:start]:
                self._serve_model(name)
        for running in list(self._running.values()):
            for job, row in list(running.rows.values()):
                running.model.bank.release(row.slot)
                self._finish(job, RuntimeError("server shutting down"))
            running.batch.close()
        self._running.clear()
        self._ready.extend(self._next_segments)
        self._next_segments.clear()
        while self._ready:
            self._finish(self._ready.popleft(), RuntimeError("server shutting down"))

    def _serve_model(self, name: str) -> None:
        """One turn of model `name`: admit its waiting segments, then one decode step."""
        started = time.perf_counter()
        model = self.models.get(name)
        waiting = [job for job in self._ready if job.voicing.model == name]
        if model is None:
            self._take_ready(waiting)
            for job in waiting:
                self._finish(job, KeyError(f"model {name!r} is not loaded"))
            return
        running = self._running.get(name)
        if running is None:
            running = self._running[name] = _Running(model, model.open_batch())
        room = self.max_batch - len(running.rows)
        if waiting and room > 0:
            self._admit(running, waiting[:room])
        if running.rows:
            self._step(running)
        if not running.rows:
            running.batch.close()
            del self._running[name]
        self.stats.busy_seconds += time.perf_counter() - started

    def _take_ready(self, jobs: list[SpeakJob]) -> None:
        taken = {id(job) for job in jobs}
        self._ready = deque(job for job in self._ready if id(job) not in taken)

    def _admit(self, running: _Running, jobs: list[SpeakJob]) -> None:
        self._take_ready(jobs)
        model = running.model
        rows: list[tuple[SpeakJob, SpeechRow]] = []
        deferred: list[SpeakJob] = []
        now = time.perf_counter()
        for job in jobs:
            if job.cancel.is_set():
                self._finish(job, job.stop_error or RuntimeError("cancelled"))
                continue
            try:
                rows.append((job, self._row(model, job)))
            except BankFull as exc:
                # Every slot is held by a running row: wait for one to end, still first in line.
                if running.rows or rows:
                    deferred.append(job)
                else:
                    self._finish(job, exc)
                continue
            except Exception as exc:  # a bad voice fails its own request, never the worker
                self._finish(job, exc)
                continue
            if job.next_segment == 0 and job.admitted is None:
                job.admitted = now
                self.stats.queue_wait_s.append(now - job.started)
        self._ready.extendleft(reversed(deferred))
        if not rows:
            return
        try:
            running.batch.admit([row for _, row in rows])
        except Exception as exc:  # a prompt the model cannot take fails its own requests
            for job, row in rows:
                model.bank.release(row.slot)
                self._finish(job, exc)
            return
        for job, row in rows:
            running.rows[id(row)] = (job, row)
        self._mark_admitted([job for job, _ in rows])
        self._settle(running)  # a row cancelled meanwhile was left out: it ends now
        self.stats.batch(len(running.rows))

    def _mark_admitted(self, jobs: list[SpeakJob]) -> None:
        """These segments start in this turn: a round (counted at its first start)."""
        if not self._admitted_this_turn:
            self._admitted_this_turn = True
            self.stats.rounds += 1
        for job in jobs:
            job.segment_round = self.stats.rounds

    def _step(self, running: _Running) -> None:
        model = running.model
        self.stats.step(len(running.rows))
        try:
            ended = running.batch.step()
        except Exception as exc:  # the whole step failed: every row of it fails
            for job, row in list(running.rows.values()):
                model.bank.release(row.slot)
                self._finish(job, exc)
            running.rows.clear()
            running.batch.close()
            return
        finished = [running.rows.pop(id(row)) for row in ended]
        due = [(job, row) for job, row in running.rows.values() if self._audio_due(job, row)]
        due += [(job, row) for job, row in finished if self._audio_due(job, row, ended=True)]
        # A stream's first chunk is decoded alone and sent at once: in one pass with the other
        # rows', a burst of streams would all wait for every row's chunk (time to first audio).
        # Every other new chunk, running or just ended, goes in one vocoder call.
        first = [pair for pair in due if _awaits_first_audio(pair[0])]
        rest = [pair for pair in due if not _awaits_first_audio(pair[0])]
        for pair in first:
            self._vocode(model, [pair])
        if rest:
            self._vocode(model, rest)
        for job, row in finished:
            self._end_segment(model, job, row)
        self._settle(running)

    def _settle(self, running: _Running) -> None:
        """End the segments whose rows the batch no longer runs (left out or dropped without
        being reported), so no job waits on a row that will never step again."""
        live = {id(row) for row in running.batch.rows}
        for key in [key for key in running.rows if key not in live]:
            job, row = running.rows.pop(key)
            self._end_segment(running.model, job, row)

    def _end_segment(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> None:
        model.bank.release(row.slot)
        if job.cancel.is_set():
            self._finish(job, job.stop_error or RuntimeError("cancelled"))
            return
        try:
            self._deliver(model, job, row)
        except Exception as exc:
            self._finish(job, exc)
            return
        job.next_segment += 1
        if job.next_segment < len(job.segments):
            self._next_segments.append(job)
        else:
            self._finish(job, None, model)

    def _running_jobs(self) -> list[SpeakJob]:
        return [job for r in list(self._running.values()) for job, _ in list(r.rows.values())]

    def _idle_wait(self) -> bool:
        """With nothing runnable: wait for the next request, then a moment for companions
        (requests arriving together run as one batch). False when nothing came."""
        try:
            item = self._inbox.get(timeout=0.5)
        except queue.Empty:
            return False
        self._take(item)
        deadline = time.monotonic() + self.batch_window_s
        while self._ready and len(self._ready) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._take(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return True

    def _take(self, item: SpeakJob | tuple[Callable[[], Any], Future]) -> None:
        if isinstance(item, tuple):
            self._control(*item)
        else:
            self._ready.append(item)

    def _drain(self) -> None:
        """Everything queued since the last look: control tasks run, requests join."""
        while True:
            try:
                self._take(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _expire(self) -> None:
        """End the waiting jobs that were cancelled or ran out of time."""
        now = time.perf_counter()
        waiting: deque[SpeakJob] = deque()
        for job in self._ready:
            if job.cancel.is_set():
                self._finish(job, job.stop_error or RuntimeError("cancelled"))
            elif job.deadline is not None and now > job.deadline:
                self._over_budget(job, "time")
                self._finish(job, job.stop_error)
            else:
                waiting.append(job)
        self._ready = waiting

    def _next_batch(self) -> list[SpeakJob]:
        """The job that waited longest and the next ones of its model, up to max_batch."""
        if not self._ready:
            return []
        model = self._ready[0].voicing.model
        batch: list[SpeakJob] = []
        rest: deque[SpeakJob] = deque()
        for job in self._ready:
            if job.voicing.model == model and len(batch) < self.max_batch:
                batch.append(job)
            else:
                rest.append(job)
        self._ready = rest
        return batch

    def _over_budget(self, job: SpeakJob, budget: Budget) -> None:
        """Stop `job` (its row ends at the next frame) with the budget it went over."""
        if job.stop_error is not None:
            return
        if budget == "audio":
            detail = (
                f"the request made more than {self.max_audio_s:g} s of audio, the most one "
                "request may make (max_request_audio_seconds); shorten the text or max_tokens"
            )
        else:
            detail = (
                f"the request did not finish within {self.max_wall_s:g} s "
                "(max_request_wall_seconds); retry later or send shorter text"
            )
        job.stop_error = BudgetExceeded(budget, detail)
        self.stats.over_budget(budget)
        job.cancel.set()

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
        deferred: list[SpeakJob] = []
        model = self.models.get(jobs[0].voicing.model)
        for job in jobs:
            if job.cancel.is_set():
                self._finish(job, job.stop_error or RuntimeError("cancelled"))
                continue
            if model is None:
                self._finish(job, KeyError(f"model {job.voicing.model!r} is not loaded"))
                continue
            try:
                live.append((job, self._row(model, job)))
            except BankFull as exc:  # the round's other rows hold every slot: the next round
                if live:
                    deferred.append(job)
                else:
                    self._finish(job, exc)
            except Exception as exc:  # a bad voice fails its own request, never the worker
                self._finish(job, exc)
        self._ready.extendleft(reversed(deferred))  # first in line for the next round
        if not live or model is None:
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
                self._finish(job, job.stop_error or RuntimeError("cancelled"))
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
                self._finish(job, None, model)
        self.stats.busy_seconds += time.perf_counter() - started
        return again

    @staticmethod
    def _acquire_slot(model: SpeechModel, adapter: Path | None) -> int:
        if adapter is None:
            return 0
        slot = model.bank.slot_of(str(adapter)) or 0
        if not slot:
            if not model.bank.has_room():
                raise BankFull("every adapter slot is busy; try again shortly")
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
        job.sent, job.segment_audio = 0, []
        row.on_frames = self._on_frames(model, job, row)
        return row

    def _on_frames(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> Callable:
        """Called by the family after every frame: budgets; in rounds (where the model runs
        the rows to their end inside one call), the row's audio chunk when one is due."""
        max_frames = None if self.max_audio_s is None else int(self.max_audio_s * model.frame_rate)
        rounds = self.scheduler == "rounds"

        def on_frames(_: np.ndarray) -> None:
            made = len(row.frames)
            if max_frames is not None and job.frames_made + made > max_frames:
                self._over_budget(job, "audio")
            elif job.deadline is not None and time.perf_counter() > job.deadline:
                self._over_budget(job, "time")
            if rounds and self._audio_due(job, row):
                self._vocode(model, [(job, row)])

        return on_frames

    @staticmethod
    def _audio_due(job: SpeakJob, row: SpeechRow, *, ended: bool = False) -> bool:
        """Whether the row's frames since its last chunk are decoded now: a chunk's worth
        (`chunk_frames`), or the rest once the row ended."""
        fresh = len(row.frames) - job.sent
        if job.cancel.is_set() or fresh <= 0:
            return False
        return ended or fresh >= job.chunk_frames

    def _vocode(self, model: SpeechModel, due: list[tuple[SpeakJob, SpeechRow]]) -> None:
        """Decode each row's frames since its last chunk, all in one call, continuing each
        row's audio stream; streamed out, or kept for the segment's end. Should the call
        fail, each row is decoded alone: one that fails alone stops its own request."""
        parts = [(row, job.sent, len(row.frames)) for job, row in due]
        try:
            audios: list[np.ndarray | BaseException] = list(model.decode_frames(parts))
        except Exception:
            audios = []
            for part in parts:
                try:
                    audios.append(model.decode_frames([part])[0])
                except Exception as exc:
                    audios.append(exc)
        for (job, _), (_, _, end), audio in zip(due, parts, audios, strict=True):
            if isinstance(audio, BaseException):
                if job.stop_error is None:
                    job.stop_error = audio
                job.cancel.set()  # its row ends at the next step
                continue
            job.sent = end
            if job.stream:
                self._send_audio(job, audio)
            else:
                job.segment_audio.append(audio)

    def _deliver(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> None:
        """A segment ended: its last chunk, then (non-streaming) its audio joined."""
        if self.codes_log is not None:
            self._log_codes(model, job, row)
        if self._audio_due(job, row, ended=True):
            self._vocode(model, [(job, row)])
        if job.stop_error is not None:
            raise job.stop_error
        job.frames_made += len(row.frames)
        job.audio_seconds += len(row.frames) / model.frame_rate
        parts, job.segment_audio = job.segment_audio, []
        if not job.stream and parts:
            self._send_audio(job, np.concatenate(parts))

    def _log_codes(self, model: SpeechModel, job: SpeakJob, row: SpeechRow) -> None:
        record = {
            "model": model.name,
            "request": job.id,
            "segment": job.next_segment,
            # The round that made this segment (continuous: the turn it started in), and the
            # round running when the job was queued.
            "round": self.stats.rounds if job.segment_round is None else job.segment_round,
            "queued_round": job.queued_round,
            "text": job.text,
            "cancelled": job.cancel.is_set(),
            "codes": [np.asarray(f).astype(int).tolist() for f in row.frames],
            **model.debug_record(row),
        }
        assert self.codes_log is not None
        with self.codes_log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _finish(
        self, job: SpeakJob, error: BaseException | None, model: SpeechModel | None = None
    ) -> None:
        with self._pending_lock:
            self._pending = max(self._pending - 1, 0)
        if error is not None:
            job.send(error)
        else:
            seconds = time.perf_counter() - job.started
            self.stats.audio_seconds += job.audio_seconds
            if model is not None:
                self.stats.finished(model.family, job.audio_seconds, seconds)
            job.send(Done(frames=job.frames_made, seconds=seconds))

    def _send_audio(self, job: SpeakJob, audio: np.ndarray) -> None:
        if job.first_audio is None and len(audio):
            job.first_audio = time.perf_counter()
            self.stats.first_audio_s.append(job.first_audio - job.started)
        job.send(audio)


def _awaits_first_audio(job: SpeakJob) -> bool:
    return job.stream and job.first_audio is None


class _Running:
    """A model's running decode batch and, by row, the job each row belongs to."""

    def __init__(self, model: SpeechModel, batch: DecodeBatch) -> None:
        self.model = model
        self.batch = batch
        self.rows: dict[int, tuple[SpeakJob, SpeechRow]] = {}


__all__ = [
    "BankFull",
    "BudgetExceeded",
    "ContextClip",
    "Done",
    "Engine",
    "QueueFull",
    "Sampling",
    "SpeakJob",
    "Voicing",
]
