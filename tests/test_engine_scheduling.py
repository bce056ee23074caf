"""The speech engine's iteration-level scheduling, in process on the tiny Qwen3-TTS: a request
that arrives while a long one decodes joins at the next step and finishes first (the round
engine makes it wait the long one out), its audio equal to its audio alone; a cancelled row
leaves at the next step and gives its adapter reference back."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.sampling import Sampling

import mlx.core as mx
import numpy as np
import pytest

from server.engine.families.qwen3 import Qwen3Model
from server.engine.requests import Done, SpeakJob, Voicing
from server.engine.worker import Engine

LONG_FRAMES = 48


@pytest.fixture(scope="module")
def engines(tiny_qwen3_base: Path) -> Iterator[dict[str, Engine]]:
    """An engine of each scheduler, its model loaded on its own MLX thread (as the server does)."""
    made = {}
    for scheduler in ("continuous", "rounds"):
        engine = Engine(max_queue=16, max_batch=4, scheduler=scheduler)  # type: ignore[arg-type]
        engine.start()
        engine.models["tiny"] = engine.call(
            lambda: Qwen3Model.load(
                "tiny", str(tiny_qwen3_base), slots=4, max_rank=16, max_bytes=1 << 26
            )
        ).result(120)
        made[scheduler] = engine
    yield made
    for engine in made.values():
        engine.stop()


def _job(
    text: str, seed: int, max_tokens: int, *, stream: bool = False, adapter: Path | None = None
) -> SpeakJob:
    return SpeakJob(
        voicing=Voicing(model="tiny", adapter=adapter),
        segments=[text],
        language="english",
        sampling=Sampling(temperature=0.9, max_tokens=max_tokens, repetition_penalty=1.0),
        seed=seed,
        stream=stream,
        loop=asyncio.get_running_loop(),
        out=asyncio.Queue(),
        chunk_frames=8,
    )


async def _collect(job: SpeakJob) -> tuple[np.ndarray, float]:
    """The job's audio and when it ended (perf_counter)."""
    parts = []
    while True:
        item = await asyncio.wait_for(job.out.get(), 300)
        if isinstance(item, Done):
            return (
                np.concatenate(parts) if parts else np.zeros(0, np.float32)
            ), time.perf_counter()
        if isinstance(item, BaseException):
            raise item
        parts.append(item)


async def _first_audio(job: SpeakJob) -> list[np.ndarray]:
    item = await asyncio.wait_for(job.out.get(), 300)
    assert isinstance(item, np.ndarray), item
    return [item]


async def _short_while_long(engine: Engine) -> tuple[np.ndarray, float, float]:
    long = _job("A long request that keeps on speaking.", 1, LONG_FRAMES, stream=True)
    engine.submit(long)
    head = await _first_audio(long)  # the long one is decoding
    short = _job("Short.", 2, 4)
    engine.submit(short)
    (short_audio, short_end), (long_rest, long_end) = await asyncio.gather(
        _collect(short), _collect(long)
    )
    assert len(np.concatenate([*head, long_rest])) > 0
    return short_audio, short_end, long_end


def test_a_short_request_joins_a_running_long_one_and_is_not_blocked(
    engines: dict[str, Engine],
) -> None:
    async def main() -> None:
        alone = _job("Short.", 2, 4)
        engines["continuous"].submit(alone)
        alone_audio, _ = await _collect(alone)
        short, short_end, long_end = await _short_while_long(engines["continuous"])
        assert short_end < long_end, "the short request waited for the long one"
        # Joined mid-way: its frames as alone, its audio within the vocoder's tolerance (its
        # chunks may be decoded in one pass with the long row's).
        assert short.shape == alone_audio.shape
        assert np.abs(short - alone_audio).max() <= 1e-3
        # The round engine, measured the same way: the short request waits the long one out.
        _, short_end, long_end = await _short_while_long(engines["rounds"])
        assert short_end >= long_end

    asyncio.run(main())


