"""Tests for finetune.data: JSONL checks, the codes cache, batching, prefetch, synthetic data."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.audio import load_audio, write_wav
from finetune.data import (
    BatchPlan,
    Clip,
    DataError,
    Example,
    PreprocessReport,
    codes_path,
    load_codes,
    load_examples,
    pad_codes,
    prefetch,
    preprocess,
    read_jsonl,
    sidecar_path,
    synthetic_dataset,
)

import numpy as np
import pytest
import soundfile as sf

SR = 24_000
HOP = 1920  # 24 kHz / 12.5 Hz


def _tone(seconds: float, freq: float = 220.0, sr: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class FakeEncoder:
    """Deterministic codes from the audio: ceil(len / 1920) frames, values from a hash."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        self.calls += 1
        assert audio.dtype == np.float32 and audio.ndim == 1
        frames = math.ceil(audio.shape[0] / HOP)
        seed = int.from_bytes(hashlib.sha256(audio.tobytes()).digest()[:8], "little")
        return np.random.default_rng(seed).integers(0, 2048, size=(frames, 16), dtype=np.int64)


def _fake_examples(lengths: list[int], texts: list[str] | None = None) -> list[Example]:
    examples = []
    for i, frames in enumerate(lengths):
        clip = Clip(
            audio=Path(f"/nowhere/{i}.wav"),
            text=texts[i] if texts else "hi",
            ref_audio=None,
            language=None,
            line=i + 1,
            source=Path("/nowhere/train.jsonl"),
        )
        examples.append(Example(clip=clip, codes=np.full((frames, 16), i, dtype=np.int32)))
    return examples


