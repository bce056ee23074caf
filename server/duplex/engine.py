"""The duplex engine: its own MLX thread steps every live session of a model together, one
batched forward per tick, and hands each session's audio and text back to the event loop.

Sessions only ever touch MLX on this thread. The event loop feeds input frames into a bounded
per-session inbox (thread-safe deque); a tick takes one frame from every session that has one.
A client sending faster than real time fills its inbox up to the bound, then its oldest frames
are dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.audio import load_audio
from finetune.config import PERSONAPLEX_TARGETS
from finetune.families.personaplex.family import FAMILY
from finetune.families.personaplex.sampling import SamplingParams

import numpy as np

from server.duplex.adapters import DuplexAdapterBank, DuplexAdapterTensors

log = logging.getLogger("voicefoundry.duplex")

TICK_HISTORY = 512


@dataclass
class DuplexVoicing:
    """How a duplex session sounds: base model + optional adapter, voice prompt, text prompt."""

    model: str
    speaker: str
    adapter: Path | None = None
    voice_prompt: Path | None = None
    text_prompt: str | None = None


class Closed:
    """Put on a session's outbox when the engine ends it (shutdown)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class LiveSession:
    id: str
    voicing: DuplexVoicing
    seed: int | None
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    max_inbox: int
    max_outbox: int
    text_seed: int | None = None  # None: `seed`'s
    audio_seed: int | None = None
    # Error and pong replies (event loop side) the client may leave unread beyond max_outbox:
    # `out` holds at most max_outbox + max_replies items.
    max_replies: int = 64
    out: asyncio.Queue = field(init=False)
    out_peak: int = 0  # the most items `out` held
    inbox: deque = field(default_factory=deque)
    state: Any = None  # the runtime's per-session state, touched only on the engine thread
    slot: int = 0
    paused: bool = False
    closed: bool = False
    steps: int = 0
    dropped_in: int = 0
    dropped_out: int = 0
    opened: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.out = asyncio.Queue(maxsize=self.max_outbox + self.max_replies)

    def feed(self, frames: list[np.ndarray]) -> int:
        """Queue input frames (event loop side); returns how many older frames were dropped."""
        dropped = 0
        for frame in frames:
            if len(self.inbox) >= self.max_inbox:
                self.inbox.popleft()
                dropped += 1
            self.inbox.append(frame)
        self.dropped_in += dropped
        return dropped

    def send(self, item: Any) -> None:
        """Hand an item to the event loop (engine side), dropping audio a stalled reader left."""
        if self.out.qsize() >= self.max_outbox and not isinstance(item, BaseException | Closed):
            self.dropped_out += 1
            return
        self.loop.call_soon_threadsafe(self._put_made, item)

    def _put_made(self, item: Any) -> None:
        # Checked again on the loop: replies may have filled `out` since the engine looked.
        if self.out.qsize() >= self.max_outbox and not isinstance(item, BaseException | Closed):
            self.dropped_out += 1
            return
        if self.out.full():  # an end of the session (Closed, an error) outranks what waits
            self.out.get_nowait()
            self.dropped_out += 1
        self._put(item)

    async def reply(self, message: bytes, wait_s: float) -> bool:
        """Queue a reply to the client (event loop side). With `out` full, wait up to `wait_s`
        for the client to read; False, queueing nothing, if it did not."""
        try:
            self.out.put_nowait(message)
        except asyncio.QueueFull:
            try:
                await asyncio.wait_for(self.out.put(message), wait_s)
            except TimeoutError:
                return False
        self.out_peak = max(self.out_peak, self.out.qsize())
        return True

    def _put(self, item: Any) -> None:
        self.out.put_nowait(item)
        self.out_peak = max(self.out_peak, self.out.qsize())