def test_a_request_that_came_during_a_segment_goes_ahead_of_that_jobs_next_segment(
    tiny_qwen3_base: Path, tmp_path: Path
) -> None:
    """One row at a time (max_batch 1): request B arrives during the step that ends job A's
    first segment; B gets the next turn and A's second segment the one after (round robin by
    segment, as the round engine does), not A's segment first because it was queued at once."""
    log = tmp_path / "codes.jsonl"
    engine = Engine(max_queue=8, max_batch=1, codes_log=log)
    engine.start()
    try:
        model = engine.call(
            lambda: Qwen3Model.load(
                "tiny", str(tiny_qwen3_base), slots=2, max_rank=8, max_bytes=1 << 26
            )
        ).result(120)
        engine.models["tiny"] = model

        async def main() -> None:
            first = _job("First part.", 1, 4)
            first.segments = ["First part.", "Second part."]
            later = _job("Later.", 2, 4)
            open_batch = model.open_batch
            sent: list[SpeakJob] = []

            def open_batch_sending_later() -> Any:
                batch = open_batch()
                step = batch.step

                def step_then_submit() -> Any:
                    ended = step()
                    if ended and not sent:  # before the engine ends the segment
                        sent.append(later)
                        engine.submit(later)
                    return ended

                batch.step = step_then_submit
                return batch

            model.open_batch = open_batch_sending_later
            engine.submit(first)
            await asyncio.gather(_collect(first), _collect(later))

        asyncio.run(main())
    finally:
        engine.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    order = [(r["text"], r["round"]) for r in sorted(records, key=lambda r: r["round"])]
    assert [text for text, _ in order] == ["First part.", "Later.", "Second part."], order


def test_cancel_frees_the_row_and_its_adapter_at_the_next_step(
    engines: dict[str, Engine], voice_package: Path
) -> None:
    adapter = voice_package / "adapter"
    engine = engines["continuous"]
    model = engine.models["tiny"]

    async def main() -> None:
        cancelled = _job(
            "Speak for a long time please.", 3, LONG_FRAMES, stream=True, adapter=adapter
        )
        other = _job("Another voice going on.", 4, 30, stream=True)
        engine.submit(cancelled)
        engine.submit(other)
        await _first_audio(cancelled)
        slot = model.bank.slot_of(str(adapter))
        assert slot and model.bank._slots[slot].in_use == 1
        cancelled.cancel.set()
        with pytest.raises(RuntimeError, match="cancelled"):
            await _collect(cancelled)
        assert model.bank._slots[slot].in_use == 0
        await _collect(other)  # the other row went on
        assert other.frames_made > 0
        assert engine.stats.step_rows.get(2, 0) > 0  # they did share steps

    asyncio.run(main())


def test_a_row_cancelled_while_it_is_admitted_ends_and_nothing_hangs(
    engines: dict[str, Engine],
) -> None:
    """The cancel lands between the engine's check and the batch's prefill (the batch leaves the
    row out): the request ends as cancelled and the engine goes on serving."""
    engine = engines["continuous"]
    model = engine.models["tiny"]
    opened = model.open_batch

    class CancelOnAdmit:
        def __init__(self) -> None:
            self.inner = opened()
            self.first = True

        @property
        def rows(self) -> list:
            return self.inner.rows

        def admit(self, rows: list) -> None:
            if self.first:
                self.first = False
                rows[0].cancel.set()
            self.inner.admit(rows)

        def step(self) -> list:
            return self.inner.step()

        def close(self) -> None:
            self.inner.close()

    async def main() -> None:
        model.open_batch = CancelOnAdmit  # type: ignore[method-assign]
        try:
            raced = _job("Cancelled on the way in.", 5, 8)
            engine.submit(raced)
            with pytest.raises(RuntimeError, match="cancelled"):
                await _collect(raced)
        finally:
            del model.open_batch
        after = _job("And the next one speaks.", 6, 4)
        engine.submit(after)
        audio, _ = await _collect(after)
        assert len(audio) > 0

    asyncio.run(main())