# --------------------------------------------------------------------------- read_jsonl


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    write_wav(tmp_path / "good.wav", _tone(1.0))
    write_wav(tmp_path / "short.wav", _tone(0.2))
    write_wav(tmp_path / "long.wav", _tone(3.0))
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    rows: list[dict | str] = [
        {"audio": "good.wav", "text": "fine line", "extra": 1},  # 1: good, unknown key allowed
        "{not json",  # 2
        '["a", "list"]',  # 3
        {"text": "no audio"},  # 4
        {"audio": "good.wav", "text": "   "},  # 5
        {"audio": "missing.wav", "text": "where is it"},  # 6
        "",  # 7: blank, skipped
        {"audio": "garbage.wav", "text": "undecodable"},  # 8
        {"audio": "short.wav", "text": "too short"},  # 9
        {"audio": "long.wav", "text": "too long"},  # 10
        {"audio": "good.wav"},  # 11
        {"audio": "", "text": "empty audio"},  # 12
    ]
    jsonl = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_jsonl(jsonl, strategy="language", max_duration_s=2.0)
    problems = info.value.problems
    by_line = {int(p.split(":")[1]): p for p in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert len(problems) == 10
    assert all(p.startswith(f"{jsonl}:") for p in problems)
    assert "invalid JSON" in by_line[2]
    assert "expected a JSON object" in by_line[3]
    assert "missing 'audio'" in by_line[4]
    assert "'text' is empty" in by_line[5]
    assert "not found" in by_line[6]
    assert "cannot decode" in by_line[8]
    assert "0.20 s" in by_line[9] and "shorter" in by_line[9]
    assert "3.00 s" in by_line[10] and "longer" in by_line[10]
    assert "missing 'text'" in by_line[11]
    assert "empty 'audio'" in by_line[12]
    message = str(info.value)
    for line in (2, 3, 4, 5, 6, 8, 9, 10, 11, 12):
        assert f"{jsonl}:{line}:" in message


def test_good_file_reads_clips_with_relative_paths(tmp_path: Path) -> None:
    write_wav(tmp_path / "audio" / "a.wav", _tone(1.0))
    write_wav(tmp_path / "b.wav", _tone(0.8))
    jsonl = _write_jsonl(
        tmp_path / "lists" / "train.jsonl",
        [
            {"audio": "../audio/a.wav", "text": "  Hello there.  ", "language": "english"},
            "",
            {"audio": str(tmp_path / "b.wav"), "text": "Absolute."},
        ],
    )
    clips = read_jsonl([jsonl], strategy="language")
    assert [c.audio for c in clips] == [tmp_path / "audio" / "a.wav", tmp_path / "b.wav"]
    assert [c.text for c in clips] == ["Hello there.", "Absolute."]
    assert [c.language for c in clips] == ["english", None]
    assert [c.line for c in clips] == [1, 3]
    assert all(c.source == jsonl and c.ref_audio is None for c in clips)


def test_speaker_strategy_requires_ref_audio(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", _tone(1.0))
    write_wav(tmp_path / "ref.wav", _tone(2.0, 300.0))
    rows: list[dict | str] = [
        {"audio": "a.wav", "text": "with ref", "ref_audio": "ref.wav"},
        {"audio": "a.wav", "text": "no ref"},
        {"audio": "a.wav", "text": "missing ref", "ref_audio": "nope.wav"},
    ]
    jsonl = _write_jsonl(tmp_path / "train.jsonl", rows)
    # The language strategy does not need ref_audio, but a named ref must exist.
    with pytest.raises(DataError) as info:
        read_jsonl(jsonl, strategy="language")
    assert [int(p.split(":")[1]) for p in info.value.problems] == [3]
    with pytest.raises(DataError) as info:
        read_jsonl(jsonl, strategy="speaker")
    problems = info.value.problems
    assert [int(p.split(":")[1]) for p in problems] == [2, 3]
    assert "ref_audio" in problems[0] and "speaker" in problems[0]
    assert "ref_audio" in problems[1] and "not found" in problems[1]

    good = _write_jsonl(tmp_path / "good.jsonl", rows[:1])
    (clip,) = read_jsonl(good, strategy="speaker")
    assert clip.ref_audio == tmp_path / "ref.wav"


def test_read_jsonl_rejects_unknown_strategy_and_empty_files(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="strategy"):
        read_jsonl(jsonl, strategy="voice")
    with pytest.raises(DataError, match="no clips"):
        read_jsonl(jsonl, strategy="language")
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl", strategy="language")


# --------------------------------------------------------------------------- codes cache


def _three_clips(tmp_path: Path) -> list[Clip]:
    for i, seconds in enumerate((1.0, 1.3, 0.9)):
        write_wav(tmp_path / f"c{i}.wav", _tone(seconds, 200.0 + 50 * i))
    rows: list[dict | str] = [{"audio": f"c{i}.wav", "text": f"clip {i}"} for i in range(3)]
    rows.append({"audio": "c0.wav", "text": "same audio again"})
    return read_jsonl(_write_jsonl(tmp_path / "train.jsonl", rows), strategy="language")


def test_codes_path_and_sidecar_names() -> None:
    assert codes_path(Path("/d/a.wav")) == Path("/d/a.codec.npy")
    assert sidecar_path(Path("/d/a.wav")) == Path("/d/a.codec.json")
    assert codes_path(Path("/d/x.y.flac")) == Path("/d/x.y.codec.npy")


def test_preprocess_caches_and_skips(tmp_path: Path) -> None:
    clips = _three_clips(tmp_path)
    encoder = FakeEncoder()
    seen: list[tuple[int, int]] = []
    report = preprocess(clips, encoder, "tok-a", progress=lambda d, t: seen.append((d, t)))
    assert report == PreprocessReport(encoded=3, skipped=0)
    assert encoder.calls == 3  # c0.wav appears twice but is encoded once
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for clip in clips[:3]:
        codes = np.load(codes_path(clip.audio))
        meta = json.loads(sidecar_path(clip.audio).read_text())
        expected_frames = math.ceil(load_audio(clip.audio).shape[0] / HOP)
        assert codes.dtype == np.int32 and codes.shape == (expected_frames, 16)
        assert meta["tokenizer"] == "tok-a" and meta["frames"] == expected_frames
        assert meta["audio_sha256"] == hashlib.sha256(clip.audio.read_bytes()).hexdigest()
        np.testing.assert_array_equal(load_codes(clip, "tok-a"), codes)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files

    again = FakeEncoder()
    assert preprocess(clips, again, "tok-a") == PreprocessReport(encoded=0, skipped=3)
    assert again.calls == 0

    before = {c.audio: np.load(codes_path(c.audio)) for c in clips[:3]}
    write_wav(clips[1].audio, _tone(1.5, 440.0))  # change one clip
    changed = FakeEncoder()
    assert preprocess(clips, changed, "tok-a") == PreprocessReport(encoded=1, skipped=2)
    assert changed.calls == 1
    assert np.load(codes_path(clips[1].audio)).shape[0] == math.ceil(1.5 * SR / HOP)
    np.testing.assert_array_equal(np.load(codes_path(clips[0].audio)), before[clips[0].audio])

    other = FakeEncoder()
    assert preprocess(clips, other, "tok-b") == PreprocessReport(encoded=3, skipped=0)
    assert other.calls == 3
    assert json.loads(sidecar_path(clips[2].audio).read_text())["tokenizer"] == "tok-b"


def test_load_codes_rejects_missing_and_stale_cache(tmp_path: Path) -> None:
    clips = _three_clips(tmp_path)
    with pytest.raises(DataError, match="missing"):
        load_codes(clips[0], "tok-a")
    preprocess(clips, FakeEncoder(), "tok-a")
    load_codes(clips[0], "tok-a")
    with pytest.raises(DataError, match="tokenizer"):
        load_codes(clips[0], "tok-b")
    write_wav(clips[0].audio, _tone(1.0, 330.0))
    with pytest.raises(DataError, match="stale") as info:
        load_codes(clips[0], "tok-a")
    assert info.value.problems[0].startswith(f"{clips[0].source}:{clips[0].line}:")
    with pytest.raises(DataError) as info:
        load_examples(clips, "tok-a")
    assert len(info.value.problems) == 2  # lines 1 and 4 share the changed audio
    codes_path(clips[1].audio).unlink()
    with pytest.raises(DataError, match="missing"):
        load_codes(clips[1], "tok-a")
    preprocess(clips, FakeEncoder(), "tok-a")
    examples = load_examples(clips, "tok-a")
    assert [e.frames for e in examples] == [e.codes.shape[0] for e in examples]
    assert examples[0].codes is examples[3].codes


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((5, 8), dtype=np.int32),
        np.zeros((5, 16), dtype=np.float32),
        np.zeros((0, 16), dtype=np.int32),
        np.full((5, 16), -1, dtype=np.int32),
    ],
)
def test_preprocess_validates_encoder_output(tmp_path: Path, bad: np.ndarray) -> None:
    clips = _three_clips(tmp_path)
    with pytest.raises(DataError, match="encoder returned"):
        preprocess(clips, lambda audio: bad, "tok")
    assert not codes_path(clips[0].audio).exists()
    assert not sidecar_path(clips[0].audio).exists()


