"""Duplex voices: a registry voice of kind "duplex" (base PersonaPlex model + adapter + voice
prompt + default text prompt), or a loaded PersonaPlex model's own name (the base voice)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.audio import load_audio

import anyio
import msgspec
import numpy as np

from server.duplex.adapters import DuplexAdapterTensors
from server.duplex.engine import DuplexEngine, DuplexVoicing
from server.engine.family import check_package_path, decode_package_fields, package_file
from server.errors import NotFound, Unprocessable
from server.package_meta import (
    package_errors,
    package_folder,
    package_relative,
    refuse_strays,
)
from server.registry import InvalidVoiceName, Registry, Voice


def builtin_duplex_voices(engine: DuplexEngine | None) -> dict[str, str]:
    """Voice name -> model name for the base voices of the loaded PersonaPlex models."""
    return {name: name for name in (engine.models if engine is not None else {})}


def duplex_voicing(registry: Registry, engine: DuplexEngine, name: str) -> DuplexVoicing:
    key = name.strip().lower()
    try:
        registered = registry.exists(key)
    except InvalidVoiceName:  # no voice can have that name (e.g. a file name "NATF0.pt")
        registered = False
    if registered:
        return voicing_of(registry, engine, registry.get(key))
    if key in engine.models:
        return DuplexVoicing(model=key, speaker=key)
    raise NotFound(f"unknown duplex speaker {name!r}")


def voicing_of(registry: Registry, engine: DuplexEngine, voice: Voice) -> DuplexVoicing:
    if voice.kind != "duplex":
        raise Unprocessable(
            f"voice {voice.name!r} is a {voice.kind} speech voice; duplex sessions need a "
            "duplex voice (POST /voices with strategy=duplex, or a PersonaPlex model's name)"
        )
    if voice.base_model not in engine.models:
        raise NotFound(
            f"voice {voice.name!r} needs model {voice.base_model!r}, which is not loaded"
        )

    def path(stored: str | None) -> Path | None:
        return None if stored is None else registry.artifacts_dir / stored

    return DuplexVoicing(
        model=voice.base_model,
        speaker=voice.name,
        adapter=path(voice.adapter),
        voice_prompt=path(voice.ref_clip),
        text_prompt=voice.meta.get("text_prompt"),
    )


async def install_duplex_package(
    service: Any, staging: Path, meta: dict[str, Any], name: str, model_name: str
) -> Voice:
    """Register a PersonaPlex voice package (adapter + voice prompt + text prompt) after its
    adapter actually loaded into the running model's bank."""
    engine: DuplexEngine = service.duplex
    model = engine.models[model_name]
    fields = _duplex_fields(meta)
    with package_errors():
        adapter_dir = package_folder(staging, meta["adapter"]) if meta.get("adapter") else None
        prompt_name = fields.voice_prompt or (
            "ref.wav" if (staging / "ref.wav").is_file() else None
        )
        prompt = None if prompt_name is None else package_file(staging, prompt_name, "voice_prompt")
        named = [staging / "voice.json", staging / "ref.wav", adapter_dir, prompt]
        refuse_strays(staging, [p for p in named if p is not None])
    if adapter_dir is not None:
        with package_relative(meta["adapter"]):
            tensors = await anyio.to_thread.run_sync(
                lambda: DuplexAdapterTensors.read(adapter_dir, family=model.family)
            )

        def check() -> None:
            model.bank.ensure(tensors)  # proves it fits; the final copy loads per session
            model.bank.unload(str(tensors.path))

        await engine.run(check)
    if prompt is not None and prompt_name is not None:
        await anyio.to_thread.run_sync(_check_prompt, prompt, prompt_name)
    target = service.voices_dir / name  # claimed (empty) by the caller: staged goes over it
    staging.rename(target)
    try:
        rel = target.relative_to(service.registry.artifacts_dir)
        voice = Voice(
            name=name,
            base_model=model_name,
            kind="duplex",
            adapter=str(rel / meta["adapter"]) if adapter_dir is not None else None,
            slot=None,
            ref_clip=str(rel / prompt_name) if prompt_name is not None else None,
            default_language=meta.get("language"),
            meta={
                "strategy": "duplex",
                "source": meta.get("source", "package"),
                "text_prompt": fields.text_prompt,
            },
        )
        return await service.commit(voice)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


class DuplexPackageFields(msgspec.Struct, kw_only=True):
    """voice.json fields of a PersonaPlex package (beyond the shared ones)."""

    voice_prompt: str | None = None  # an audio file of the package
    text_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.voice_prompt is not None:
            check_package_path("voice_prompt", self.voice_prompt)


def _duplex_fields(meta: dict[str, Any]) -> DuplexPackageFields:
    with package_errors():
        return decode_package_fields(meta, DuplexPackageFields)


def _check_prompt(path: Path, name: str) -> None:
    """The voice prompt decodes to finite audio, as a session will read it."""
    try:
        audio = load_audio(path, 24_000)
    except Exception as exc:  # any decoder failure is the package's fault
        raise Unprocessable(
            f"voice_prompt {name!r} cannot be decoded ({type(exc).__name__})"
        ) from exc
    if audio.size == 0 or not np.isfinite(audio).all():
        raise Unprocessable(f"voice_prompt {name!r} holds no usable audio")


async def unload_duplex_voice(service: Any, voice: Voice) -> None:
    engine: DuplexEngine = service.duplex
    model = engine.models[voice.base_model]
    adapter = None if voice.adapter is None else service.registry.artifacts_dir / voice.adapter
    prompt = None if voice.ref_clip is None else service.registry.artifacts_dir / voice.ref_clip

    def unload() -> None:
        if adapter is not None:
            model.bank.unload(str(adapter))
        if prompt is not None:
            model.prompt_cache.pop(str(prompt), None)

    await engine.run(unload)