def test_a_response_is_its_stream_joined_and_the_stream_is_the_one_shot_decode(
    engines: dict[str, Engine],
) -> None:
    """Streaming-first: a streamed request gets its audio chunk by chunk while its row decodes;
    the same request not streamed gets exactly those chunks joined; both are the decoder's
    one-shot decode of the row's frames within the stream's tolerance
    (tests/test_qwen3_vocoder_stream.py). The two run one after the other: in one batch their
    chunks would share vocoder passes, where a row's audio depends on its batch in the last
    float bits on some CPUs (AVX2 OpenBLAS; within the stream's tolerance, checked with two
    rows by tests/test_service_server.py)."""
    engine = engines["continuous"]
    model = engine.models["tiny"]
    text, seed, frames = "Streamed and whole alike.", 7, 20

    async def main() -> tuple[list[np.ndarray], np.ndarray, SpeakJob]:
        streamed = _job(text, seed, frames, stream=True)
        engine.submit(streamed)
        chunks: list[np.ndarray] = []
        while not isinstance(item := await asyncio.wait_for(streamed.out.get(), 300), Done):
            assert isinstance(item, np.ndarray), item
            chunks.append(item)
        whole = _job(text, seed, frames)
        engine.submit(whole)
        audio, _ = await _collect(whole)
        return chunks, audio, _job(text, seed, frames)

    chunks, audio, again = asyncio.run(main())
    assert len(chunks) >= 2, "the stream came in one piece"
    np.testing.assert_array_equal(np.concatenate(chunks), audio)

    def generate_and_decode() -> tuple[int, np.ndarray]:
        row = model.make_row(again, slot=0)
        model.run([row])
        codes = mx.array(np.stack(row.frames))[None].transpose(0, 2, 1)
        return len(row.frames), np.array(model.model.speech_tokenizer.decoder(codes)[0, 0])

    made, one_shot = engine.call(generate_and_decode).result(120)
    assert len(chunks) == -(-made // 8)  # chunk_frames 8: one chunk per 8 frames, then the rest
    assert audio.shape == one_shot.shape
    assert np.abs(audio - one_shot).max() <= 1e-3


def test_a_row_whose_audio_fails_to_decode_fails_only_its_own_request(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows' chunks go to the vocoder together; when that call fails, each row is decoded
    alone: the one that fails alone ends with the error, the other is served in full."""
    engine = engines["continuous"]
    model = engine.models["tiny"]
    decode = model.decode_frames
    broken_seed = 13

    def flaky(parts: list) -> list[np.ndarray]:
        if any(row.seed == broken_seed for row, _, _ in parts):
            raise MemoryError("the vocoder ran out of memory")
        return decode(parts)

    monkeypatch.setattr(model, "decode_frames", flaky)

    async def main() -> None:
        # Both whole responses: their chunks share a vocoder call (a stream's first goes alone).
        broken = _job("This one cannot be heard.", broken_seed, 12)
        fine = _job("This one is heard.", 14, 12)
        engine.submit(broken)
        engine.submit(fine)
        audio, _ = await _collect(fine)
        assert fine.frames_made > 0 and len(audio) == fine.frames_made * 1920
        with pytest.raises(MemoryError, match="out of memory"):
            await _collect(broken)

    asyncio.run(main())


def test_a_burst_of_streams_gets_first_audio_row_by_row_and_later_chunks_together(
    engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four streams that arrive together reach their first chunk at the same step: each first
    chunk is decoded alone and sent before the next is decoded (the first stream does not wait
    for all four rows' vocoder pass); their later chunks share calls."""
    engine = engines["continuous"]
    model = engine.models["tiny"]
    decode = model.decode_frames
    calls: list[list[tuple[int | None, int]]] = []

    def recorded(parts: list) -> list[np.ndarray]:
        calls.append([(row.seed, start) for row, start, _ in parts])
        return decode(parts)

    monkeypatch.setattr(model, "decode_frames", recorded)

    async def main() -> list[float]:
        jobs = [_job(f"Stream number {i} speaks.", 30 + i, 24, stream=True) for i in range(4)]
        for job in jobs:
            engine.submit(job)
        await asyncio.gather(*(_collect(job) for job in jobs))
        assert all(job.first_audio is not None for job in jobs)
        return [job.first_audio for job in jobs]  # type: ignore[misc]

    first_audio = asyncio.run(main())
    firsts = [call for call in calls if any(start == 0 for _, start in call)]
    assert sorted(seed for call in firsts for seed, _ in call) == [30, 31, 32, 33]
    assert all(len(call) == 1 for call in firsts), firsts  # each first chunk alone
    assert len(set(first_audio)) == 4  # sent one after another, not at one moment
    assert any(len(call) > 1 for call in calls), calls  # later chunks still batched


@pytest.mark.parametrize("scheduler", ["continuous", "rounds"])
def test_more_voices_at_once_than_adapter_slots_wait_for_a_slot_and_none_fails(
    engines: dict[str, Engine], voice_package: Path, tmp_path: Path, scheduler: str
) -> None:
    """4 requests over 4 different adapters, 3 usable slots: the one that finds every slot held
    by a running row waits (first in line) until a row ends, then speaks; nothing fails."""
    import shutil

    engine = engines[scheduler]
    bank = engine.models["tiny"].bank
    adapters = []
    for i in range(4):
        copy = tmp_path / f"voice{i}" / "adapter"
        shutil.copytree(voice_package / "adapter", copy)
        adapters.append(copy)
    assert bank.slots - 1 < len(adapters)

    async def main() -> None:
        jobs = [
            _job(f"Voice number {i} speaks now.", 20 + i, 4 + 3 * i, adapter=a)
            for i, a in enumerate(adapters)
        ]
        for job in jobs:
            engine.submit(job)
        results = await asyncio.gather(*(_collect(job) for job in jobs))
        assert all(len(audio) > 0 for audio, _ in results)
        assert all(job.frames_made > 0 for job in jobs)

    asyncio.run(main())
    assert all(slot.in_use == 0 for slot in bank._slots.values())
    assert {str(a) for a in adapters} & set(bank._resident)  # they did go through the bank