# --------------------------------------------------------------------------- BatchPlan


def test_batch_plan_is_deterministic_and_covers_every_example() -> None:
    rng = np.random.default_rng(0)
    examples = _fake_examples([int(x) for x in rng.integers(5, 200, size=23)])
    for sort in (True, False):
        plan = BatchPlan(examples, 4, seed=7, sort_by_length=sort)
        again = BatchPlan(examples, 4, seed=7, sort_by_length=sort)
        assert plan.num_batches == 6
        epochs = [plan.epoch_batches(e) for e in range(3)]
        assert epochs == [again.epoch_batches(e) for e in range(3)]
        assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
        assert epochs[0] != BatchPlan(examples, 4, seed=8, sort_by_length=sort).epoch_batches(0)
        for batches in epochs:
            assert len(batches) == 6
            assert sorted(i for b in batches for i in b) == list(range(23))
            assert sorted(len(b) for b in batches) == [3, 4, 4, 4, 4, 4]


def test_batch_plan_drop_last_and_no_shuffle() -> None:
    examples = _fake_examples(list(range(10, 33)))
    plan = BatchPlan(examples, 4, seed=1, drop_last=True)
    assert plan.num_batches == 5
    dropped = []
    for epoch in range(4):
        batches = plan.epoch_batches(epoch)
        flat = [i for b in batches for i in b]
        assert len(batches) == 5 and all(len(b) == 4 for b in batches)
        assert len(set(flat)) == 20
        dropped.append(set(range(23)) - set(flat))
    assert len({frozenset(d) for d in dropped}) > 1  # not always the same left-overs
    fixed = BatchPlan(examples, 5, seed=1, shuffle=False, sort_by_length=False)
    assert (
        fixed.epoch_batches(0)
        == fixed.epoch_batches(3)
        == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    )
    with pytest.raises(ValueError):
        BatchPlan(examples[:3], 4, seed=0, drop_last=True)


