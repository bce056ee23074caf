"""Helpers for duplex tests: a websockets client speaking the Moshi framing, and a tiny
PersonaPlex duplex voice package with a non-trivial adapter."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import soundfile as sf
import websockets

FRAME = 1920
RATE = 24_000


@dataclass
class Conversation:
    kinds: list[int] = field(default_factory=list)  # every message's kind, in arrival order
    audio: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    close_code: int | None = None
    handshake_s: float | None = None

    @property
    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.audio), dtype="<i2")


def ws_url(http_url: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return http_url.replace("http://", "ws://") + "/duplex?" + query


def user_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like noise: band-limited noise with a syllable-rate envelope, float32."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE / FRAME) * FRAME
    t = np.arange(n) / RATE
    noise = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t)
    return (0.3 * noise * envelope).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def converse(
    url: str,
    *,
    audio: np.ndarray | None = None,
    min_audio_frames: int = 0,
    timeout: float = 120.0,
    headers: dict[str, str] | None = None,
    before: list[bytes] = (),
    chunk_frames: int = 1,
) -> Conversation:
    """Connect, send `before` then `audio` (PCM16 in chunks), read until enough audio frames
    came back (or the server closed), then close."""
    out = Conversation()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:

        async def receive() -> None:
            try:
                async for message in ws:
                    kind = message[0]
                    out.kinds.append(kind)
                    payload = message[1:]
                    if kind == 0x00 and out.handshake_s is None:
                        out.handshake_s = loop.time() - started
                    elif kind == 0x01:
                        out.audio.append(payload)
                    elif kind == 0x02:
                        out.text.append(payload.decode("utf-8"))
                    elif kind == 0x04:
                        out.metadata = json.loads(payload)
                    elif kind == 0x05:
                        out.errors.append(payload.decode("utf-8"))
                    if min_audio_frames and len(out.audio) >= min_audio_frames:
                        return
            except websockets.ConnectionClosed:
                pass

        reader = asyncio.create_task(receive())
        for message in before:
            await ws.send(message)
        if audio is not None:
            step = FRAME * chunk_frames
            for start in range(0, len(audio), step):
                await ws.send(b"\x01" + pcm16(audio[start : start + step]))
        try:
            await asyncio.wait_for(reader, timeout)
        finally:
            reader.cancel()
        await ws.close()
    out.close_code = ws.close_code
    return out


async def rejected(url: str, headers: dict[str, str] | None = None) -> Conversation:
    """A connection the server refuses: collect its 0x05 reason and close code."""
    out = Conversation()
    async with websockets.connect(url, additional_headers=headers) as ws:
        try:
            async for message in ws:
                out.kinds.append(message[0])
                if message[0] == 0x05:
                    out.errors.append(message[1:].decode("utf-8"))
        except websockets.ConnectionClosed:
            pass
    out.close_code = ws.close_code
    return out


def write_duplex_package(
    loaded: Any, out_dir: Path, *, seed: int = 0, text_prompt: str | None = "You are kind."
) -> Path:
    """A duplex voice package with a LoRA adapter (random non-zero B) and fully trained
    `audio_embs.0.weight` / `out_norm.weight`, plus a voice prompt clip."""
    from finetune.config import PERSONAPLEX_TARGETS
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.lora import LoRAConfig, apply_lora, save_adapters

    import mlx.core as mx
    from mlx.utils import tree_flatten

    fresh = load_personaplex(loaded.path)  # never touch the shared session model
    lm = fresh.lm
    config = LoRAConfig(rank=4, alpha=8.0, targets=list(PERSONAPLEX_TARGETS), scope="")
    apply_lora(lm, config)
    rng = np.random.default_rng(seed)
    updates = []
    for name, value in tree_flatten(lm.parameters()):
        if name.endswith("lora_b"):
            updates.append((name, mx.array(rng.normal(0, 0.5, value.shape).astype(np.float32))))
    emb = np.array(lm.audio_embs[0].weight)
    updates.append(("audio_embs.0.weight", mx.array(emb + rng.normal(0, 0.5, emb.shape))))
    updates.append(("out_norm.weight", mx.array(np.array(lm.out_norm.weight) * 1.5)))
    lm.load_weights(updates, strict=False)
    package = Path(out_dir)
    package.mkdir(parents=True, exist_ok=True)
    save_adapters(
        package / "adapter",
        lm,
        config,
        {
            "family": "personaplex",
            "module": "lm",
            "strategy": "duplex",
            "trained_tensors": ["audio_embs.0.weight", "out_norm.weight"],
        },
    )
    t = np.arange(RATE) / RATE
    sf.write(package / "voice_prompt.wav", (0.2 * np.sin(2 * np.pi * 220 * t)), RATE)
    meta = {
        "format": "voicefoundry.voice/1",
        "family": "personaplex",
        "kind": "duplex",
        "strategy": "duplex",
        "name": "packaged-duplex",
        "adapter": "adapter",
        "voice_prompt": "voice_prompt.wav",
        "text_prompt": text_prompt,
    }
    (package / "voice.json").write_text(json.dumps(meta))
    return package


def handshake_payload(message: bytes) -> tuple[int, int]:
    return struct.unpack("<II", message[1:9])
