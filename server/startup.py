"""What the lifespan starts and stops: registry, API keys, the engine and its models, voices."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from finetune.families import get_family

import anyio
from litestar import Litestar

from server.auth import KeyStore
from server.duplex.engine import DuplexEngine
from server.engine.family import BankLimits, load_served_model
from server.engine.worker import Engine
from server.jobs import JobService
from server.package_archive import ArchiveLimits
from server.registry import Registry
from server.settings import DEMO_MODEL, ModelSpec, Settings
from server.voices import VoiceService

log = logging.getLogger("voicefoundry")


@contextlib.asynccontextmanager
async def start_services(app: Litestar, settings: Settings) -> AsyncIterator[None]:
    # No key file configured: no auth, explicitly. A configured one must load and hold keys.
    keys = (
        KeyStore.load_configured(settings.api_keys_file)
        if settings.api_keys_file is not None
        else KeyStore()
    )
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
    registry = Registry(data / "registry.sqlite3")
    engine = Engine(
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        batch_window_s=settings.batch_window_ms / 1000,
        codes_log=Path(settings.codes_log) if settings.codes_log else None,
    )
    engine.start()
    duplex = DuplexEngine(
        max_sessions=settings.duplex_max_sessions,
        max_inbox_frames=settings.duplex_max_inbox_frames,
        max_outbox_frames=settings.duplex_max_outbox_frames,
        codes_log=Path(settings.codes_log) if settings.codes_log else None,
    )
    duplex.start()
    archive_limits = ArchiveLimits(
        settings.package_max_bytes, settings.package_max_member_bytes, settings.package_max_members
    )
    voices = VoiceService(registry, engine, data, duplex=duplex, archive_limits=archive_limits)
    jobs = JobService(registry, voices, settings)
    app.state.update(
        {
            "registry": registry,
            "api_keys": keys,
            "engine": engine,
            "voices": voices,
            "jobs": jobs,
            "duplex": duplex,
        }
    )
    try:
        limits = BankLimits(
            settings.adapter_slots, settings.adapter_max_rank, settings.adapter_max_bytes
        )
        engines: dict[str, Engine | DuplexEngine] = {"speech": engine, "duplex": duplex}
        for name, spec in models.items():
            serving = engines[get_family(spec.family).engine]
            model = await serving.run(
                lambda n=name, s=spec: load_served_model(n, s.family, s.path, limits)
            )
            serving.models[name] = model
            log.info("loaded %s model %s from %s", spec.family, name, spec.path)
        leftovers = await anyio.to_thread.run_sync(voices.reconcile)
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
        yield
    finally:
        await jobs.stop()
        engine.stop(settings.shutdown_grace_s)
        duplex.stop(settings.shutdown_grace_s)
        registry.close()