def test_length_sorted_batches_pad_less_than_random() -> None:
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(10, 400, size=64)]
    examples = _fake_examples(lengths)

    def padding(plan: BatchPlan) -> int:
        total = 0
        for batch in plan.epoch_batches(0):
            frames = [lengths[i] for i in batch]
            total += max(frames) * len(frames) - sum(frames)
        return total

    sorted_pad = padding(BatchPlan(examples, 8, seed=0, sort_by_length=True))
    random_pad = padding(BatchPlan(examples, 8, seed=0, sort_by_length=False))
    assert sorted_pad * 5 < random_pad
    for batch in BatchPlan(examples, 8, seed=0).epoch_batches(0):  # batches are contiguous buckets
        frames = sorted(lengths[i] for i in batch)
        others = [n for j, n in enumerate(lengths) if j not in batch]
        assert not any(frames[0] < n < frames[-1] for n in others)


def test_iterate_resumes_exactly() -> None:
    examples = _fake_examples(list(range(5, 28)))
    plan = BatchPlan(examples, 4, seed=11)
    stream = plan.iterate()
    reference = [next(stream) for _ in range(3 * plan.num_batches + 2)]
    positions = [(e, b) for e, b, _ in reference]
    assert positions[:7] == [(0, i) for i in range(6)] + [(1, 0)]
    for k, (epoch, index, batch) in enumerate(reference):
        assert [ex.clip.line - 1 for ex in batch] == plan.epoch_batches(epoch)[index]
        if k + 1 < len(reference):
            assert plan.next_position(epoch, index) == positions[k + 1]
    for start in (0, 4, 5, 6, 9, 13):
        epoch, index = positions[start]
        resumed = BatchPlan(examples, 4, seed=11).iterate(start_epoch=epoch, start_batch=index)
        for expected in reference[start:]:
            got = next(resumed)
            assert got[:2] == expected[:2]
            assert [ex.clip for ex in got[2]] == [ex.clip for ex in expected[2]]
    carried = plan.iterate(start_epoch=0, start_batch=plan.num_batches + 1)
    assert next(carried)[:2] == (1, 1)


# --------------------------------------------------------------------------- prefetch


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "voicefoundry-prefetch"]


def test_prefetch_yields_the_same_items() -> None:
    items = [np.full(3, i) for i in range(20)]
    out = list(prefetch(iter(items), size=2))
    assert len(out) == 20 and all(a is b for a, b in zip(out, items, strict=True))
    assert not any(t.is_alive() for t in _prefetch_threads())


def test_prefetch_propagates_exceptions() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("boom in the loader")

    got = []
    with pytest.raises(RuntimeError, match="boom in the loader"):
        for item in prefetch(source(), size=1):
            got.append(item)
    assert got == [1, 2]


