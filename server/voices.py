"""Voices: resolving a speaker name, importing voice packages, deleting, restoring at start.

A voice is registered only after it actually loaded into the running model; per-name locks
make import and delete atomic. `installed` is what this process has put into its models; with
replicas (server/replicas.py) the others' registry writes are brought in by `sync_voice`.

Names across replicas: a new voice first claims its folder under the shared artifacts dir
(``mkdir``, which one creator wins), so two replicas creating one name give one voice and one
409, and neither ever removes the other's folder. Baked rows come from the registry
(`Registry.allocate_slot`), never from this process's view alone.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.arrays import load_arrays
from finetune.families import get_family
from finetune.families.qwen3_tts.bake import EMBEDDING_FILE
from finetune.sampling import Sampling

import anyio
import numpy as np
import sqlalchemy as sa

from server.artifacts import Artifacts
from server.disk import require_free
from server.engine.bank import AdapterTensors
from server.engine.family import PackageError, package_file, package_member
from server.engine.worker import ContextClip, Engine, SpeakJob, Voicing
from server.errors import BadRequest, Conflict, NotFound, Overloaded, Unprocessable
from server.package_archive import ArchiveLimits, unpack
from server.package_meta import package_errors as _package_errors
from server.package_meta import package_folder, package_relative, read_meta, refuse_strays
from server.registry import Registry, Voice, VoiceKind, VoiceNotFound, validate_name

log = logging.getLogger("voicefoundry")

DEFAULT_SLOT = 3000
MAX_CLONE_CLIP_S = 60.0  # a clone's reference clip; longer is refused before it is decoded
TRIAL_TEXT = "Hello."  # what an imported voice is tried on before it is registered


class VoiceService:
    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        artifacts_dir: Path,
        duplex: Any = None,
        archive_limits: ArchiveLimits | None = None,
    ) -> None:
        self.registry = registry
        self.archive_limits = archive_limits or ArchiveLimits()
        self.engine = engine
        self.duplex = duplex  # the DuplexEngine (PersonaPlex models), if any
        self.voices_dir = Artifacts(artifacts_dir).voices
        self.voices_dir.mkdir(parents=True, exist_ok=True)
        # Registered voices that failed to restore at start -> why (they answer 409 until fixed
        # by deleting and re-creating them; the rest serve).
        self.unavailable: dict[str, str] = {}
        # Registered voices this process installed (or tried to: see `unavailable`), as
        # registered: what `sync_voice` compares the registry with.
        self.installed: dict[str, Voice] = {}
        # Replicas: a voice registered by another replica and not yet installed here answers
        # 503 + Retry-After (server/replicas.py brings it in within its bound).
        self.shared = False
        # Called with the registry's connection inside each voice write's transaction (the
        # replicas' notification goes out with the commit, or not at all).
        self.on_change: Callable[[sa.Connection, str], None] | None = None

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

    def voicing(self, voice: Voice, *, served: bool = True) -> Voicing:
        """How `voice` speaks. `served`: for a request (False: a voice being installed or
        removed by this process)."""
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
        if served and self.shared and voice.kind != "builtin" and voice.name not in self.installed:
            raise Overloaded(f"voice {voice.name!r} is still being installed on this replica")
        adapter = self._path(voice.adapter)
        if "speaker_id" in voice.meta:  # a CSM voice: a speaker id and its context clips
            context = tuple(
                ContextClip(self.registry.artifacts_dir / c["audio"], c["text"])
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
        return None if stored is None else (self.registry.artifacts_dir / stored)

    # --- restore --------------------------------------------------------------------------
    def reconcile(self, min_age_s: float = 0.0) -> builtins.list[str]:
        """At start, before restore: what a crash left between a voice's folder and its row.

        An import writes the folder (renamed from staging) before the row, and a delete removes
        the row before the folder; so a folder without a row, or a staging folder, is a crash's
        leftover and goes. A row without a folder stays, and restores as unavailable.
        `min_age_s`: only entries untouched that long go (replicas: another one's import in
        flight is younger).
        """
        names = {v.name for v in self.registry.list()}
        removed = []
        cutoff = time.time() - min_age_s
        for folder in self.voices_dir.iterdir():
            if min_age_s > 0 and _mtime(folder) > cutoff:
                continue
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
            if voice.kind == "duplex" and voice.base_model in self._duplex_models():
                self.installed[voice.name] = voice  # loaded per session: nothing to restore
            if model is None:
                continue
            if await self._restore_or_mark(model, voice):
                restored.append(voice.name)
        return restored

    async def _restore_or_mark(self, model: Any, voice: Voice) -> bool:
        """Install a registered voice into `model`; one that fails is marked unavailable."""
        self.installed[voice.name] = voice
        try:
            await self._restore_one(model, voice)
        except Exception as exc:  # one broken voice never stops the service
            self.unavailable[voice.name] = _restore_failure(exc)
            log.warning("voice %s is unavailable: %s", voice.name, self.unavailable[voice.name])
            await self.engine.run(functools.partial(_undo_restore, model, voice))
            return False
        return True

    # --- replicas: bring in what another replica registered or deleted -------------------------
    async def sync_voice(self, name: str, registered: Voice | None) -> str | None:
        """Make this process hold `name` as the registry does (`registered`: its row, or None
        when it has none); "installed", "removed" or None (nothing to do)."""
        if _same(self.installed.get(name), registered):
            return None
        async with self.registry.alock(name):
            # Read again under the lock: a local import or delete may have just run.
            try:
                current: Voice | None = await anyio.to_thread.run_sync(self.registry.get, name)
            except VoiceNotFound:
                current = None
            held = self.installed.get(name)
            if _same(held, current):
                if current is not None:
                    self.installed[name] = current  # e.g. a job's quality meta, added later
                return None
            if held is not None:
                await self._uninstall(held)
            if current is None:
                return "removed" if held is not None else None
            model = self.engine.models.get(current.base_model)
            if current.kind == "duplex" or model is None:
                self.installed[name] = current  # duplex voices load per session
                return "installed"
            await self._restore_or_mark(model, current)
            return "installed"

    async def _uninstall(self, voice: Voice) -> None:
        """Take what `voice` put into this process's models out again (rows, adapters, caches)."""
        self.installed.pop(voice.name, None)
        unavailable = self.unavailable.pop(voice.name, None)
        model = self.engine.models.get(voice.base_model)
        if model is not None:
            adapter = self._path(voice.adapter)
            voicing = None if unavailable is not None else self.voicing(voice, served=False)

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

    # --- registry writes --------------------------------------------------------------------
    async def commit(self, voice: Voice) -> Voice:
        """Register `voice` (installed by this process): one transaction with the replicas'
        notification."""

        def write() -> Voice:
            with self.registry.transaction() as conn:
                added = self.registry.add(voice)
                self._announce(conn, voice.name)
            return added

        added = await anyio.to_thread.run_sync(write)
        self.installed[added.name] = added
        return added

    def _unregister(self, name: str) -> Voice:
        with self.registry.transaction() as conn:
            removed = self.registry.delete(name)
            self._announce(conn, removed.name)
        return removed

    def _announce(self, conn: sa.Connection, name: str) -> None:
        if self.on_change is not None:
            self.on_change(conn, name)

    def claim(self, name: str) -> Path:
        """The new voice's folder, made empty (an import renames its staged folder over it):
        whoever makes it creates the voice; a second creator of the name, here or on another
        replica, gets a 409."""
        target = self.voices_dir / name
        try:
            target.mkdir()
        except FileExistsError:
            raise Conflict(f"voice {name!r} already exists (or is being created)") from None
        return target

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
                target = self.claim(voice_name)
                try:
                    if isinstance(ref_clip, Path):
                        await anyio.to_thread.run_sync(
                            shutil.copyfile, ref_clip, staging / "ref.wav"
                        )
                    elif ref_clip is not None:
                        (staging / "ref.wav").write_bytes(ref_clip)
                    if family.engine == "duplex":
                        from server.duplex.voices import install_duplex_package

                        return await install_duplex_package(
                            self, staging, meta, voice_name, model_name
                        )
                    return await self._install(staging, meta, voice_name, model_name)
                except BaseException:
                    shutil.rmtree(target, ignore_errors=True)  # ours: claimed above
                    raise
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
            # Reserved in the registry: no other replica gives this row to another voice.
            slot = await anyio.to_thread.run_sync(
                self.registry.allocate_slot,
                model_name,
                name,
                lambda taken: model.free_speaker_slot(wanted, taken),
            )
            if slot is None:
                raise Conflict(f"model {model_name!r} has no free speaker row left")
        extra = model.extra_rows(fields)
        try:
            if extra:
                # Rows beyond the slot (a new language's): reserved in the registry as well.
                rows = await anyio.to_thread.run_sync(
                    self.registry.allocate_rows,
                    model_name,
                    name,
                    extra,
                    lambda taken: model.free_extra_rows(fields, taken),
                )
                if rows is None:
                    raise Conflict(f"model {model_name!r} has no free codec row left")
                fields["reserved_rows"] = rows
            return await self._load_and_register(
                staging, meta, name, model, tensors, fields, embedding, slot, adapter_dir
            )
        except BaseException:
            if slot is not None:
                await anyio.to_thread.run_sync(self.registry.release_slot, model_name, name)
            if extra:
                await anyio.to_thread.run_sync(self.registry.release_rows, model_name, name)
            raise

    async def _load_and_register(
        self,
        staging: Path,
        meta: dict[str, Any],
        name: str,
        model: Any,
        tensors: AdapterTensors | None,
        fields: dict[str, Any],
        embedding: np.ndarray | None,
        slot: int | None,
        adapter_dir: Path | None,
    ) -> Voice:
        model_name = model.name
        target = self.voices_dir / name  # claimed (empty): the staged folder goes over it
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
            root = self.registry.artifacts_dir
            kind: VoiceKind = (
                "baked" if slot is not None else ("adapter" if final_adapter else "clone")
            )
            voice = Voice(
                name=name,
                base_model=model_name,
                kind=kind,
                adapter=str(final_adapter.relative_to(self.registry.artifacts_dir))
                if final_adapter
                else None,
                slot=slot,
                ref_clip=str(ref.relative_to(root)) if ref.is_file() else None,
                default_language=meta.get("language"),
                meta={"strategy": meta.get("strategy"), "source": "package"},
            )
            stored_at = target.relative_to(self.registry.artifacts_dir)
            voice.meta.update(model.registry_meta(fields, stored_at))
            return await self.commit(voice)
        except BaseException:

            def undo() -> None:
                if slot is not None:
                    model.unbake(name)
                model.release_package(fields)

            await self.engine.run(undo)
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
        rel = staging.relative_to(self.registry.artifacts_dir)
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
            voicing=self.voicing(voice, served=False),
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
            folder = self.claim(name)
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
                    ref_clip=str((folder / "ref.wav").relative_to(self.registry.artifacts_dir)),
                    default_language=language,
                    meta=meta,
                )
                return await self.commit(voice)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise

    # --- delete ---------------------------------------------------------------------------
    async def delete(self, name: str) -> Voice:
        key = name.strip().lower()
        async with self.registry.alock(key):
            voice = await anyio.to_thread.run_sync(self.registry.get, key)
            # What this process installed (another replica's voice not yet synced: nothing).
            held = self.installed.get(key)
            if held is not None or not self.shared:
                await self._uninstall(held or voice)
            await anyio.to_thread.run_sync(self._unregister, key)
            shutil.rmtree(self.voices_dir / key, ignore_errors=True)
            self.unavailable.pop(key, None)
            return voice


def _same(held: Voice | None, registered: Voice | None) -> bool:
    """The same registration (meta aside: it changes without reinstalling, e.g. a job's quality
    notes); a voice deleted and made again under its name is another one."""
    if held is None or registered is None:
        return held is registered
    fields = ("created_at", "base_model", "kind", "slot", "adapter", "ref_clip")
    return all(getattr(held, f) == getattr(registered, f) for f in fields)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


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
