"""PersonaPlex training data: paired agent / user audio + agent transcript -> 17 token streams.

A JSONL line is ``{"agent_audio": path, "user_audio": path | null, "text": "agent transcript"}``
(relative paths resolve against the JSONL file's folder). ``user_audio`` null means the user is
silent. Optional ``voice_prompt`` (audio path) and ``text_prompt`` (role text) are what the voice
is served with: training prepends the same prompt frames a session runs (`conditioning.py`).
A stereo ``agent_audio`` holds the whole conversation: left channel the user, right channel the
agent (``user_audio`` must then be null). Audio is resampled to 24 kHz mono.

Each stream is encoded with the model's Mimi (8 codebooks, one frame per 1920 samples) and
cached beside its audio as ``<file>.mimi-<channel>.npz`` (codes + per-frame level, the codec's
identity and the audio's sha256), so a later run skips the codec when nothing changed.

Text placement: Moshi's text stream holds one token per 80 ms frame, time-aligned with the
agent's speech, with PAD (3) elsewhere and EPAD (0) on the frame before a word starts. No forced
aligner is available here, so the transcript's SentencePiece tokens are spread evenly, in order,
over the agent's voiced frames (frame RMS within ``VOICED_RANGE_DB`` of the loudest frame and
above ``VOICED_FLOOR_DB``); with fewer voiced frames than tokens they are spread over all frames.
This is an approximation: it teaches the language, not precise word timing.

Numpy only (no MLX): the Mimi encoder and the tokenizer are passed in as callables.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.audio import TARGET_SAMPLE_RATE, AudioError, load_audio, write_wav
from finetune.data import DataError, PreprocessReport
from finetune.fsutil import atomic_write_bytes

import numpy as np
import soundfile as sf

FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one Mimi frame, one model step
MIMI_CODEBOOKS = 8
NUM_STREAMS = 1 + 2 * MIMI_CODEBOOKS  # text + agent + user
TEXT_PAD = 3
TEXT_EPAD = 0
PAD_CODE = -1  # Moshi's zero token: no input, no target
VOICED_FLOOR_DB = -50.0
VOICED_RANGE_DB = 35.0
CACHE_FORMAT = "voicefoundry.mimi-codes/1"

Channel = Literal["mono", "left", "right"]
Encoder = Callable[[np.ndarray], np.ndarray]  # 24 kHz mono float32 -> [T, 8] int codes

__all__ = [
    "DataError",
    "DuplexBatch",
    "DuplexClip",
    "DuplexExample",
    "StreamCodes",
    "TextTokenizer",
    "build_example",
    "cache_path",
    "load_stream",
    "pack",
    "place_text_tokens",
    "preprocess",
    "read_jsonl",
    "silence_codes",
    "synthetic_dataset",
    "voiced_frames",
]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DuplexClip:
    """One validated line. ``text`` is what BatchPlan sorts by together with the frames."""

    agent_audio: Path
    agent_channel: Channel  # "mono", or "right" for a stereo conversation
    user_audio: Path | None  # None: the user is silent
    user_channel: Channel | None  # "mono", "left" (stereo conversation) or None
    text: str
    duration_s: float
    line: int
    source: Path
    voice_prompt: Path | None = None  # the session's voice prompt (conditioning.py)
    text_prompt: str | None = None  # the session's role text

    @property
    def streams(self) -> list[tuple[Path, Channel]]:
        out: list[tuple[Path, Channel]] = [(self.agent_audio, self.agent_channel)]
        if self.user_audio is not None and self.user_channel is not None:
            out.append((self.user_audio, self.user_channel))
        return out


def read_jsonl(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    min_duration_s: float = 0.5,
    max_duration_s: float = 30.0,
) -> list[DuplexClip]:
    """Read and validate duplex JSONL files; one DataError lists every bad line."""
    files = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
    if not files:
        raise ValueError("read_jsonl needs at least one JSONL path")
    problems: list[str] = []
    clips: list[DuplexClip] = []
    for source in files:
        try:
            raw = source.read_bytes().removeprefix(b"\xef\xbb\xbf")
        except OSError as exc:
            problems.append(f"{source}: cannot read JSONL file ({exc.strerror or exc})")
            continue
        seen = 0
        for number, data in enumerate(raw.splitlines(), start=1):
            if not data.strip():
                continue
            seen += 1
            reasons: list[str] = []
            clip = _check_line(source, number, data, reasons, min_duration_s, max_duration_s)
            problems.extend(f"{source}:{number}: {reason}" for reason in reasons)
            if clip is not None and not reasons:
                clips.append(clip)
        if seen == 0:
            problems.append(f"{source}: no clips (the file has no non-blank lines)")
    if problems:
        raise DataError(problems)
    return clips


def _check_line(
    source: Path,
    number: int,
    data: bytes,
    reasons: list[str],
    min_s: float,
    max_s: float,
) -> DuplexClip | None:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reasons.append(f"not a valid JSON line ({exc})")
        return None
    if not isinstance(obj, dict):
        reasons.append(f"expected a JSON object, got {type(obj).__name__}")
        return None
    text = obj.get("text")
    if not isinstance(text, str):
        reasons.append("missing 'text'" if text is None else "'text' must be a string")
    elif not text.strip():
        reasons.append("'text' is empty")
    agent = _path_field(obj, "agent_audio", source.parent, reasons, required=True)
    user = _path_field(obj, "user_audio", source.parent, reasons, required=False)
    voice_prompt = _path_field(obj, "voice_prompt", source.parent, reasons, required=False)
    if voice_prompt is not None:
        _probe(voice_prompt, "voice_prompt", reasons)
    text_prompt = obj.get("text_prompt")
    if text_prompt is not None and not isinstance(text_prompt, str):
        reasons.append("'text_prompt' must be a string or null")
    agent_info = _probe(agent, "agent_audio", reasons) if agent is not None else None
    user_info = _probe(user, "user_audio", reasons) if user is not None else None
    if agent_info is None or (user is not None and user_info is None) or reasons:
        return None

    agent_channel: Channel = "mono"
    user_channel: Channel | None = "mono" if user is not None else None
    if agent_info[1] == 2:
        if user is not None:
            reasons.append(
                "agent_audio is stereo (left user, right agent) so 'user_audio' must be null"
            )
            return None
        agent_channel, user, user_channel = "right", agent, "left"
    elif agent_info[1] != 1:
        reasons.append(f"agent_audio has {agent_info[1]} channels; expected mono or stereo")
        return None
    duration = max(agent_info[0], user_info[0] if user_info else 0.0)
    if duration < min_s:
        reasons.append(f"clip is {duration:.2f} s, shorter than the minimum {min_s:g} s")
    elif duration > max_s:
        reasons.append(f"clip is {duration:.2f} s, longer than the maximum {max_s:g} s")
    if reasons or agent is None or not isinstance(text, str):
        return None
    return DuplexClip(
        agent_audio=agent,
        agent_channel=agent_channel,
        user_audio=user,
        user_channel=user_channel,
        text=text.strip(),
        duration_s=duration,
        line=number,
        source=source,
        voice_prompt=voice_prompt,
        text_prompt=text_prompt.strip() or None if isinstance(text_prompt, str) else None,
    )


def _path_field(
    obj: dict[str, Any], key: str, folder: Path, reasons: list[str], *, required: bool
) -> Path | None:
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        path = Path(value.strip()).expanduser()
        return Path(os.path.normpath((path if path.is_absolute() else folder / path).absolute()))
    if value is not None and not isinstance(value, str):
        reasons.append(f"'{key}' must be a string path or null, got {type(value).__name__}")
    elif required:
        reasons.append(f"{'empty' if value is not None else 'missing'} '{key}'")
    return None


def _probe(path: Path, key: str, reasons: list[str]) -> tuple[float, int] | None:
    """(duration in seconds, channels) from the file header."""
    if not path.is_file():
        reasons.append(f"{key}: {path}: file not found")
        return None
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        reasons.append(f"{key}: {path}: cannot decode audio ({exc})")
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        reasons.append(f"{key}: {path}: audio is empty")
        return None
    return info.frames / info.samplerate, int(info.channels)


# --------------------------------------------------------------------------- codes cache


@dataclass(frozen=True)
class StreamCodes:
    codes: np.ndarray  # [T, 8] int32
    frame_db: np.ndarray  # [T] float32: RMS level of each 80 ms frame, dBFS

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def cache_path(audio: Path, channel: Channel) -> Path:
    return audio.with_name(f"{audio.name}.mimi-{channel}.npz")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _load_channel(path: Path, channel: Channel) -> np.ndarray:
    if channel == "mono":
        return load_audio(path, TARGET_SAMPLE_RATE)
    stereo = load_audio(path, TARGET_SAMPLE_RATE, mono=False)
    if stereo.ndim != 2 or stereo.shape[1] != 2:
        raise AudioError(f"{path}: expected a stereo file (left user, right agent)")
    return np.ascontiguousarray(stereo[:, 0 if channel == "left" else 1])


def frame_levels(audio: np.ndarray, frames: int) -> np.ndarray:
    """RMS level (dBFS) of each 1920-sample frame, the audio zero-padded to `frames` frames."""
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float64)
    n = min(audio.shape[0], padded.shape[0])
    padded[:n] = audio[:n]
    power = np.mean(padded.reshape(frames, FRAME_SAMPLES) ** 2, axis=1)
    return (10.0 * np.log10(np.maximum(power, 1e-12))).astype(np.float32)


def encode_audio(audio: np.ndarray, encode: Encoder) -> StreamCodes:
    """Pad to whole frames, encode, check the codes' shape: ceil(samples / 1920) frames."""
    frames = max(1, math.ceil(audio.shape[0] / FRAME_SAMPLES))
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    codes = np.asarray(encode(padded))
    if codes.ndim != 2 or codes.shape[1] != MIMI_CODEBOOKS or codes.shape[0] < frames:
        raise ValueError(
            f"the Mimi encoder returned codes of shape {codes.shape}; "
            f"expected [{frames}, {MIMI_CODEBOOKS}]"
        )
    codes = codes[:frames]
    if codes.min() < 0 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError("the Mimi encoder returned negative or non-integer codes")
    return StreamCodes(codes.astype(np.int32), frame_levels(audio, frames))


