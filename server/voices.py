"""Voices: resolving a speaker name, importing voice packages, deleting, restoring at start.

A voice is registered only after it actually loaded into the running model; per-name locks
make import and delete atomic.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import io
import logging
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from finetune.arrays import load_arrays
from finetune.families import get_family
from finetune.families.qwen3_tts.bake import EMBEDDING_FILE
from finetune.sampling import Sampling

import anyio
import numpy as np

from server.disk import require_free
from server.engine.bank import AdapterTensors
from server.engine.family import PackageError, package_file, package_member
from server.engine.worker import ContextClip, Engine, SpeakJob, Voicing
from server.errors import BadRequest, Conflict, NotFound, Unprocessable
from server.package_archive import ArchiveLimits, unpack
from server.package_meta import package_errors as _package_errors
from server.package_meta import package_folder, package_relative, read_meta, refuse_strays
from server.registry import Registry, Voice, VoiceKind, validate_name

log = logging.getLogger("voicefoundry")

DEFAULT_SLOT = 3000
MAX_CLONE_CLIP_S = 60.0  # a clone's reference clip; longer is refused before it is decoded
TRIAL_TEXT = "Hello."  # what an imported voice is tried on before it is registered


class VoiceService:
    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        data_dir: Path,
        duplex: Any = None,
        archive_limits: ArchiveLimits | None = None,
    ) -> None:
        self.registry = registry
        self.archive_limits = archive_limits or ArchiveLimits()
        self.engine = engine
        self.duplex = duplex  # the DuplexEngine (PersonaPlex models), if any
        self.voices_dir = data_dir / "voices"
        self.voices_dir.mkdir(parents=True, exist_ok=True)
        # Registered voices that failed to restore at start -> why (they answer 409 until fixed
        # by deleting and re-creating them; the rest serve).
        self.unavailable: dict[str, str] = {}

    # --- lookups --------------------------------------------------------------------------
    def builtin(self) -> dict[str, str]:
        """Built-in speaker name -> model name, for speakers the checkpoints themselves name."""
        registered = {v.name for v in self.registry.list()}
        out: dict[str, str] = {}
        for model in self.engine.models.values():
            for name in model.builtin_speakers():
                if name not in registered:
                    out.setdefault(name, model.name)
        for name in self._duplex_models():
            if name not in registered:
                out.setdefault(name, name)
        return out

    def _duplex_models(self) -> dict[str, Any]:
        return self.duplex.models if self.duplex is not None else {}

    def served_models(self, engine: str | None = None) -> dict[str, Any]:
        """The loaded models of `engine` ("speech" or "duplex", a `Family.engine`), or of both."""
        by_engine = {"speech": self.engine.models, "duplex": self._duplex_models()}
        if engine is not None:
            return dict(by_engine[engine])
        return {name: m for models in by_engine.values() for name, m in models.items()}

    def get(self, name: str) -> Voice:
        key = name.strip().lower()
        if self.registry.exists(key):
            return self.registry.get(key)
        model = self.builtin().get(key)
        if model is None:
            raise NotFound(f"unknown speaker {name!r}")
        speech = self.engine.models.get(model)
        instruct = speech.instruct_use() if speech is not None else None
        return Voice(
            name=key,
            base_model=model,
            kind="duplex" if model in self._duplex_models() else "builtin",
            adapter=None,
            slot=None,
            ref_clip=None,
            default_language=None,
            meta={"instruct": instruct} if instruct else {},  # "style" | "design": instruct.py
        )

    def list(self) -> list[Voice]:
        builtins = [self.get(n) for n in self.builtin()]
        return sorted(self.registry.list() + builtins, key=lambda v: v.name)

    def voicing(self, voice: Voice) -> Voicing:
        if voice.name in self.unavailable:
            raise Conflict(f"voice {voice.name!r} is unavailable: {self.unavailable[voice.name]}")
        if voice.kind == "duplex":
            raise Unprocessable(
                f"voice {voice.name!r} is a duplex (speech-to-speech) voice: open a "
                "WebSocket at /duplex?speaker=NAME instead"
            )
        if voice.base_model not in self.engine.models:
            raise Conflict(
                f"voice {voice.name!r} needs model {voice.base_model!r}, which is not loaded"
            )
        adapter = self._path(voice.adapter)
        if "speaker_id" in voice.meta:  # a CSM voice: a speaker id and its context clips
            context = tuple(
                ContextClip(self.registry.data_dir / c["audio"], c["text"])
                for c in voice.meta.get("context", [])
            )
            return Voicing(
                model=voice.base_model,
                speaker_id=int(voice.meta["speaker_id"]),
                context=context,
                adapter=adapter,
            )
        rows = tuple((r["name"], int(r["row"])) for r in voice.meta.get("language_rows", []))
        if voice.kind in ("builtin", "baked") or voice.slot is not None:
            return Voicing(
                model=voice.base_model,
                speaker_name=voice.name,
                adapter=adapter,
                language_rows=rows,
            )
        ref_text = voice.meta.get("ref_text")
        return Voicing(
            model=voice.base_model,
            ref_clip=self._path(voice.ref_clip),
            ref_text=ref_text if isinstance(ref_text, str) and ref_text else None,
            adapter=adapter,
            language_rows=rows,
        )

    def _path(self, stored: str | None) -> Path | None:
        return None if stored is None else (self.registry.data_dir / stored)

    # --- restore --------------------------------------------------------------------------
    def reconcile(self) -> builtins.list[str]:
        """At start, before restore: what a crash left between a voice's folder and its row.

        An import writes the folder (renamed from staging) before the row, and a delete removes
        the row before the folder; so a folder without a row, or a staging folder, is a crash's
        leftover and goes. A row without a folder stays, and restores as unavailable.
        """
        names = {v.name for v in self.registry.list()}
        removed = []
        for folder in self.voices_dir.iterdir():
            if folder.name.startswith(".") or folder.name not in names:
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink()
                removed.append(folder.name)
        return removed

    async def restore(self) -> builtins.list[str]:
        """Write every voice's rows (baked speaker, new languages) back into its freshly loaded
        model."""
        restored = []
        for voice in self.registry.list():
            model = self.engine.models.get(voice.base_model)
            if model is None:
                continue
            try:
                await self._restore_one(model, voice)
            except Exception as exc:  # one broken voice never stops the service
                self.unavailable[voice.name] = _restore_failure(exc)
                log.warning("voice %s is unavailable: %s", voice.name, self.unavailable[voice.name])
                await self.engine.run(functools.partial(_undo_restore, model, voice))
                continue
            restored.append(voice.name)
        return restored

    async def _restore_one(self, model: Any, voice: Voice) -> None:
        folder = self.voices_dir / voice.name
        if voice.slot is not None:
            embedding = await anyio.to_thread.run_sync(self._embedding, folder)
            await self.engine.run(lambda: model.bake(voice.name, voice.slot, embedding))
        await self.engine.run(lambda: model.restore_voice(voice.meta, folder))

    @staticmethod
    def _embedding(folder: Path) -> np.ndarray:
        meta, _ = read_meta(folder)
        with _package_errors():
            file = package_file(folder, meta.embedding or EMBEDDING_FILE, "embedding")
            return _read_embedding(file)

    # --- import ---------------------------------------------------------------------------
    async def import_package(
        self,
        archive: Path | bytes,
        *,
        name: str | None,
        base_model: str | None,
        ref_clip: bytes | Path | None = None,
    ) -> Voice:
        """A voice package uploaded as a .tar.gz / .zip archive (a file, or its bytes);
        `ref_clip`: its bytes, or an uploaded file (copied, never read whole)."""
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=self.voices_dir))
        try:
            await anyio.to_thread.run_sync(unpack, archive, staging, self.archive_limits)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return await self._register_staged(staging, name, base_model, ref_clip)

    async def import_directory(
        self, folder: Path, *, name: str, base_model: str, ref_clip: bytes | None = None
    ) -> Voice:
        """A voice package directory on this machine (what a finished fine-tune job wrote)."""
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        floor = self.archive_limits.min_free_bytes
        require_free(self.voices_dir, floor, "the trained voice's package", size)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=self.voices_dir))
        try:
            await anyio.to_thread.run_sync(
                lambda: shutil.copytree(folder, staging, dirs_exist_ok=True)
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return await self._register_staged(staging, name, base_model, ref_clip)

    async def _register_staged(
        self,
        staging: Path,
        name: str | None,
        base_model: str | None,
        ref_clip: bytes | Path | None,
    ) -> Voice:
        try:
            meta = _read_meta(staging)
            if not (name or meta.get("name")):
                raise Unprocessable("voice.json has no name: send one as the field 'name'")
            voice_name = validate_name(name or meta["name"])
            family = get_family(meta["family"])  # checked by _read_meta
            served = self.served_models(family.engine)
            model_name = base_model or self._default_model(served)
            if model_name not in served:
                raise Unprocessable(
                    f"unknown base model {model_name!r} for a {meta.get('family')} voice; "
                    f"loaded: {', '.join(sorted(served)) or 'none'}"
                )
            if meta.get("family") != served[model_name].family:
                raise Unprocessable(
                    f"a {meta.get('family')} voice package cannot go on base model "
                    f"{model_name!r}, a {served[model_name].family} model"
                )
            async with self.registry.alock(voice_name):
                if self.registry.exists(voice_name) or voice_name in self.builtin():
                    raise Conflict(f"voice {voice_name!r} already exists")
                if isinstance(ref_clip, Path):
                    await anyio.to_thread.run_sync(shutil.copyfile, ref_clip, staging / "ref.wav")
                elif ref_clip is not None:
                    (staging / "ref.wav").write_bytes(ref_clip)
                if family.engine == "duplex":
                    from server.duplex.voices import install_duplex_package

                    return await install_duplex_package(self, staging, meta, voice_name, model_name)
                return await self._install(staging, meta, voice_name, model_name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _default_model(self, served: dict[str, Any] | None = None) -> str:
        served = self.engine.models if served is None else served
        if len(served) != 1:
            raise BadRequest("several models (or none) can take this voice: name base_model")
        return next(iter(served))

    async def _install(
        self, staging: Path, meta: dict[str, Any], name: str, model_name: str
    ) -> Voice:
        model = self.engine.models[model_name]
        with _package_errors():
            adapter_dir = package_folder(staging, meta["adapter"]) if meta.get("adapter") else None
            # A named embedding the package lacks: an adapter voice (as before confinement).
            embedding_file = (
                package_member(staging, meta["embedding"]) if meta.get("embedding") else None
            )
            if embedding_file is not None and not embedding_file.is_file():
                embedding_file = None
        tensors = None
        if adapter_dir is not None:
            with package_relative(meta["adapter"]):
                tensors = await anyio.to_thread.run_sync(
                    AdapterTensors.read, adapter_dir, model.adapter_module, model.adapter_riders
                )
        with _package_errors():
            fields = model.package_fields(staging, meta)  # the family's own voice.json fields
            named = [staging / "voice.json", staging / "ref.wav", adapter_dir, embedding_file]
            named += [package_member(staging, f) for f in model.package_files(fields)]
            refuse_strays(staging, [f for f in named if f is not None])
        embedding = None
        slot = None
        if embedding_file is not None:
            embedding = await anyio.to_thread.run_sync(self._embedding, staging)
            wanted = DEFAULT_SLOT if meta.get("slot") is None else int(meta["slot"])
            slot = model.free_speaker_slot(wanted, set(self.registry.used_slots(model_name)))
            if slot is None:
                raise Conflict(f"model {model_name!r} has no free speaker row left")
        target = self.voices_dir / name
        final_adapter = target / meta["adapter"] if adapter_dir is not None else None
        loop = asyncio.get_running_loop()

        def load() -> None:
            if tensors is not None:
                # Verify the adapter fits the model by installing it, then free the slot: the
                # final copy (under the voice's own folder) loads on demand.
                model.bank.ensure(tensors)
                model.bank.unload(str(tensors.path))
            if embedding is not None and slot is not None:
                model.bake(name, slot, embedding)
            try:
                model.check_package(staging, fields)
                _try_voice(model, self._trial_job(staging, meta, name, model, slot, fields, loop))
            except BaseException:
                if slot is not None:
                    model.unbake(name)
                model.release_package(fields)
                raise

        with _package_errors():
            await self.engine.run(load)
        try:
            staging.rename(target)
            ref = target / "ref.wav"
            kind: VoiceKind = (
                "baked" if slot is not None else ("adapter" if final_adapter else "clone")
            )
            voice = Voice(
                name=name,
                base_model=model_name,
                kind=kind,
                adapter=str(final_adapter.relative_to(self.registry.data_dir))
                if final_adapter
                else None,
                slot=slot,
                ref_clip=str(ref.relative_to(self.registry.data_dir)) if ref.is_file() else None,
                default_language=meta.get("language"),
                meta={"strategy": meta.get("strategy"), "source": "package"},
            )
            stored_at = target.relative_to(self.registry.data_dir)
            voice.meta.update(model.registry_meta(fields, stored_at))
            return await anyio.to_thread.run_sync(self.registry.add, voice)
        except BaseException:

            def undo() -> None:
                if slot is not None:
                    model.unbake(name)
                model.release_package(fields)

            await self.engine.run(undo)
            shutil.rmtree(target, ignore_errors=True)
            raise

    def _trial_job(
        self,
        staging: Path,
        meta: dict[str, Any],
        name: str,
        model: Any,
        slot: int | None,
        fields: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> SpeakJob:
        """A one-frame request in the staged voice, as /speak would make it once registered
        (after `check_package` installed what it installs)."""
        rel = staging.relative_to(self.registry.data_dir)
        kind: VoiceKind = (
            "baked" if slot is not None else ("adapter" if meta.get("adapter") else "clone")
        )
        ref = staging / "ref.wav"
        voice = Voice(
            name=name,
            base_model=model.name,
            kind=kind,
            adapter=None,  # proven by installing it into the bank
            slot=slot,
            ref_clip=str(rel / "ref.wav") if ref.is_file() else None,
            default_language=meta.get("language"),
            meta={},
        )
        voice.meta.update(model.registry_meta(fields, rel))
        return SpeakJob(
            voicing=self.voicing(voice),
            segments=[TRIAL_TEXT],
            language=voice.default_language,
            sampling=Sampling(max_tokens=1),
            seed=0,
            stream=False,
            loop=loop,
            out=asyncio.Queue(),
        )

    # --- clone voices from an uploaded clip ---------------------------------------------------
    async def add_clone(
        self,
        name: str,
        model_name: str,
        clip: bytes,
        language: str | None = None,
        ref_text: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Voice:
        """A voice from one clip, no training: the model's x-vector path, or with the clip's
        transcript `ref_text` its in-context (ICL) path; `meta.clone` says which. `meta`: more
        for the voice's meta (e.g. a designed voice's description)."""
        extra_meta = dict(meta or {})
        from finetune.audio import decode_audio_bytes, write_wav

        name = validate_name(name)
        wav = await anyio.to_thread.run_sync(
            lambda: decode_audio_bytes(clip, name="clip", max_seconds=MAX_CLONE_CLIP_S)
        )
        async with self.registry.alock(name):
            if self.registry.exists(name) or name in self.builtin():
                raise Conflict(f"voice {name!r} already exists")
            folder = self.voices_dir / name
            folder.mkdir(parents=True)
            try:
                write_wav(folder / "ref.wav", wav)
                model = self.engine.models[model_name]
                mode = await self.engine.run(
                    lambda: model.prepare_clone(folder / "ref.wav", ref_text)
                )
                meta = {**extra_meta, "clone": mode}
                if ref_text is not None:
                    meta["ref_text"] = ref_text
                voice = Voice(
                    name=name,
                    base_model=model_name,
                    kind="clone",
                    adapter=None,
                    slot=None,
                    ref_clip=str((folder / "ref.wav").relative_to(self.registry.data_dir)),
                    default_language=language,
                    meta=meta,
                )
                return await anyio.to_thread.run_sync(self.registry.add, voice)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise

    # --- delete ---------------------------------------------------------------------------
    async def delete(self, name: str) -> Voice:
        key = name.strip().lower()
        async with self.registry.alock(key):
            voice = await anyio.to_thread.run_sync(self.registry.get, key)
            model = self.engine.models.get(voice.base_model)
            if model is not None:
                adapter = self._path(voice.adapter)
                voicing = None if key in self.unavailable else self.voicing(voice)

                def unload() -> None:
                    if voice.slot is not None:
                        model.unbake(voice.name)
                    model.release_voice(voice.meta)
                    if adapter is not None:
                        model.bank.unload(str(adapter))
                    if voicing is not None:
                        model.forget(voicing)

                await self.engine.run(unload)
            if voice.kind == "duplex" and voice.base_model in self._duplex_models():
                from server.duplex.voices import unload_duplex_voice

                await unload_duplex_voice(self, voice)
            await anyio.to_thread.run_sync(self.registry.delete, key)
            shutil.rmtree(self.voices_dir / key, ignore_errors=True)
            self.unavailable.pop(key, None)
            return voice


def _restore_failure(exc: Exception) -> str:
    """Why a voice did not restore, without the server's paths."""
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        return f"a file of its package cannot be read ({type(exc).__name__})"
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    message = re.sub(r"(?:/[^\s/:'\"]+)+/?", "<path>", message)  # no server paths
    return f"its package does not load ({message[:200]})"


