"""A checked `JobRequest` -> the files the trainer runs from: `train.jsonl` (one typed row per
clip) and `spec.json` (a `finetune.job.JobSpec` whose config is the family's tested recipe with
the request's fields applied, validated as a `TrainConfig` before the job exists)."""

from __future__ import annotations

from pathlib import Path

from finetune.config import ConfigError, TrainConfig
from finetune.families import get_family
from finetune.fsutil import atomic_write_bytes
from finetune.job import JobSpec

import msgspec

from server.job_config import job_train_config
from server.jobs.intake import MAX_CLIP_S, MIN_CLIP_S, JobRequest

PREVIEWS = "previews"  # <job>/previews/step-NNNNNN.wav: the quality report's previews (kept)
SPEC_FILE = "spec.json"
TRAIN_FILE = "train.jsonl"


class SpeechRow(msgspec.Struct, omit_defaults=True):
    """A line of a speech family's training data (finetune/data.py `read_jsonl`)."""

    audio: str
    text: str
    ref_audio: str
    language: str | None = None


class ConversationRow(msgspec.Struct):
    """A line of a duplex family's training data: the agent's side, the user's, the prompts."""

    agent_audio: str
    user_audio: str | None
    text: str
    voice_prompt: str | None
    text_prompt: str | None


TrainRow = SpeechRow | ConversationRow


def train_rows(request: JobRequest) -> list[TrainRow]:
    refs = request.refs
    rows: list[TrainRow] = []
    duplex = get_family(request.family).engine == "duplex"
    for i, clip in enumerate(request.clips):
        if duplex:
            user = request.user_clips[i] if request.user_clips else None
            # Trained after the prompts the voice is served with (its family's conditioning).
            rows.append(
                ConversationRow(
                    agent_audio=str(clip.audio),
                    user_audio=str(user) if user else None,
                    text=clip.text,
                    voice_prompt=str(refs[0]) if refs else None,
                    text_prompt=request.text_prompt,
                )
            )
            continue
        if request.strategy == "speaker":
            ref = refs[i % len(refs)]
        else:
            # A language voice is served on one reference clip (the job's ref, else its first
            # clip): every line trains on that same speaker vector.
            ref = refs[0] if refs else request.clips[0].audio
        rows.append(SpeechRow(str(clip.audio), clip.text, str(ref), request.language))
    return rows


def job_spec(request: JobRequest, job_dir: Path, model_path: str | Path) -> JobSpec:
    """The trainer's spec; every job reports its quality, with previews in `<job>/previews`
    (which outlives `run/`)."""
    raw = job_train_config(
        family=request.family,
        strategy=request.strategy,
        model_path=model_path,
        train_jsonl=job_dir / TRAIN_FILE,
        output_dir=job_dir / "run",
        voice_name=request.name,
        hyper=request.hyper,
        clip_seconds=(MIN_CLIP_S, MAX_CLIP_S),
    )
    quality = raw.setdefault("quality", {})
    quality.setdefault("enabled", True)
    quality["previews_dir"] = str(job_dir / PREVIEWS)
    try:
        config = msgspec.convert(raw, TrainConfig)
    except (msgspec.ValidationError, ConfigError) as exc:
        raise ConfigError(f"the {request.family} {request.strategy} recipe: {exc}") from exc
    return JobSpec(
        name=request.name,
        config=config,
        package_dir=str(job_dir / "package"),
        ref_clip=str(request.refs[0]) if request.refs else None,
        language=request.language,
        text_prompt=request.text_prompt,
    )


def write_job_files(request: JobRequest, job_dir: Path, model_path: str | Path) -> JobSpec:
    """Write `train.jsonl` and `spec.json` into `job_dir` (each atomically)."""
    encoder = msgspec.json.Encoder()
    lines = b"".join(encoder.encode(row) + b"\n" for row in train_rows(request))
    atomic_write_bytes(job_dir / TRAIN_FILE, lines)
    spec = job_spec(request, job_dir, model_path)
    atomic_write_bytes(job_dir / SPEC_FILE, msgspec.json.format(encoder.encode(spec)))
    return spec