def _read_cache(path: Path, codec_id: str, digest: str) -> StreamCodes | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if (
                str(data["format"]) != CACHE_FORMAT
                or str(data["codec"]) != codec_id
                or str(data["audio_sha256"]) != digest
            ):
                return None
            codes, levels = data["codes"], data["frame_db"]
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if codes.ndim != 2 or codes.shape[1] != MIMI_CODEBOOKS or levels.shape != codes.shape[:1]:
        return None
    return StreamCodes(codes.astype(np.int32), levels.astype(np.float32))


def _write_cache(path: Path, stream: StreamCodes, codec_id: str, digest: str) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(CACHE_FORMAT),
        codec=np.array(codec_id),
        audio_sha256=np.array(digest),
        codes=stream.codes,
        frame_db=stream.frame_db,
    )
    atomic_write_bytes(path, buffer.getvalue())


def preprocess(
    clips: Sequence[DuplexClip],
    encode: Encoder,
    codec_id: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> PreprocessReport:
    """Encode every distinct (audio file, channel) of `clips` once; cache the codes beside it."""
    streams = list(dict.fromkeys(s for clip in clips for s in clip.streams))
    encoded = skipped = 0
    problems: list[str] = []
    for done, (audio, channel) in enumerate(streams, start=1):
        try:
            digest = _sha256(audio)
            if _read_cache(cache_path(audio, channel), codec_id, digest) is not None:
                skipped += 1
            else:
                stream = encode_audio(_load_channel(audio, channel), encode)
                _write_cache(cache_path(audio, channel), stream, codec_id, digest)
                encoded += 1
        except (OSError, AudioError, ValueError) as exc:
            problems.append(f"{audio} ({channel}): {exc}")
        if progress is not None:
            progress(done, len(streams))
    if problems:
        raise DataError(problems)
    return PreprocessReport(encoded=encoded, skipped=skipped)


def load_stream(audio: Path, channel: Channel, codec_id: str) -> StreamCodes:
    """The cached codes of one stream; DataError if missing or stale (run preprocess)."""
    try:
        digest = _sha256(audio)
    except OSError as exc:
        raise DataError([f"cannot read audio {audio} ({exc})"]) from exc
    stream = _read_cache(cache_path(audio, channel), codec_id, digest)
    if stream is None:
        raise DataError([f"{audio} ({channel}): no current Mimi codes cache; run preprocess"])
    return stream


def silence_codes(encode: Encoder, frames: int) -> np.ndarray:
    """[frames, 8] codes of digital silence: the user stream of a line without user audio."""
    return encode_audio(np.zeros(frames * FRAME_SAMPLES, dtype=np.float32), encode).codes


# --------------------------------------------------------------------------- text placement


def voiced_frames(frame_db: np.ndarray) -> np.ndarray:
    """Frames loud enough to hold speech: within VOICED_RANGE_DB of the loudest, above the floor."""
    if frame_db.size == 0:
        return np.zeros(0, dtype=bool)
    threshold = max(VOICED_FLOOR_DB, float(frame_db.max()) - VOICED_RANGE_DB)
    return frame_db >= threshold


def place_text_tokens(
    tokens: Sequence[int],
    voiced: np.ndarray,
    *,
    word_starts: Sequence[bool] | None = None,
    pad_id: int = TEXT_PAD,
    epad_id: int = TEXT_EPAD,
) -> np.ndarray:
    """[T] text stream: `tokens` in order, evenly over the voiced frames, PAD elsewhere, EPAD
    on the padding frame right before a word's first token. ValueError if they cannot fit."""
    frames = voiced.shape[0]
    n = len(tokens)
    if n > frames:
        raise ValueError(
            f"the text has {n} tokens but the audio only {frames} frames "
            "(at most one text token per 80 ms frame)"
        )
    slots = np.flatnonzero(voiced)
    if slots.size < n:
        slots = np.arange(frames)
    stream = np.full(frames, pad_id, dtype=np.int32)
    positions = slots[(np.arange(n) * slots.size) // max(n, 1)]
    stream[positions] = np.asarray(tokens, dtype=np.int32)
    starts = [True] * n if word_starts is None else list(word_starts)
    for position, start in zip(positions, starts, strict=True):
        if start and position > 0 and stream[position - 1] == pad_id:
            stream[position - 1] = epad_id
    return stream


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TextTokenizer:
    """What placement needs from the SentencePiece model."""

    encode: Callable[[str], list[int]]
    word_start: Callable[[int], bool]
    pad_id: int = TEXT_PAD
    epad_id: int = TEXT_EPAD

    @classmethod
    def from_sentencepiece(cls, processor: Any, *, pad_id: int = TEXT_PAD) -> TextTokenizer:
        return cls(
            encode=lambda text: list(processor.encode(text)),
            word_start=lambda token: processor.id_to_piece(token).startswith("\u2581"),
            pad_id=pad_id,
        )


@dataclass
class DuplexExample:
    clip: DuplexClip
    codes: np.ndarray  # [T, 17] int32: text, agent codebooks 1-8, user codebooks 1-8
    prompt_frames: int = 0  # leading frames of forced conditioning: no loss

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def build_example(
    clip: DuplexClip,
    agent: StreamCodes,
    user: StreamCodes | None,
    silence: np.ndarray,
    tokenizer: TextTokenizer,
    *,
    max_frames: int,
    prefix: Callable[[np.ndarray], tuple[np.ndarray, int]] | None = None,
) -> DuplexExample:
    """Align the streams (the shorter padded with silence codes), place the text, clip.

    `prefix` turns the exchange's [T, 17] codes into the sequence a session reads (with its
    prompt frames first) and their count: `conditioning.conditioned_codes` for this clip."""
    frames = max(agent.frames, user.frames if user is not None else 0)
    if silence.shape[0] < frames:
        raise ValueError(f"silence codes cover {silence.shape[0]} frames, {frames} needed")

    def fill(stream: StreamCodes | None) -> np.ndarray:
        out = silence[:frames].copy()
        if stream is not None:
            out[: stream.frames] = stream.codes
        return out

    levels = np.full(frames, -120.0, dtype=np.float32)
    levels[: agent.frames] = agent.frame_db
    # <unk> shares id 0 with EPAD: unknown characters are dropped rather than read as EPAD.
    special = (tokenizer.pad_id, tokenizer.epad_id)
    tokens = [t for t in tokenizer.encode(clip.text) if t not in special]
    where = f"{clip.source}:{clip.line}"
    if not tokens:
        raise DataError([f"{where}: the text encodes to no tokens"])
    try:
        text = place_text_tokens(
            tokens,
            voiced_frames(levels),
            word_starts=[tokenizer.word_start(t) for t in tokens],
            pad_id=tokenizer.pad_id,
            epad_id=tokenizer.epad_id,
        )
    except ValueError as exc:
        raise DataError([f"{where}: {exc}"]) from exc
    codes = np.concatenate([text[:, None], fill(agent), fill(user)], axis=1)
    prompt = 0
    if prefix is not None:
        codes, prompt = prefix(codes)
    if prompt >= max_frames:
        raise DataError([f"{where}: the prompts fill the model's {max_frames}-frame context"])
    codes = np.ascontiguousarray(codes[:max_frames], np.int32)
    return DuplexExample(clip=clip, codes=codes, prompt_frames=prompt)


@dataclass
class DuplexBatch:
    codes: np.ndarray  # [B, 17, T] int32, PAD_CODE after each example's end
    size: int
    loss_from: np.ndarray | None = None  # [B] int: first frame with a loss (after the prompts)


def pack(examples: Sequence[DuplexExample]) -> DuplexBatch:
    if not examples:
        raise ValueError("pack needs at least one example")
    frames = max(ex.frames for ex in examples)
    codes = np.full((len(examples), NUM_STREAMS, frames), PAD_CODE, dtype=np.int32)
    for i, ex in enumerate(examples):
        codes[i, :, : ex.frames] = ex.codes.T
    loss_from = np.asarray([ex.prompt_frames for ex in examples], dtype=np.int64)
    return DuplexBatch(codes=codes, size=len(examples), loss_from=loss_from)


# --------------------------------------------------------------------------- synthetic data

_SENTENCES = (  # short: at most one text token fits in each 80 ms frame
    "The teacher can help.",
    "You enjoy music.",
    "Your friend likes films.",
    "They discuss a new project.",
    "We talk about cooking.",
    "The train is late.",
)


def _speechlike(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """Harmonic bursts ("words") separated by short silences, with light noise."""
    n = round(seconds * sr)
    t = np.arange(n) / sr
    audio = np.zeros(n)
    position = int(rng.integers(sr // 20, sr // 8))
    while position < n - sr // 10:
        length = int(rng.integers(sr // 6, sr // 2))
        end = min(n, position + length)
        f0 = float(rng.uniform(100.0, 240.0))
        span = t[position:end]
        burst = sum(np.sin(2 * np.pi * f0 * h * span) / h for h in (1, 2, 3))
        audio[position:end] = burst * np.hanning(end - position)
        position = end + int(rng.integers(sr // 12, sr // 4))
    audio = 0.4 * audio / max(float(np.abs(audio).max()), 1e-9)
    return (audio + 0.002 * rng.standard_normal(n)).astype(np.float32)


def synthetic_dataset(
    out_dir: Path, n_clips: int, *, seed: int, min_s: float = 1.2, max_s: float = 2.0
) -> Path:
    """A tiny deterministic duplex dataset; returns ``train.jsonl`` (``val.jsonl`` beside it).

    Lines alternate between a silent user (null), a separate user file and one stereo
    conversation file, so every input form is exercised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xD0])
    sr = TARGET_SAMPLE_RATE

    def split(name: str, prefix: str, count: int) -> Path:
        rows = []
        for i in range(count):
            seconds = float(rng.uniform(min_s, max_s))
            agent = _speechlike(rng, seconds, sr)
            row: dict[str, Any] = {"text": _SENTENCES[int(rng.integers(len(_SENTENCES)))]}
            kind = i % 3
            if kind == 2:
                stereo = np.stack([_speechlike(rng, seconds, sr) * 0.5, agent], axis=1)
                sf.write(out / f"{prefix}_{i:03d}_conv.wav", stereo, sr, subtype="PCM_16")
                row.update(agent_audio=f"{prefix}_{i:03d}_conv.wav", user_audio=None)
            else:
                write_wav(out / f"{prefix}_{i:03d}_agent.wav", agent, sr)
                row.update(agent_audio=f"{prefix}_{i:03d}_agent.wav", user_audio=None)
                if kind == 1:
                    user = _speechlike(rng, seconds * 0.8, sr) * 0.5
                    write_wav(out / f"{prefix}_{i:03d}_user.wav", user, sr)
                    row["user_audio"] = f"{prefix}_{i:03d}_user.wav"
            rows.append(json.dumps(row))
        path = out / name
        atomic_write_bytes(path, ("\n".join(rows) + "\n").encode("utf-8"))
        return path

    train = split("train.jsonl", "clip", n_clips)
    split("val.jsonl", "val", 2)
    return train