class DuplexModel:
    """A loaded PersonaPlex with its adapter bank and streaming runtime."""

    family: str = FAMILY.name

    def __init__(self, name: str, loaded: Any, *, slots: int, max_rank: int, max_bytes: int):
        from finetune.families.personaplex.runtime import PersonaPlexRuntime

        self.name = name
        self.loaded = loaded
        self.runtime = PersonaPlexRuntime(loaded)
        self.bank = DuplexAdapterBank(
            loaded.lm,
            PERSONAPLEX_TARGETS,
            runtime=self.runtime,
            slots=slots,
            max_rank=max_rank,
            max_bytes=max_bytes,
        )
        self.runtime.set_rows = self.bank.set_rows
        self.prompt_cache: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, name: str, path: str, **bank: int) -> DuplexModel:
        from finetune.families.personaplex.checkpoint import load_personaplex

        return cls(name, load_personaplex(path, serving=True), **bank)

    def voice_prompt(self, path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        key = str(path)
        if key not in self.prompt_cache:
            self.prompt_cache[key] = load_audio(path, 24_000)
        return self.prompt_cache[key]


class SessionLimit(RuntimeError):
    pass


@dataclass
class DuplexStats:
    sessions_opened: int = 0
    sessions_closed: int = 0
    ticks: int = 0
    frames: int = 0
    tick_seconds: deque = field(default_factory=lambda: deque(maxlen=TICK_HISTORY))
    batch_sizes: dict[int, int] = field(default_factory=dict)


class DuplexEngine:
    def __init__(
        self,
        *,
        max_sessions: int = 8,
        max_inbox_frames: int = 25,
        max_outbox_frames: int = 250,
        max_unread_replies: int = 64,
        unread_grace_s: float = 5.0,
        idle_wait_s: float = 0.02,
        codes_log: Path | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        # Debugging / test aid (settings.codes_log): every live step's text token, JSON lines.
        self.codes_log = codes_log
        self.max_inbox_frames = max_inbox_frames
        self.max_outbox_frames = max_outbox_frames
        self.max_unread_replies = max_unread_replies
        self.unread_grace_s = unread_grace_s  # how long a full outbox waits for the client
        self.idle_wait_s = idle_wait_s
        self.models: dict[str, DuplexModel] = {}
        self.sessions: dict[str, LiveSession] = {}
        self.stats = DuplexStats()
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="voicefoundry-duplex", daemon=True)

    # --- lifecycle (event loop side) -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        for session in list(self.sessions.values()):
            session.send(Closed("server shutting down"))
        while True:
            try:
                _, future = self._tasks.get_nowait()
            except queue.Empty:
                break
            future.cancel()

    def call(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._tasks.put((fn, future))
        self._wake.set()
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    @property
    def live_sessions(self) -> int:
        return len(self.sessions)

    # --- sessions ---------------------------------------------------------------------------
    async def open(
        self,
        voicing: DuplexVoicing,
        *,
        seed: int | None,
        sampling: SamplingParams | None = None,
        text_seed: int | None = None,
        audio_seed: int | None = None,
    ) -> LiveSession:
        """Condition a new session (voice prompt, spacers, text prompt) and make it live."""
        if voicing.model not in self.models:
            raise KeyError(f"duplex model {voicing.model!r} is not loaded")
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimit(f"{len(self.sessions)} duplex sessions are live (the limit)")
        adapter = None
        if voicing.adapter is not None:
            family = self.models[voicing.model].family
            adapter = await asyncio.to_thread(
                DuplexAdapterTensors.read, voicing.adapter, family=family
            )
        session = LiveSession(
            id=uuid.uuid4().hex[:16],
            voicing=voicing,
            seed=seed,
            text_seed=text_seed,
            audio_seed=audio_seed,
            sampling=sampling or SamplingParams(),
            loop=asyncio.get_running_loop(),
            max_inbox=self.max_inbox_frames,
            max_outbox=self.max_outbox_frames,
            max_replies=self.max_unread_replies,
        )
        self.sessions[session.id] = session  # counts against the limit while conditioning
        try:
            await self.run(lambda: self._start(session, adapter))
        except BaseException:
            self.sessions.pop(session.id, None)
            raise
        self.stats.sessions_opened += 1
        return session

    def _start(self, session: LiveSession, adapter: DuplexAdapterTensors | None) -> None:
        model = self.models[session.voicing.model]
        slot = 0
        if adapter is not None:
            slot = model.bank.ensure(adapter)
            model.bank.acquire(slot)
        try:
            session.slot = slot
            self._condition(model, session)
        except BaseException:
            model.bank.release(slot)
            session.state = None
            raise

    async def restart(self, session: LiveSession) -> None:
        """Start the conversation over: fresh state, prompts processed again."""

        def again() -> None:
            model = self.models[session.voicing.model]
            if session.state is not None:
                model.runtime.close(session.state)
            session.inbox.clear()
            self._condition(model, session)

        await self.run(again)

    @staticmethod
    def _condition(model: DuplexModel, session: LiveSession) -> None:
        """A fresh runtime state for the session, its prompts processed (engine thread)."""
        session.state = model.runtime.new_session(
            seed=session.seed,
            voice_prompt=model.voice_prompt(session.voicing.voice_prompt),
            text_prompt=session.voicing.text_prompt,
            adapter_slot=session.slot,
            text_temperature=session.sampling.text_temperature,
            audio_temperature=session.sampling.audio_temperature,
            text_top_k=session.sampling.text_top_k,
            audio_top_k=session.sampling.audio_top_k,
            repetition_penalty=session.sampling.repetition_penalty,
            repetition_context=session.sampling.repetition_context,
            pad_bias=session.sampling.pad_bias,
            text_seed=session.text_seed,
            audio_seed=session.audio_seed,
        )
        model.runtime.condition(session.state)

    def feed(self, session: LiveSession, frames: list[np.ndarray]) -> int:
        dropped = session.feed(frames)
        self._wake.set()
        return dropped

    async def close(self, session: LiveSession) -> None:
        """Free the session's state (model caches, adapter slot); safe to call twice."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)

        def free() -> None:
            model = self.models.get(session.voicing.model)
            if model is None:
                return
            if session.state is not None:
                model.runtime.close(session.state)
                session.state = None
            model.bank.release(session.slot)

        self.stats.sessions_closed += 1
        if self._thread.is_alive() and not self._stop.is_set():
            await self.run(free)

    # --- the MLX thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_tasks()
            ready = [
                s
                for s in list(self.sessions.values())
                if s.inbox and s.state is not None and not s.closed and not s.paused
            ]
            if not ready:
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            by_model: dict[str, list[LiveSession]] = {}
            for session in ready:
                by_model.setdefault(session.voicing.model, []).append(session)
            for name, sessions in by_model.items():
                self._tick(self.models[name], sessions)

    def _drain_tasks(self) -> None:
        while True:
            try:
                fn, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

    def _tick(self, model: DuplexModel, sessions: list[LiveSession]) -> None:
        frames = [s.inbox.popleft() for s in sessions]
        started = time.perf_counter()
        try:
            outs = model.runtime.step([s.state for s in sessions], frames)
        except Exception as exc:  # one bad tick ends these sessions, never the engine
            log.exception("duplex step failed")
            for session in sessions:
                session.send(exc)
            return
        elapsed = time.perf_counter() - started
        self.stats.ticks += 1
        self.stats.frames += len(sessions)
        self.stats.tick_seconds.append(elapsed)
        self.stats.batch_sizes[len(sessions)] = self.stats.batch_sizes.get(len(sessions), 0) + 1
        if self.codes_log is not None:
            self._log_tokens(sessions, outs)
        for session, out in zip(sessions, outs, strict=True):
            session.steps += 1
            session.send(out)

    def _log_tokens(self, sessions: list[LiveSession], outs: list[Any]) -> None:
        """One line per session step: the output frame's text token (the runtime's alignment:
        live step n carries the text sampled for input frame n - 1)."""
        assert self.codes_log is not None
        with self.codes_log.open("a") as handle:
            for session, out in zip(sessions, outs, strict=True):
                record = {
                    "duplex_session": session.id,
                    "speaker": session.voicing.speaker,
                    "step": session.steps,
                    "text_token": int(out.text_token),
                }
                handle.write(json.dumps(record) + "\n")
