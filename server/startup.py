"""What the lifespan starts and stops: registry, API keys, the engine and its models, voices."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from litestar import Litestar

from server.auth import KeyStore
from server.engine.models import EngineModel
from server.engine.worker import Engine
from server.jobs import JobService
from server.registry import Registry
from server.settings import DEMO_MODEL, ModelSpec, Settings
from server.voices import VoiceService

log = logging.getLogger("voicefoundry")


@contextlib.asynccontextmanager
async def start_services(app: Litestar, settings: Settings) -> AsyncIterator[None]:
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    models = dict(settings.models)
    if settings.demo:
        from server.demo import ensure_demo_model

        models.setdefault(DEMO_MODEL, ModelSpec(path=str(ensure_demo_model(data))))
    registry = Registry(data / "registry.sqlite3")
    keys = (
        KeyStore.load(Path(settings.api_keys_file), missing_ok=True)
        if settings.api_keys_file
        else KeyStore([])
    )
    engine = Engine(
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        batch_window_s=settings.batch_window_ms / 1000,
    )
    engine.start()
    voices = VoiceService(registry, engine, data)
    jobs = JobService(registry, voices, settings)
    app.state.update(
        {"registry": registry, "api_keys": keys, "engine": engine, "voices": voices, "jobs": jobs}
    )
    try:
        for name, spec in models.items():
            model = await engine.run(
                lambda n=name, s=spec: EngineModel.load(
                    n,
                    s.path,
                    slots=settings.adapter_slots,
                    max_rank=settings.adapter_max_rank,
                    max_bytes=settings.adapter_max_bytes,
                )
            )
            engine.models[name] = model
            log.info("loaded model %s from %s", name, spec.path)
        restored = await voices.restore()
        log.info("restored %d baked voices", len(restored))
        if settings.demo:
            from server.demo import ensure_demo_voices

            await ensure_demo_voices(voices, data)
        await jobs.start()
        yield
    finally:
        await jobs.stop()
        engine.stop(settings.shutdown_grace_s)
        registry.close()
