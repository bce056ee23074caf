"""What the lifespan starts and stops: registry, API keys, the engine and its models, voices."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from finetune.families import get_family

import anyio
from litestar import Litestar

from server.artifacts import Artifacts
from server.auth import KeyStore
from server.duplex.engine import DuplexEngine
from server.engine.family import BankLimits, load_served_model
from server.engine.worker import Engine
from server.hub import Downloads, HubError, fetch, split_models
from server.jobs import JobService
from server.keyfile import KeyFile
from server.keystore_db import DatabaseKeys
from server.package_archive import ArchiveLimits
from server.registry import Registry
from server.settings import DEMO_MODEL, ModelSpec, Settings
from server.usage import UsageMeter
from server.voices import VoiceService

log = logging.getLogger("voicefoundry")


@contextlib.asynccontextmanager
async def start_services(app: Litestar, settings: Settings) -> AsyncIterator[None]:
    # No key file configured: no auth, explicitly. A configured one must load and hold keys.
    # A key file is re-read when it changes (server/keyfile.py): keys CLI edits need no restart.
    keys: KeyStore | KeyFile | DatabaseKeys
    keys = KeyFile(settings.api_keys_file) if settings.api_keys_file is not None else KeyStore()
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    models = dict(settings.models)
    if settings.demo:
        from server.demo import DEMO_CSM_MODEL, ensure_demo_csm_model, ensure_demo_model

        models.setdefault(DEMO_MODEL, ModelSpec(path=str(ensure_demo_model(data))))
        csm = ModelSpec(path=str(ensure_demo_csm_model(data)), family="csm")
        models.setdefault(DEMO_CSM_MODEL, csm)
        from server.duplex.demo import DEMO_DUPLEX_MODEL, ensure_demo_duplex_model

        duplex_path = str(ensure_demo_duplex_model(data))
        models.setdefault(DEMO_DUPLEX_MODEL, ModelSpec(path=duplex_path, family="personaplex"))
    # Hub ids found in the hub cache load from their snapshot; the others download first.
    ready, pending = await anyio.to_thread.run_sync(split_models, models, data)
    models.update(ready)
    downloads = Downloads(pending) if pending else None
    artifacts = Artifacts.of(settings).ensure()
    registry = Registry(
        data / "registry.sqlite3",
        database_url=settings.database_url,
        artifacts_dir=artifacts.root,
    )
    if settings.api_keys == "database":  # one set for every replica, polled: server/keystore_db.py
        try:
            keys = DatabaseKeys(registry.url)
        except BaseException:
            registry.close()
            raise
    engine = Engine(
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        batch_window_s=settings.batch_window_ms / 1000,
        codes_log=Path(settings.codes_log) if settings.codes_log else None,
        max_audio_s=settings.max_request_audio_seconds,
        max_wall_s=settings.max_request_wall_seconds,
        scheduler=settings.engine_scheduler,
    )
    engine.start()
    duplex = DuplexEngine(
        max_sessions=settings.duplex_max_sessions,
        max_inbox_frames=settings.duplex_max_inbox_frames,
        max_outbox_frames=settings.duplex_max_outbox_frames,
        max_unread_replies=settings.duplex_max_unread_replies,
        unread_grace_s=settings.duplex_unread_grace_s,
        codes_log=Path(settings.codes_log) if settings.codes_log else None,
    )
    duplex.start()
    archive_limits = ArchiveLimits(
        settings.package_max_bytes,
        settings.package_max_member_bytes,
        settings.package_max_members,
        min_free_bytes=settings.min_free_bytes,
    )
    voices = VoiceService(
        registry, engine, artifacts.root, duplex=duplex, archive_limits=archive_limits
    )
    jobs = JobService(registry, voices, settings)
    replicas = None
    if registry.dialect == "postgresql":  # replicas may share it: server/replicas.py
        from server.jobs.broadcast import JobBroadcast
        from server.replicas import ReplicaSync, replica_id

        jobs.replica = replica_id(data)
        replicas = ReplicaSync(voices, registry.url, settings.replica_poll_s, jobs.replica)
        replicas.on_job_event = jobs.events.publish
        jobs.broadcast = JobBroadcast(registry, origin=jobs.replica)
        if settings.job_runner == "workers":
            from server.jobs.queue import JobQueue

            jobs.queue = JobQueue(settings, jobs.replica)
    usage = UsageMeter(registry)
    flusher: asyncio.Task[None] | None = None
    starting: asyncio.Task[None] | None = None
    jobs.on_trained = usage.training_ended
    app.state.update(
        {
            "registry": registry,
            "api_keys": keys,
            "usage": usage,
            "engine": engine,
            "voices": voices,
            "jobs": jobs,
            "duplex": duplex,
            "downloads": downloads,  # /readyz reports them while they run
        }
    )

    async def bring_up() -> None:
        nonlocal flusher
        limits = BankLimits(
            settings.adapter_slots, settings.adapter_max_rank, settings.adapter_max_bytes
        )
        engines: dict[str, Engine | DuplexEngine] = {"speech": engine, "duplex": duplex}
        for name, spec in models.items():
            serving = engines[get_family(spec.family).engine]
            model = await serving.run(
                functools.partial(load_served_model, name, spec.family, spec.path, limits)
            )
            serving.models[name] = model
            log.info("loaded %s model %s from %s", spec.family, name, spec.path)
        leftover_age = 0.0
        if replicas is not None:
            from server.replicas import LEFTOVER_AGE_S

            leftover_age = LEFTOVER_AGE_S
        leftovers = await anyio.to_thread.run_sync(voices.reconcile, leftover_age)
        if leftovers:
            log.warning("removed %d voice folders a crash left behind", len(leftovers))
        restored = await voices.restore()
        log.info("restored %d baked voices", len(restored))
        if settings.demo:
            from server.demo import ensure_demo_voices

            await ensure_demo_voices(voices, data)
            from server.duplex.demo import ensure_demo_duplex_voice

            await ensure_demo_duplex_voice(voices)
        await jobs.start()
        if replicas is not None:
            await replicas.start()
        flusher = asyncio.create_task(_flush_usage(usage, settings.usage_flush_s))

    try:
        if downloads is None:
            await bring_up()
        else:  # the server answers meanwhile: /readyz is a 503 with each download's progress
            starting = asyncio.create_task(_download_then(downloads, models, data, bring_up))
        yield
    finally:
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        if flusher is not None:
            flusher.cancel()
        if replicas is not None:
            await replicas.stop()
        await jobs.stop()
        with contextlib.suppress(Exception):  # the registry may be what failed
            usage.flush()
        engine.stop(settings.shutdown_grace_s)
        duplex.stop(settings.shutdown_grace_s)
        registry.close()
        if isinstance(keys, DatabaseKeys):
            keys.close()


async def _download_then(
    downloads: Downloads,
    models: dict[str, ModelSpec],
    data: Path,
    bring_up: Callable[[], Awaitable[None]],
) -> None:
    """Fetch the hub models not in the cache, one after another, then start as usual. A failure
    is logged as one line and kept for /readyz; the server stays up, not ready."""
    try:
        for download in downloads.items:
            name = download.model.name
            path = await anyio.to_thread.run_sync(
                functools.partial(fetch, download, data), abandon_on_cancel=True
            )
            models[name] = ModelSpec(path=str(path), family=models[name].family)
        await bring_up()
    except HubError as exc:
        downloads.failed = str(exc)
        log.error("%s", exc)
        return
    except Exception as exc:  # a downloaded model that does not load, a registry error ...
        downloads.failed = f"the start after the download failed: {type(exc).__name__}: {exc}"
        log.exception("the start after the download failed")
        return
    downloads.finished = True


async def _flush_usage(usage: UsageMeter, every_s: float) -> None:
    """Write per-key usage to the registry every `every_s` (and once more at the stop)."""
    while True:
        await anyio.sleep(every_s)
        try:
            await anyio.to_thread.run_sync(usage.flush)
        except Exception:
            log.exception("could not write per-key usage; it is kept and retried")