def _undo_restore(model: Any, voice: Voice) -> None:
    if voice.slot is not None:
        model.unbake(voice.name)
    model.release_voice(voice.meta)


def _read_embedding(file: Path) -> np.ndarray:
    """A speaker embedding file's vector (its width is checked by the model that bakes it)."""
    try:
        vector = load_arrays(file)["embedding"]
    except Exception as exc:  # mlx raises plain RuntimeError / ValueError / KeyError
        raise PackageError(f"the speaker embedding cannot be read ({type(exc).__name__})") from exc
    return np.array(vector, dtype=np.float32)


def _try_voice(model: Any, job: SpeakJob) -> None:
    """On the engine thread: make the staged voice's first row as a request would (decode its
    clips, build its prompt); a voice that cannot is the package's fault."""
    try:
        model.make_row(job, slot=0)
    except PackageError:
        raise
    except Exception as exc:
        raise PackageError(f"the voice cannot speak: {_restore_failure(exc)}") from exc
    finally:
        model.forget(job.voicing)


def _read_meta(folder: Path) -> dict[str, Any]:
    """voice.json of a staged package, checked (server/package_meta.py)."""
    return read_meta(folder)[1]


def pack_directory(folder: Path) -> bytes:
    """A voice package directory as .tar.gz bytes (what the CLI uploads)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for item in sorted(Path(folder).rglob("*")):
            tf.add(item, arcname=str(item.relative_to(folder)), recursive=False)
    return buffer.getvalue()
