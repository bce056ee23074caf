"""Fine-tune jobs: validate an upload, run `python -m finetune run-job` as a separate process,
follow its JSON-lines progress, register the new speaker when it succeeds.

States: queued -> preparing -> training -> baking -> succeeded | failed | cancelled, and
interrupted (the server stopped mid-job; it resumes from its checkpoint at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.audio import AudioError, duration_s, load_audio, write_wav
from finetune.families import all_strategies, families_with, get_family
from finetune.quality import preview_name

import anyio

from server.errors import Conflict, NotFound, Unprocessable
from server.job_config import job_train_config
from server.registry import Job, JobNotFound, Registry, VoiceNotFound, validate_name
from server.settings import Settings
from server.uploads import Upload, UploadedFile
from server.voices import VoiceService

ACTIVE = ("queued", "preparing", "training", "baking")
TERMINAL = ("succeeded", "failed", "cancelled")
LOG_TAIL = 40
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".oga", ".opus")

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
MIN_TOTAL_SECONDS = {"speaker": 4.0, "language": 8.0, "duplex": 4.0}
MAX_TEXT_PROMPT_CHARS = 2000
DUPLEX_FRAME_RATE = 12.5  # PersonaPlex steps a second
MIN_CLIP_S, MAX_CLIP_S = 0.5, 30.0
# What job events never show a client: the trainer's pid and paths on this server.
PRIVATE_EVENT_FIELDS = frozenset({"pid", "ref_clip", "path", "checkpoint", "package_dir"})
PREVIEWS = "previews"  # <job>/previews/step-NNNNNN.wav: the quality report's previews (kept)


@dataclass
class JobRequest:
    name: str
    base_model: str
    strategy: str
    language: str | None
    clips: list[tuple[Path, str]]  # 24 kHz mono wav in the job folder, transcript
    refs: list[Path]
    hyper: dict[str, Any]
    user_clips: list[Path | None] = field(default_factory=list)  # duplex: the user's side
    text_prompt: str | None = None


class JobService:
    def __init__(self, registry: Registry, voices: VoiceService, settings: Settings) -> None:
        self.registry = registry
        self.voices = voices
        self.settings = settings
        self.root = settings.data_path / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._cancelled: set[str] = set()
        self._listeners: dict[str, list[asyncio.Queue]] = {}
        self._workers: list[asyncio.Task] = []
        self._stopping = False
        # Held from the name check to the job's row: two uploads of one name cannot both pass.
        self._names = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        for stale in self.root.glob(".incoming-*"):  # uploads cut off by a crash
            shutil.rmtree(stale, ignore_errors=True)
        for job in self.registry.list_jobs():
            if job.state in ACTIVE or job.state == "interrupted":
                await anyio.to_thread.run_sync(_stop_orphan, job.payload.get("pid"))
                self._set(job.id, "queued", note="resumed after a server restart")
                self._queue.put_nowait(job.id)
        await anyio.to_thread.run_sync(self.sweep)
        self._workers = [
            asyncio.create_task(self._worker())
            for _ in range(max(1, self.settings.job_concurrency))
        ]

    def sweep(self) -> list[str]:
        """Remove the folders of failed and cancelled jobs older than the retention setting
        (uploads, checkpoints, logs: megabytes each); their rows stay, with a note."""
        hours = self.settings.failed_job_retention_hours
        if hours is None:
            return []
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
        removed = []
        for job in self.registry.list_jobs():
            folder = self.root / job.id
            if job.state not in ("failed", "cancelled") or not folder.exists():
                continue
            if dt.datetime.fromisoformat(job.updated_at) <= cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(job.id)
        return removed

    async def stop(self) -> None:
        self._stopping = True
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
        for proc in list(self._procs.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.settings.shutdown_grace_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for task in self._workers:
            task.cancel()

    # --- creating -----------------------------------------------------------------------
    def validate(self, upload: Upload, folder: Path) -> JobRequest:
        """Every check before a job exists; raises a 4xx error with the reason."""
        fields = upload.fields
        name = validate_name(fields.get("name", ""))
        self._check_name_free(name)  # early; create() checks again, atomically
        strategy = fields.get("strategy", "speaker")
        if strategy not in all_strategies():
            raise Unprocessable(f"strategy must be one of {', '.join(all_strategies())}")
        models = self._models_for(strategy)
        base_model = fields.get("base_model") or (next(iter(models)) if len(models) == 1 else "")
        kind = _model_kind(strategy)
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
        hyper = _hyper_parameters(fields)
        text_prompt = fields.get("text_prompt") or None
        if text_prompt is not None and strategy != "duplex":
            raise Unprocessable("text_prompt only applies to the duplex strategy")
        if text_prompt is not None and len(text_prompt) > MAX_TEXT_PROMPT_CHARS:
            raise Unprocessable(f"text_prompt is longer than {MAX_TEXT_PROMPT_CHARS} characters")

        audio = [f for f in upload.files_of("clips") if not f.filename.endswith(".txt")]
        texts = _transcripts(upload, fields.get("transcripts"))
        if not audio:
            raise Unprocessable("no clips uploaded (multipart file field 'clips')")
        missing = [f.filename for f in audio if f.filename not in texts]
        if len(texts) != len(audio) or missing:
            raise Unprocessable(
                f"{len(audio)} clips but {len(texts)} transcripts"
                + (f"; no transcript for {', '.join(missing[:5])}" if missing else "")
            )
        problems: list[str] = []
        saved = _save_audio(audio, folder / "clips", "clip_{:03d}.wav", problems)
        clips = [(path, texts[item.filename].strip()) for item, path, _ in saved]
        total = sum(seconds for _, _, seconds in saved)
        empty = [f.filename for f in audio if not texts.get(f.filename, "").strip()]
        problems += [f"{n}: empty transcript" for n in empty]
        refs = [
            path
            for _, path, _ in _save_audio(
                upload.files_of("ref"), folder, "ref_{:02d}.wav", problems
            )
        ]
        if strategy == "speaker" and not upload.files_of("ref"):
            problems.append("the speaker strategy needs at least one reference clip ('ref')")
        user_clips: list[Path | None] = []
        if upload.files_of("user_clips"):
            if strategy != "duplex":
                problems.append("user_clips only apply to the duplex strategy")
            elif len(upload.files_of("user_clips")) != len(audio):
                problems.append(
                    f"{len(audio)} clips but {len(upload.files_of('user_clips'))} user_clips: "
                    "send one user-side clip per clip, in the same order"
                )
            else:
                saved_user = _save_audio(
                    upload.files_of("user_clips"), folder / "user", "user_{:03d}.wav", problems
                )
                user_clips = [path for _, path, _ in saved_user]
        if strategy == "duplex":
            tokenizer = models[base_model].loaded.text_tokenizer
            problems += _text_fits_frames(tokenizer, saved, texts)
        if problems:
            raise Unprocessable("; ".join(problems), problems=problems)
        least = self.settings.job_min_total_seconds
        least = MIN_TOTAL_SECONDS.get(strategy, 4.0) if least is None else least
        if total < least:
            raise Unprocessable(
                f"{total:.1f} s of audio; the {strategy} strategy needs at least {least:g} s"
            )
        return JobRequest(
            name,
            base_model,
            strategy,
            fields.get("language") or None,
            clips,
            refs,
            hyper,
            user_clips=user_clips,
            text_prompt=text_prompt,
        )

    def _models_for(self, strategy: str) -> dict[str, Any]:
        """The loaded models (of either engine) whose family trains `strategy`."""
        return {
            name: model
            for name, model in self.voices.served_models().items()
            if strategy in get_family(model.family).strategies
        }

    def _check_name_free(self, name: str) -> None:
        if self.registry.exists(name) or name in self.voices.builtin():
            raise Conflict(f"voice {name!r} already exists")
        pending = [
            j.id
            for j in self.registry.list_jobs()
            if j.name == name and (j.state in ACTIVE or j.state == "interrupted")
        ]
        if pending:
            raise Conflict(f"job {pending[0]} is already making voice {name!r}")

    def create(self, request: JobRequest, folder: Path) -> Job:
        """The job's row and folder; the name is reserved from here until the job ends."""
        with self._names:
            self._check_name_free(request.name)
            return self._create(request, folder)

    def _create(self, request: JobRequest, folder: Path) -> Job:
        job_id = uuid.uuid4().hex[:12]
        job_dir = self.root / job_id
        folder.rename(job_dir)
        _rebase = lambda p: job_dir / p.relative_to(folder)  # noqa: E731
        clips = [(_rebase(p), t) for p, t in request.clips]
        refs = [_rebase(p) for p in request.refs]
        users = [_rebase(p) if p is not None else None for p in request.user_clips]
        lines = []
        for i, (path, text) in enumerate(clips):
            row: dict[str, Any]
            if request.strategy == "duplex":
                user = users[i] if users else None
                row = {"agent_audio": str(path), "user_audio": str(user) if user else None}
                row["text"] = text
                # Trained after the prompts the voice is served with (personaplex/conditioning.py).
                row["voice_prompt"] = str(refs[0]) if refs else None
                row["text_prompt"] = request.text_prompt
            else:
                row = {"audio": str(path), "text": text}
                if request.strategy == "speaker":
                    row["ref_audio"] = str(refs[i % len(refs)])
                else:
                    # A language voice is served on one reference clip (the job's ref, else its
                    # first clip): every line trains on that same speaker vector.
                    row["ref_audio"] = str(refs[0] if refs else clips[0][0])
                if request.language:
                    row["language"] = request.language
            lines.append(json.dumps(row))
        (job_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
        spec = _with_quality_report(self._spec(request, job_dir, refs), job_dir)
        (job_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        payload = {
            "base_model": request.base_model,
            "strategy": request.strategy,
            "clips": len(clips),
            "step": 0,
            "total_steps": None,
            "losses": {},
            "eta_s": None,
            "log_tail": [],
            "reason": None,
            "pid": None,
            "hyper": request.hyper,
            "ref_clip": str(refs[0] if refs else clips[0][0]),
            "quality": [],
        }
        job = self.registry.put_job(job_id, request.name, "queued", payload)
        self._queue.put_nowait(job_id)
        return job

    def _spec(self, request: JobRequest, job_dir: Path, refs: list[Path]) -> dict[str, Any]:
        hyper = request.hyper
        model = self._models_for(request.strategy)[request.base_model]
        model_path = model.loaded.path
        family = model.family
        config = job_train_config(
            family=family,
            strategy=request.strategy,
            model_path=model_path,
            train_jsonl=job_dir / "train.jsonl",
            output_dir=job_dir / "run",
            voice_name=request.name,
            hyper=hyper,
            clip_seconds=(MIN_CLIP_S, MAX_CLIP_S),
        )
        return {
            "name": request.name,
            "config": config,
            "package_dir": str(job_dir / "package"),
            "ref_clip": str(refs[0]) if refs else None,
            "language": request.language,
            "text_prompt": request.text_prompt,
        }

    # --- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        try:
            return self.registry.get_job(job_id)
        except JobNotFound as exc:
            raise NotFound(str(exc)) from exc

    def preview(self, job_id: str, step: int) -> Path:
        """The preview WAV of `step`'s quality report (404 for an unknown job or step)."""
        job = self.get(job_id)
        reported = any(
            q.get("step") == step and q.get("preview") for q in job.payload.get("quality", [])
        )
        path = self.root / job.id / PREVIEWS / preview_name(step)
        if not reported or not path.is_file():
            raise NotFound(f"job {job_id} has no preview for step {step}")
        return path

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners.setdefault(job_id, []).append(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._listeners[job_id].remove(queue)

    def _publish(self, job_id: str, event: dict[str, Any]) -> None:
        public = {k: v for k, v in event.items() if k not in PRIVATE_EVENT_FIELDS}
        if event.get("event") == "quality" and event.get("preview"):
            public["preview"] = f"/jobs/{job_id}/previews/{int(event['step'])}"
        for queue in self._listeners.get(job_id, []):
            queue.put_nowait(public)

    # --- cancelling ---------------------------------------------------------------------
    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in TERMINAL:
            raise Conflict(f"job {job_id} already {job.state}")
        self._cancelled.add(job_id)
        proc = self._procs.get(job_id)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            return self.get(job_id)
        return self._set(job_id, "cancelled", note="cancelled before it started")

    # --- running ------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id in self._cancelled or self.get(job_id).state in TERMINAL:
                continue
            try:
                await self._run(job_id)
            except Exception as exc:  # a job failure never stops the worker
                self._set(job_id, "failed", reason=f"{type(exc).__name__}: {exc}")
            await anyio.to_thread.run_sync(self.sweep)

    async def _run(self, job_id: str) -> None:
        job_dir = self.root / job_id
        self._set(job_id, "preparing")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "finetune",
            "run-job",
            "--spec",
            str(job_dir / "spec.json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._procs[job_id] = proc
        self._set(job_id, None, pid=proc.pid)
        tail: deque[str] = deque(maxlen=LOG_TAIL)
        outcome: dict[str, Any] = {}
        with (job_dir / "job.log").open("a") as log:
            await asyncio.gather(
                self._follow(job_id, proc.stdout, log, tail, outcome),
                self._drain(proc.stderr, log, tail),
            )
        code = await proc.wait()
        self._procs.pop(job_id, None)
        if job_id in self._cancelled:
            self._set(job_id, "cancelled", log_tail=list(tail))
        elif code == 0 and "package" in outcome:
            await self._register(job_id, Path(outcome["package"]), tail)
        elif code == 0 and outcome.get("stopped") and self._stopping:
            self._set(
                job_id,
                "interrupted",
                log_tail=list(tail),
                note="the server stopped; the job resumes from its checkpoint",
            )
        else:
            reason = (
                f"training process killed by signal {signal.Signals(-code).name}"
                if code < 0
                else f"training process exited with code {code}"
            )
            error = next((line for line in reversed(tail) if line.startswith("error:")), None)
            self._set(job_id, "failed", reason=error or reason, log_tail=list(tail))

    async def _follow(
        self, job_id: str, stream: Any, log: Any, tail: deque[str], outcome: dict[str, Any]
    ) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log.write(line + "\n")
            try:
                event = json.loads(line)
            except ValueError:
                tail.append(line)
                continue
            kind = event.get("event")
            if kind == "phase":
                state = {
                    "validate": "preparing",
                    "preprocess": "preparing",
                    "training": "training",
                    "baking": "baking",
                }.get(event.get("phase"))
                self._set(job_id, state)
            elif kind == "step":
                losses = {k: event[k] for k in ("loss", "main", "sub") if k in event}
                self._set(
                    job_id,
                    "training",
                    step=event["step"],
                    total_steps=event["total_steps"],
                    losses=losses,
                    eta_s=event.get("eta_s"),
                )
            elif kind == "quality":
                self._record_quality(job_id, event)
            elif kind == "package":
                outcome["package"] = event["path"]
            elif kind == "stopped":
                outcome["stopped"] = True
            self._publish(job_id, event)

    def _record_quality(self, job_id: str, event: dict[str, Any]) -> None:
        """One point of the similarity curve (a report for a step already seen replaces it)."""
        step = int(event["step"])
        point: dict[str, Any] = {
            "step": step,
            "similarity": event.get("similarity"),
            "preview": f"/jobs/{job_id}/previews/{step}" if event.get("preview") else None,
        }
        if event.get("reason"):
            point["reason"] = event["reason"]
        curve = [q for q in self.get(job_id).payload.get("quality", []) if q["step"] != step]
        self._set(job_id, None, quality=sorted([*curve, point], key=lambda q: q["step"]))

    @staticmethod
    async def _drain(stream: Any, log: Any, tail: deque[str]) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log.write(line + "\n")
            tail.append(line)

    async def _register(self, job_id: str, package: Path, tail: deque[str]) -> None:
        job = self.get(job_id)
        payload = job.payload
        ref = Path(payload["ref_clip"]).read_bytes() if payload.get("ref_clip") else None
        try:
            voice = await self.voices.import_directory(
                package, name=job.name, base_model=payload["base_model"], ref_clip=ref
            )
        except Exception as exc:
            self._set(
                job_id,
                "failed",
                reason=f"the trained voice did not load: {exc}",
                log_tail=list(tail),
            )
            return
        quality = _quality_meta(payload.get("quality", []))
        if quality:
            async with self.registry.alock(voice.name):
                with contextlib.suppress(VoiceNotFound):  # deleted already: nothing to note
                    current = self.registry.get(voice.name)
                    meta = {**current.meta, **quality}
                    self.registry.replace(dataclasses.replace(current, meta=meta))
        self._set(job_id, "succeeded", voice=voice.name, log_tail=list(tail))
        shutil.rmtree(self.root / job_id / "run", ignore_errors=True)  # previews/ stays

    def _set(self, job_id: str, state: str | None, **fields: Any) -> Job:
        job = self.registry.get_job(job_id)
        payload = {**job.payload, **fields}
        updated = self.registry.update_job(job_id, state=state or job.state, payload=payload)
        if (state is not None and state != job.state) or fields:
            self._publish(job_id, {"event": "state", "state": updated.state, **fields})
        return updated


def _with_quality_report(spec: dict[str, Any], job_dir: Path) -> dict[str, Any]:
    """Every job reports its quality; previews go to `<job>/previews`, which outlives `run/`."""
    quality = spec["config"].setdefault("quality", {})
    quality.setdefault("enabled", True)
    quality["previews_dir"] = str(job_dir / PREVIEWS)
    return spec


def _quality_meta(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """What the registered voice's meta says of its quality: the similarity of its final
    checkpoint (the last report; the package is made from it) and of the untrained baseline."""
    if not curve:
        return {}
    final = max(curve, key=lambda q: q["step"])
    meta: dict[str, Any] = {"similarity": final["similarity"], "similarity_step": final["step"]}
    baseline = next((q for q in curve if q["step"] == 0), None)
    if baseline is not None:
        meta["similarity_baseline"] = baseline["similarity"]
    if final["similarity"] is None and final.get("reason"):
        meta["similarity_reason"] = final["reason"]
    return meta


def _model_kind(strategy: str) -> str:
    """How messages name the models a strategy trains: "speech", or e.g. "PersonaPlex (duplex)"."""
    families = families_with(strategy)
    if all(f.engine == "speech" for f in families):
        return "speech"
    return " / ".join(f"{f.title} ({f.engine})" for f in families)


def _hyper_parameters(fields: dict[str, str]) -> dict[str, Any]:
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
        value = fields.get(key, "").strip().lower()
        if value in ("true", "1", "yes"):
            out[key] = True
        elif value in ("false", "0", "no"):
            out[key] = False
        elif value:
            raise Unprocessable(f"{key} must be true or false")
    return out


def _text_fits_frames(
    tokenizer: Any, saved: list[tuple[UploadedFile, Path, float]], texts: dict[str, str]
) -> list[str]:
    """PersonaPlex places at most one text token per 80 ms frame of its clip."""
    problems = []
    for item, _, seconds in saved:
        tokens = len(tokenizer.encode(texts.get(item.filename, "")))
        frames = int(seconds * DUPLEX_FRAME_RATE)
        if tokens > frames:
            problems.append(
                f"{item.filename}: the transcript is {tokens} text tokens but the clip has only "
                f"{frames} frames of 80 ms (at most one token per frame): shorten the text or "
                "send a longer clip"
            )
    return problems


def _transcripts(upload: Upload, mapping: str | None) -> dict[str, str]:
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


def _save_audio(
    items: list[UploadedFile], folder: Path, pattern: str, problems: list[str]
) -> list[tuple[UploadedFile, Path, float]]:
    """Decode each upload to a 24 kHz mono WAV in `folder`; refusals go into `problems`."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, item in enumerate(items):
        try:
            wav = _checked_audio(item)
        except Unprocessable as exc:
            problems.append(str(exc))
            continue
        path = folder / pattern.format(i)
        write_wav(path, wav)
        saved.append((item, path, duration_s(wav)))
    return saved


def _checked_audio(item: UploadedFile) -> Any:
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


def _stop_orphan(pid: int | None) -> None:
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
        import time

        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
