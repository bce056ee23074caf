"""Training data: JSONL clips -> validated clips -> cached codec codes -> deterministic batches.

Model-agnostic: the speech-tokenizer encoder is passed in as a plain callable
(``float32 audio at 24 kHz -> int codes [T, num_codebooks]``), so this module never imports MLX.
Everything here is numpy; :func:`prefetch` runs a (numpy-only) iterator on a background thread,
never MLX work (MLX streams are per thread).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from finetune.audio import TARGET_SAMPLE_RATE, AudioError, duration_s, load_audio, write_wav
from finetune.fsutil import atomic_write_bytes

import numpy as np
import soundfile as sf

__all__ = [
    "NUM_CODEBOOKS",
    "STRATEGIES",
    "BatchPlan",
    "Clip",
    "DataError",
    "Example",
    "PreprocessReport",
    "codes_path",
    "load_codes",
    "load_examples",
    "pad_codes",
    "prefetch",
    "preprocess",
    "read_jsonl",
    "sidecar_path",
    "synthetic_dataset",
]

NUM_CODEBOOKS = 16
STRATEGIES = ("language", "speaker")

T = TypeVar("T")
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- clips and errors


@dataclass(frozen=True)
class Clip:
    """One validated training line: absolute paths, stripped text, where it came from."""

    audio: Path
    text: str
    ref_audio: Path | None
    language: str | None
    line: int  # 1-based line number in ``source``
    source: Path  # the JSONL file


class DataError(ValueError):
    """Bad training data; ``problems`` holds every problem as ``"{file}:{line}: {reason}"``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the training data:"
        super().__init__("\n  ".join([head, *self.problems]))


