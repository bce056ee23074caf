"""A fine-tune upload -> a typed `JobRequest`: fields checked, clips decoded to 24 kHz WAVs and
measured, transcripts matched to clips. Every refusal is a 4xx with the reason (all problems of
the clips at once); what model families need of the data comes from their `Family`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune.audio import AudioError, duration_s, load_audio, write_wav
from finetune.families import Family, all_strategies, families_with, get_family

import msgspec

from server.errors import Unprocessable
from server.registry import validate_name
from server.settings import Settings
from server.uploads import Upload, UploadedFile

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".oga", ".opus")
MIN_CLIP_S, MAX_CLIP_S = 0.5, 30.0
MAX_TEXT_PROMPT_CHARS = 2000

# Bounds a client may pick hyper-parameters within.
BOUNDS: dict[str, tuple[type, float, float]] = {
    "lora_rank": (int, 1, 64),
    "epochs": (int, 1, 50),
    "max_steps": (int, 1, 100_000),
    "learning_rate": (float, 1e-7, 5e-3),
    "batch_size": (int, 1, 8),
    "grad_accumulation": (int, 1, 64),
    "label_smoothing": (float, 0.0, 0.5),
    "lora_dropout": (float, 0.0, 0.5),
    "save_every": (int, 10, 100_000),  # steps between checkpoints (each gets a quality report)
    # CSM: share of audio frames its depth decoder trains on per batch (the recipe's 1/16 is
    # Sesame's amortisation for large data; a few short clips want 1.0).
    "decoder_frame_fraction": (float, 0.01, 1.0),
}
FLAGS = ("train_code_predictor",)  # booleans: true / false


class TrainClip(msgspec.Struct, frozen=True):
    audio: Path  # a 24 kHz mono WAV in the job's folder
    text: str


class JobRequest(msgspec.Struct, kw_only=True):
    """A checked upload: everything a job is made from."""

    name: str
    base_model: str
    family: str
    strategy: str
    language: str | None
    clips: list[TrainClip]
    refs: list[Path]
    hyper: dict[str, Any]  # within BOUNDS / FLAGS
    user_clips: list[Path] = msgspec.field(default_factory=list)  # duplex: the user's side
    text_prompt: str | None = None

    def rebased(self, old: Path, new: Path) -> JobRequest:
        """The same request with its files moved from folder `old` to `new`."""

        def move(p: Path) -> Path:
            return new / p.relative_to(old)

        return msgspec.structs.replace(
            self,
            clips=[TrainClip(move(c.audio), c.text) for c in self.clips],
            refs=[move(p) for p in self.refs],
            user_clips=[move(p) for p in self.user_clips],
        )


class SavedClip(msgspec.Struct, frozen=True):
    item: UploadedFile
    path: Path
    seconds: float


class Intake:
    """Reads uploads against the models this server has loaded."""

    def __init__(
        self,
        models_for: Callable[[str], Mapping[str, Any]],
        check_name_free: Callable[[str], None],
        settings: Settings,
    ) -> None:
        self.models_for = models_for
        self.check_name_free = check_name_free
        self.settings = settings

    def read(self, upload: Upload, folder: Path) -> JobRequest:
        """Every check before a job exists; raises a 4xx error with the reason."""
        fields = upload.fields
        name = validate_name(fields.get("name", ""))
        self.check_name_free(name)  # early; the service checks again, atomically
        strategy = fields.get("strategy", "speaker")
        if strategy not in all_strategies():
            raise Unprocessable(f"strategy must be one of {', '.join(all_strategies())}")
        models = self.models_for(strategy)
        base_model = fields.get("base_model") or (next(iter(models)) if len(models) == 1 else "")
        kind = model_kind(strategy)
        if not base_model and len(models) > 1:
            raise Unprocessable(
                f"several {kind} models are loaded: name base_model "
                f"(one of {', '.join(sorted(models))})"
            )
        if base_model not in models:
            raise Unprocessable(
                f"unknown {kind} base model {base_model!r} for strategy {strategy!r}; "
                f"loaded: {', '.join(sorted(models)) or 'none'}"
            )
        family = get_family(models[base_model].family)
        if strategy not in family.recipes:
            raise Unprocessable(
                f"{family.title} model {base_model!r} has no tested recipe for the {strategy} "
                f"strategy; it fine-tunes: {', '.join(sorted(family.recipes))}"
            )
        hyper = hyper_parameters(fields)
        text_prompt = fields.get("text_prompt") or None
        if text_prompt is not None and strategy != "duplex":
            raise Unprocessable("text_prompt only applies to the duplex strategy")
        if text_prompt is not None and len(text_prompt) > MAX_TEXT_PROMPT_CHARS:
            raise Unprocessable(f"text_prompt is longer than {MAX_TEXT_PROMPT_CHARS} characters")

        audio = [f for f in upload.files_of("clips") if not f.filename.endswith(".txt")]
        texts = transcripts(upload, fields.get("transcripts"))
        if not audio:
            raise Unprocessable("no clips uploaded (multipart file field 'clips')")
        missing = [f.filename for f in audio if f.filename not in texts]
        if len(texts) != len(audio) or missing:
            raise Unprocessable(
                f"{len(audio)} clips but {len(texts)} transcripts"
                + (f"; no transcript for {', '.join(missing[:5])}" if missing else "")
            )
        problems: list[str] = []
        saved = save_audio(audio, folder / "clips", "clip_{:03d}.wav", problems)
        clips = [TrainClip(s.path, texts[s.item.filename].strip()) for s in saved]
        total = sum(s.seconds for s in saved)
        empty = [f.filename for f in audio if not texts.get(f.filename, "").strip()]
        problems += [f"{n}: empty transcript" for n in empty]
        refs = [
            s.path for s in save_audio(upload.files_of("ref"), folder, "ref_{:02d}.wav", problems)
        ]
        if strategy == "speaker" and not upload.files_of("ref"):
            problems.append("the speaker strategy needs at least one reference clip ('ref')")
        user_clips: list[Path] = []
        if upload.files_of("user_clips"):
            if strategy != "duplex":
                problems.append("user_clips only apply to the duplex strategy")
            elif len(upload.files_of("user_clips")) != len(audio):
                problems.append(
                    f"{len(audio)} clips but {len(upload.files_of('user_clips'))} user_clips: "
                    "send one user-side clip per clip, in the same order"
                )
            else:
                saved_user = save_audio(
                    upload.files_of("user_clips"), folder / "user", "user_{:03d}.wav", problems
                )
                user_clips = [s.path for s in saved_user]
        if family.text_frame_rate is not None:
            tokenizer = models[base_model].loaded.text_tokenizer
            problems += text_fits_frames(family, tokenizer, saved, texts)
        if problems:
            raise Unprocessable("; ".join(problems), problems=problems)
        least = self.settings.job_min_total_seconds
        least = family.job_seconds(strategy) if least is None else least
        if total < least:
            raise Unprocessable(
                f"{total:.1f} s of audio; the {strategy} strategy needs at least {least:g} s"
            )
        return JobRequest(
            name=name,
            base_model=base_model,
            family=family.name,
            strategy=strategy,
            language=fields.get("language") or None,
            clips=clips,
            refs=refs,
            hyper=hyper,
            user_clips=user_clips,
            text_prompt=text_prompt,
        )


def model_kind(strategy: str) -> str:
    """How messages name the models a strategy trains: "speech", or e.g. "PersonaPlex (duplex)"."""
    families = families_with(strategy)
    if all(f.engine == "speech" for f in families):
        return "speech"
    return " / ".join(f"{f.title} ({f.engine})" for f in families)


def hyper_parameters(fields: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (kind, low, high) in BOUNDS.items():
        if key not in fields or fields[key] == "":
            continue
        try:
            value = kind(fields[key])
        except ValueError as exc:
            raise Unprocessable(f"{key} must be a number") from exc
        if not low <= value <= high:
            raise Unprocessable(f"{key} must be between {low} and {high}")
        out[key] = value
    for key in FLAGS:
        flag = fields.get(key, "").strip().lower()
        if flag in ("true", "1", "yes"):
            out[key] = True
        elif flag in ("false", "0", "no"):
            out[key] = False
        elif flag:
            raise Unprocessable(f"{key} must be true or false")
    return out


def text_fits_frames(
    family: Family, tokenizer: Any, saved: list[SavedClip], texts: Mapping[str, str]
) -> list[str]:
    """A family that places at most one text token per audio frame: each transcript must fit."""
    rate = family.text_frame_rate
    if rate is None:
        return []
    frame_ms = round(1000 / rate)
    problems = []
    for clip in saved:
        tokens = len(tokenizer.encode(texts.get(clip.item.filename, "")))
        frames = int(clip.seconds * rate)
        if tokens > frames:
            problems.append(
                f"{clip.item.filename}: the transcript is {tokens} text tokens but the clip has "
                f"only {frames} frames of {frame_ms} ms (at most one token per frame): shorten "
                "the text or send a longer clip"
            )
    return problems


def transcripts(upload: Upload, mapping: str | None) -> dict[str, str]:
    if mapping:
        try:
            data = json.loads(mapping)
        except ValueError as exc:
            raise Unprocessable(f"transcripts is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise Unprocessable("transcripts must map each clip's file name to its text")
        return data
    texts = {}
    for item in upload.files_of("clips") + upload.files_of("transcripts"):
        if item.filename.endswith(".txt"):
            stem = item.filename[: -len(".txt")]
            audio = next(
                (
                    f.filename
                    for f in upload.files_of("clips")
                    if f.filename.rsplit(".", 1)[0] == stem and not f.filename.endswith(".txt")
                ),
                None,
            )
            if audio is not None:
                texts[audio] = item.path.read_text(encoding="utf-8", errors="replace")
    return texts


def save_audio(
    items: list[UploadedFile], folder: Path, pattern: str, problems: list[str]
) -> list[SavedClip]:
    """Decode each upload to a 24 kHz mono WAV in `folder`; refusals go into `problems`."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, item in enumerate(items):
        try:
            wav = checked_audio(item)
        except Unprocessable as exc:
            problems.append(str(exc))
            continue
        path = folder / pattern.format(i)
        write_wav(path, wav)
        saved.append(SavedClip(item, path, duration_s(wav)))
    return saved


def checked_audio(item: UploadedFile) -> Any:
    if not item.filename.lower().endswith(AUDIO_SUFFIXES):
        raise Unprocessable(f"{item.filename}: not an audio file (wav, flac, ogg, mp3)")
    try:
        # Refused from its header when longer than a clip may be: never decoded whole.
        wav = load_audio(item.path, 24_000, max_seconds=MAX_CLIP_S, name=item.filename)
    except AudioError as exc:
        raise Unprocessable(str(exc)) from exc
    seconds = duration_s(wav)
    if not MIN_CLIP_S <= seconds <= MAX_CLIP_S:
        raise Unprocessable(
            f"{item.filename}: {seconds:.2f} s, outside {MIN_CLIP_S}-{MAX_CLIP_S} s"
        )
    return wav