def test_prefetch_thread_stops_after_close() -> None:
    closed = threading.Event()
    produced = []

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    baseline = threading.active_count()
    gen = prefetch(endless(), size=3)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(_prefetch_threads()) == 1 and threading.active_count() == baseline + 1
    time.sleep(0.05)
    assert len(produced) <= 5 + 3 + 1  # bounded read-ahead
    gen.close()
    assert not _prefetch_threads()
    assert threading.active_count() == baseline
    assert closed.is_set()  # the source generator was closed too

    plan = BatchPlan(_fake_examples(list(range(5, 15))), 3, seed=0)
    stream = prefetch(plan.iterate(), size=2)
    assert [next(stream)[:2] for _ in range(5)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    stream.close()
    assert not _prefetch_threads()
    with pytest.raises(ValueError):
        prefetch(iter([]), size=0)


# --------------------------------------------------------------------------- pad_codes


def test_pad_codes_shapes_and_mask() -> None:
    a = np.arange(3 * 16).reshape(3, 16)
    b = np.arange(5 * 16, dtype=np.int32).reshape(5, 16) + 100
    padded, mask = pad_codes([a, b], pad_value=2050)
    assert padded.shape == (2, 5, 16) and padded.dtype == np.int32
    assert mask.shape == (2, 5) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(padded[0, :3], a)
    assert (padded[0, 3:] == 2050).all()
    np.testing.assert_array_equal(padded[1], b)
    with pytest.raises(ValueError):
        pad_codes([a, np.zeros((4, 8), dtype=np.int32)], pad_value=0)
    with pytest.raises(ValueError):
        pad_codes([], pad_value=0)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_dataset_is_readable_and_deterministic(tmp_path: Path) -> None:
    train = synthetic_dataset(tmp_path / "a", 5, seed=3, with_ref=True)
    assert train == tmp_path / "a" / "train.jsonl"
    val = train.with_name("val.jsonl")
    clips = read_jsonl(train, strategy="speaker")
    val_clips = read_jsonl(val, strategy="speaker")
    assert len(clips) == 5 and len(val_clips) == 2
    assert not {c.audio for c in clips} & {c.audio for c in val_clips}
    spectra = []
    for clip in clips:
        info = sf.info(str(clip.audio))
        assert info.samplerate == SR and info.channels == 1
        assert 1.0 <= info.duration <= 2.0
        audio = load_audio(clip.audio)
        assert 0.05 < float(np.max(np.abs(audio))) <= 1.0
        assert clip.ref_audio == tmp_path / "a" / "ref.wav" and clip.text
        assert clip.language == "english"
        spectra.append(np.argmax(np.abs(np.fft.rfft(audio[:SR]))))
    assert len(set(spectra)) > 1  # different tone mixtures
    assert len(read_jsonl(train, strategy="language")) == 5

    again = synthetic_dataset(tmp_path / "b", 5, seed=3, with_ref=True)
    other = synthetic_dataset(tmp_path / "c", 5, seed=4, with_ref=True)
    names = ["train.jsonl", "val.jsonl", "ref.wav", "clip_000.wav", "clip_004.wav", "val_001.wav"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (again.parent / name).read_bytes()
    assert (tmp_path / "a" / "clip_000.wav").read_bytes() != (
        other.parent / "clip_000.wav"
    ).read_bytes()

    no_ref = synthetic_dataset(tmp_path / "d", 3, seed=0, with_ref=False, sr=16_000)
    assert not (no_ref.parent / "ref.wav").exists()
    assert len(read_jsonl(no_ref, strategy="language")) == 3
    with pytest.raises(DataError, match="ref_audio"):
        read_jsonl(no_ref, strategy="speaker")
    report = preprocess(read_jsonl(no_ref, strategy="language"), FakeEncoder(), "tok")
    assert report == PreprocessReport(encoded=3, skipped=0)