def read_jsonl(
    paths: PathLike | Iterable[PathLike],
    *,
    strategy: str,
    min_duration_s: float = 0.5,
    max_duration_s: float = 30.0,
) -> list[Clip]:
    """Read and validate JSONL training files; raise one DataError listing every bad line.

    Each non-blank line is a JSON object with ``audio`` and ``text`` and optionally
    ``ref_audio`` and ``language`` (other keys are ignored). Relative paths resolve against the
    JSONL file's folder. ``strategy="speaker"`` requires ``ref_audio`` on every line.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not 0.0 <= min_duration_s <= max_duration_s:
        raise ValueError(
            f"need 0 <= min_duration_s <= max_duration_s, got {min_duration_s}, {max_duration_s}"
        )
    files = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    if not files:
        raise ValueError("read_jsonl needs at least one JSONL path")
    checker = _LineChecker(strategy, min_duration_s, max_duration_s)
    clips: list[Clip] = []
    for source in files:
        clips.extend(checker.read_file(source))
    if checker.problems:
        raise DataError(checker.problems)
    return clips


class _LineChecker:
    """Validates lines, collecting problems; audio probes are cached per path."""

    def __init__(self, strategy: str, min_s: float, max_s: float) -> None:
        self.strategy = strategy
        self.min_s = min_s
        self.max_s = max_s
        self.problems: list[str] = []
        self._durations: dict[Path, float | AudioError] = {}

    def read_file(self, source: Path) -> list[Clip]:
        try:
            raw = source.read_bytes()
        except OSError as exc:
            self.problems.append(f"{source}: cannot read JSONL file ({exc.strerror or exc})")
            return []
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 byte-order mark
        clips: list[Clip] = []
        seen_lines = 0
        # bytes.splitlines breaks only on \n, \r\n and \r, so numbers match what editors show.
        for number, data in enumerate(raw.splitlines(), start=1):
            if not data.strip():
                continue
            seen_lines += 1
            reasons: list[str] = []
            clip = self._check_line(source, number, data, reasons)
            self.problems.extend(f"{source}:{number}: {reason}" for reason in reasons)
            if clip is not None and not reasons:
                clips.append(clip)
        if seen_lines == 0:
            self.problems.append(f"{source}: no clips (the file has no non-blank lines)")
        return clips

    def _check_line(
        self, source: Path, number: int, data: bytes, reasons: list[str]
    ) -> Clip | None:
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            reasons.append("line is not valid UTF-8")
            return None
        except json.JSONDecodeError as exc:
            reasons.append(f"invalid JSON ({exc.msg} at column {exc.colno})")
            return None
        if not isinstance(obj, dict):
            reasons.append(f"expected a JSON object, got {type(obj).__name__}")
            return None

        folder = source.parent
        audio = self._path_field(obj, "audio", folder, reasons, required=True)
        text = obj.get("text")
        if text is None:
            reasons.append("missing 'text'")
        elif not isinstance(text, str):
            reasons.append(f"'text' must be a string, got {type(text).__name__}")
        elif not text.strip():
            reasons.append("'text' is empty")
        language = obj.get("language")
        if language is not None and not isinstance(language, str):
            reasons.append(f"'language' must be a string, got {type(language).__name__}")
            language = None

        if audio is not None:
            self._check_audio(audio, reasons)
        ref = self._path_field(
            obj, "ref_audio", folder, reasons, required=self.strategy == "speaker"
        )
        if ref is not None:
            self._check_ref(ref, reasons)

        if reasons or audio is None or not isinstance(text, str):
            return None
        return Clip(
            audio=audio,
            text=text.strip(),
            ref_audio=ref,
            language=(language.strip() or None) if isinstance(language, str) else None,
            line=number,
            source=source,
        )

    def _path_field(
        self, obj: dict[str, Any], key: str, folder: Path, reasons: list[str], *, required: bool
    ) -> Path | None:
        """The resolved path in ``obj[key]``; a missing or empty optional path is None."""
        value = obj.get(key)
        why = " (strategy 'speaker' needs it on every line)" if key == "ref_audio" else ""
        if isinstance(value, str) and value.strip():
            return _resolve(value.strip(), folder)
        if value is not None and not isinstance(value, str):
            reasons.append(f"'{key}' must be a string path, got {type(value).__name__}")
        elif required:
            reasons.append(f"{'empty' if value is not None else 'missing'} '{key}'{why}")
        return None

    def _duration(self, path: Path) -> float | AudioError:
        if path not in self._durations:
            try:
                self._durations[path] = _probe_duration(path)
            except AudioError as exc:
                self._durations[path] = exc
        return self._durations[path]

    def _check_audio(self, path: Path, reasons: list[str]) -> None:
        measured = self._duration(path)
        if isinstance(measured, AudioError):
            reasons.append(f"audio: {measured}")
        elif measured < self.min_s:
            reasons.append(
                f"audio {path.name} is {measured:.2f} s, shorter than the minimum {self.min_s:g} s"
            )
        elif measured > self.max_s:
            reasons.append(
                f"audio {path.name} is {measured:.2f} s, longer than the maximum {self.max_s:g} s"
            )

    def _check_ref(self, path: Path, reasons: list[str]) -> None:
        measured = self._duration(path)
        if isinstance(measured, AudioError):
            reasons.append(f"ref_audio: {measured}")


def _resolve(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = folder / path
    return Path(os.path.normpath(path.absolute()))


def _probe_duration(path: Path) -> float:
    """Duration from the header (soundfile.info); decode the whole file only as a fallback."""
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if not path.is_file():
        raise AudioError(f"{path}: not a regular file")
    try:
        info = sf.info(str(path))
        if info.frames > 0 and info.samplerate > 0:
            return float(info.frames) / float(info.samplerate)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError):
        pass
    return duration_s(load_audio(path, TARGET_SAMPLE_RATE), TARGET_SAMPLE_RATE)


# --------------------------------------------------------------------------- codes cache


@dataclass(frozen=True)
class PreprocessReport:
    """Distinct audio files encoded now and skipped because their cache was current."""

    encoded: int
    skipped: int


def codes_path(clip_audio: Path) -> Path:
    """Cache file of an audio file's codes: ``a.wav`` -> ``a.codec.npy`` beside it."""
    return Path(clip_audio).with_suffix(".codec.npy")


def sidecar_path(clip_audio: Path) -> Path:
    """Sidecar of the codes cache: ``a.wav`` -> ``a.codec.json`` (tokenizer, sha256, frames)."""
    return Path(clip_audio).with_suffix(".codec.json")


def preprocess(
    clips: Sequence[Clip],
    encode: Callable[[np.ndarray], np.ndarray],
    tokenizer_id: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    num_codebooks: int = NUM_CODEBOOKS,
) -> PreprocessReport:
    """Encode every distinct audio file of ``clips`` once and cache the codes beside it.

    A file is skipped when its sidecar names ``tokenizer_id`` and the audio's current sha256.
    ``encode`` gets float32 mono audio at 24 kHz and must return integer codes
    ``[T, num_codebooks]`` (T >= 1, non-negative, fits int32). ``progress(done, total)`` is called
    after each distinct file. Audio that fails to load is reported all at once (DataError).
    """
    first: dict[Path, Clip] = {}
    for clip in clips:
        first.setdefault(clip.audio, clip)
    owners: dict[Path, Path] = {}
    clashes: list[str] = []
    for audio, clip in first.items():
        other = owners.setdefault(codes_path(audio), audio)
        if other != audio:
            clashes.append(
                f"{clip.source}:{clip.line}: {audio.name} and {other.name} would share the "
                f"codes cache {codes_path(audio).name}; rename one of them"
            )
    if clashes:
        raise DataError(clashes)

    total = len(first)
    encoded = skipped = 0
    problems: list[str] = []
    for done, (audio, clip) in enumerate(first.items(), start=1):
        where = f"{clip.source}:{clip.line}"
        try:
            digest = _sha256(audio)
        except OSError as exc:
            problems.append(f"{where}: cannot read audio {audio} ({exc.strerror or exc})")
            digest = None
        if digest is not None and _cache_reason(audio, tokenizer_id, digest, num_codebooks) is None:
            skipped += 1
        elif digest is not None:
            try:
                samples = load_audio(audio, TARGET_SAMPLE_RATE)
            except AudioError as exc:
                problems.append(f"{where}: audio: {exc}")
            else:
                codes = _check_codes(encode(samples), num_codebooks, where)
                _write_cache(audio, codes, tokenizer_id, digest)
                encoded += 1
        if progress is not None:
            progress(done, total)
    if problems:
        raise DataError(problems)
    return PreprocessReport(encoded=encoded, skipped=skipped)


def load_codes(
    clip: Clip,
    tokenizer_id: str,
    *,
    num_codebooks: int = NUM_CODEBOOKS,
    verify_audio: bool = True,
) -> np.ndarray:
    """The cached codes ``[T, num_codebooks]`` int32 of ``clip``; DataError if missing or stale.

    ``verify_audio`` re-hashes the audio file to catch a clip changed after preprocessing.
    """
    digest: str | None = None
    if verify_audio:
        try:
            digest = _sha256(clip.audio)
        except OSError as exc:
            raise DataError(
                [f"{clip.source}:{clip.line}: cannot read audio {clip.audio} ({exc})"]
            ) from exc
    reason = _cache_reason(clip.audio, tokenizer_id, digest, num_codebooks)
    if reason is not None:
        where = f"{clip.source}:{clip.line}"
        raise DataError([f"{where}: codes cache of {clip.audio.name} {reason}; run preprocess"])
    return np.load(codes_path(clip.audio), allow_pickle=False)


def load_examples(
    clips: Sequence[Clip], tokenizer_id: str, *, num_codebooks: int = NUM_CODEBOOKS
) -> list[Example]:
    """:func:`load_codes` for every clip; one DataError listing every missing or stale cache."""
    examples: list[Example] = []
    problems: list[str] = []
    loaded: dict[Path, np.ndarray] = {}  # clips sharing an audio file share its codes
    for clip in clips:
        try:
            if clip.audio not in loaded:
                loaded[clip.audio] = load_codes(clip, tokenizer_id, num_codebooks=num_codebooks)
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        examples.append(Example(clip=clip, codes=loaded[clip.audio]))
    if problems:
        raise DataError(problems)
    return examples


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _cache_reason(
    audio: Path, tokenizer_id: str, digest: str | None, num_codebooks: int
) -> str | None:
    """Why the cache of ``audio`` is not usable, or None when it is (``digest`` None: unchecked)."""
    side, npy = sidecar_path(audio), codes_path(audio)
    if not side.is_file() or not npy.is_file():
        return "is missing"
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "has an unreadable sidecar"
    if not isinstance(meta, dict):
        return "has an unreadable sidecar"
    if meta.get("tokenizer") != tokenizer_id:
        return f"was made by tokenizer {meta.get('tokenizer')!r}, not {tokenizer_id!r}"
    if digest is not None and meta.get("audio_sha256") != digest:
        return "is stale (the audio changed since it was encoded)"
    try:
        codes = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return "has an unreadable .npy"
    if codes.dtype != np.int32 or codes.ndim != 2 or codes.shape[1] != num_codebooks:
        return f"holds {codes.dtype} {codes.shape}, not int32 [T, {num_codebooks}]"
    if meta.get("frames") != codes.shape[0]:
        return "does not match its sidecar's frame count"
    return None


def _check_codes(codes: Any, num_codebooks: int, where: str) -> np.ndarray:
    arr = np.asarray(codes)
    problem = None
    if arr.ndim != 2 or arr.shape[1] != num_codebooks or arr.shape[0] == 0:
        problem = f"shape {arr.shape}, expected [T>=1, {num_codebooks}]"
    elif not np.issubdtype(arr.dtype, np.integer):
        problem = f"dtype {arr.dtype}, expected integers"
    elif int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.int32).max:
        problem = f"values in [{int(arr.min())}, {int(arr.max())}], expected 0 <= code < 2**31"
    if problem is not None:
        raise DataError([f"{where}: the encoder returned codes of {problem}"])
    return np.ascontiguousarray(arr, dtype=np.int32)


def _atomic_write(dest: Path, data: bytes) -> None:
    atomic_write_bytes(dest, data)


def _write_cache(audio: Path, codes: np.ndarray, tokenizer_id: str, digest: str) -> None:
    """The .npy first, then the sidecar: a sidecar only ever describes a complete .npy."""
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    _atomic_write(codes_path(audio), buffer.getvalue())
    meta = {"tokenizer": tokenizer_id, "audio_sha256": digest, "frames": int(codes.shape[0])}
    _atomic_write(sidecar_path(audio), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- batching


@dataclass
class Example:
    """A clip with its codes ``[T, num_codebooks]`` int32."""

    clip: Clip
    codes: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


class _Transcribed(Protocol):
    @property
    def text(self) -> str: ...


class Batchable(Protocol):
    """What batching reads of an example: its length in frames and its clip's text."""

    @property
    def frames(self) -> int: ...

    @property
    def clip(self) -> _Transcribed: ...


ExampleT = TypeVar("ExampleT", bound=Batchable)


class BatchPlan(Generic[ExampleT]):
    """Deterministic, resumable batches: the same seed gives the same batches in every run.

    With ``sort_by_length`` examples are sorted by ``frames + len(text)`` and chunked into
    batches of similar length (little padding); only the order of the batches is shuffled, with
    ``np.random.default_rng([seed, epoch])``. Without it the indices are shuffled, then chunked.
    With ``drop_last`` the ``len % batch_size`` left-over examples are left out of the epoch
    (random ones when shuffling, so every example is still seen across epochs).
    """

    def __init__(
        self,
        examples: Sequence[ExampleT],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        sort_by_length: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.sort_by_length = sort_by_length
        self.drop_last = drop_last
        n = len(self.examples)
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{n} examples make no batch of {batch_size}"
                + (" with drop_last" if drop_last and n else "")
            )
        lengths = np.array([ex.frames + len(ex.clip.text) for ex in self.examples], np.int64)
        self._sorted = np.argsort(lengths, kind="stable")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` as lists of indices into ``examples``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n, size = len(self.examples), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        leftover = n % size if self.drop_last else 0
        if self.sort_by_length:
            order = self._sorted
            if leftover:
                if self.shuffle:
                    drop = rng.choice(n, size=leftover, replace=False)
                    order = np.delete(order, drop)
                else:
                    order = order[: n - leftover]
            batches = [order[i : i + size] for i in range(0, len(order), size)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            order = order[: n - leftover]
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        return [[int(i) for i in batch] for batch in batches]

    def next_position(self, epoch: int, batch_index: int) -> tuple[int, int]:
        """The (epoch, batch_index) after the given batch: what a checkpoint stores to resume."""
        return divmod(epoch * self.num_batches + batch_index + 1, self.num_batches)

    def iterate(
        self, start_epoch: int = 0, start_batch: int = 0
    ) -> Iterator[tuple[int, int, list[ExampleT]]]:
        """Yield ``(epoch, batch_index, examples)`` forever, starting exactly at the position.

        ``start_batch`` past the end of an epoch carries over into the following epochs.
        """
        if start_epoch < 0 or start_batch < 0:
            raise ValueError(f"cannot start at epoch {start_epoch}, batch {start_batch}")
        epoch, batch_index = divmod(start_epoch * self.num_batches + start_batch, self.num_batches)
        return self._iterate(epoch, batch_index)

    def _iterate(self, epoch: int, first: int) -> Iterator[tuple[int, int, list[ExampleT]]]:
        while True:
            batches = self.epoch_batches(epoch)
            for index in range(first, len(batches)):
                yield epoch, index, [self.examples[i] for i in batches[index]]
            epoch, first = epoch + 1, 0


def pad_codes(codes: Sequence[np.ndarray], pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``[T_i, K]`` codes into ``padded [B, T_max, K]`` int32 and ``mask [B, T_max]`` bool.

    ``mask`` is True on real frames; padding frames hold ``pad_value``.
    """
    if len(codes) == 0:
        raise ValueError("pad_codes needs at least one array")
    arrays = [np.asarray(c) for c in codes]
    k = arrays[0].shape[1] if arrays[0].ndim == 2 else -1
    for i, arr in enumerate(arrays):
        if arr.ndim != 2 or arr.shape[1] != k:
            raise ValueError(f"codes[{i}] has shape {arr.shape}; expected [T, {k}] for all")
    t_max = max(arr.shape[0] for arr in arrays)
    padded = np.full((len(arrays), t_max, k), pad_value, dtype=np.int32)
    mask = np.zeros((len(arrays), t_max), dtype=bool)
    for i, arr in enumerate(arrays):
        padded[i, : arr.shape[0]] = arr
        mask[i, : arr.shape[0]] = True
    return padded, mask


# --------------------------------------------------------------------------- prefetch

_PREFETCH_THREAD_NAME = "voicefoundry-prefetch"
_ITEM, _DONE, _ERROR = 0, 1, 2


def prefetch(iterator: Iterable[T], size: int = 2, *, join_timeout_s: float = 5.0) -> Iterator[T]:
    """Run ``iterator`` on a background daemon thread, keeping up to ``size`` items ready.

    Exceptions of the source are re-raised in the consumer. Closing the returned generator (or
    dropping it) stops the thread and closes the source. Keep MLX work out of the source: MLX
    streams are per thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    return _prefetch(iter(iterator), size, join_timeout_s)


def _prefetch(source: Iterator[T], size: int, join_timeout_s: float) -> Iterator[T]:
    slots: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(message: tuple[int, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((_ERROR, exc))
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()

    thread = threading.Thread(target=work, name=_PREFETCH_THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()
        while True:  # free the queue so a blocked put returns at once
            try:
                slots.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=join_timeout_s)


# --------------------------------------------------------------------------- synthetic data

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get this message.",
    "It is a bright and sunny morning today.",
    "The train to the city leaves at nine.",
    "She sells sea shells by the sea shore.",
    "Every small step counts on a long journey.",
    "We will meet again next week at noon.",
    "Turn left at the second traffic light.",
    "A cup of tea would be lovely right now.",
    "The library closes early on Sundays.",
    "Can you hear the rain on the roof?",
    "Thank you for waiting, your order is ready.",
)


def synthetic_dataset(
    out_dir: Path,
    n_clips: int,
    *,
    seed: int,
    with_ref: bool,
    sr: int = TARGET_SAMPLE_RATE,
    min_s: float = 1.0,
    max_s: float = 2.0,
) -> Path:
    """Write a tiny deterministic dataset of tone clips; return the ``train.jsonl`` path.

    ``out_dir`` gets ``clip_NNN.wav`` (train), ``val_NNN.wav`` (2 clips, ``val.jsonl``), and
    ``ref.wav`` when ``with_ref`` (then every line names it as ``ref_audio``). JSONL paths are
    relative to ``out_dir``. The same seed writes the same bytes.
    """
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    if not 0.0 < min_s <= max_s:
        raise ValueError(f"need 0 < min_s <= max_s, got {min_s}, {max_s}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x5EED])
    if with_ref:
        write_wav(out / "ref.wav", _tone_clip(rng, max(3.0, max_s), sr), sr)

    def split(name: str, prefix: str, count: int) -> Path:
        lines = []
        for i in range(count):
            wav = f"{prefix}_{i:03d}.wav"
            seconds = float(rng.uniform(min_s, max_s))
            write_wav(out / wav, _tone_clip(rng, seconds, sr), sr)
            row: dict[str, str] = {
                "audio": wav,
                "text": _SENTENCES[int(rng.integers(len(_SENTENCES)))],
                "language": "english",
            }
            if with_ref:
                row["ref_audio"] = "ref.wav"
            lines.append(json.dumps(row))
        path = out / name
        _atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return path

    train = split("train.jsonl", "clip", n_clips)
    split("val.jsonl", "val", 2)
    return train


def _tone_clip(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """A few harmonics of a random fundamental with a gliding pitch, a fade, and light noise."""
    n = max(1, math.floor(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    f0 = float(rng.uniform(90.0, 260.0))
    glide = 1.0 + float(rng.uniform(-0.15, 0.15)) * t / max(seconds, 1e-9)
    phase = 2.0 * np.pi * f0 * np.cumsum(glide) / sr
    audio = np.zeros(n)
    for harmonic in range(1, int(rng.integers(2, 5)) + 1):
        audio += float(rng.uniform(0.2, 1.0)) / harmonic * np.sin(harmonic * phase)
    fade = min(n // 2, round(0.02 * sr))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        audio[:fade] *= ramp
        audio[n - fade :] *= ramp[::-1]
    audio *= 0.5 / max(float(np.max(np.abs(audio))), 1e-9)
    audio += 0.01 * rng.standard_normal(n)
    return audio.astype(np.float32)
