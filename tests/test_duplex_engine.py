"""The duplex engine without sockets: banked adapters vs fused weights, input bounds, freeing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from server.duplex import protocol as proto
from server.duplex.codec import Pcm16Decoder, Pcm16Encoder
from server.duplex.engine import DuplexEngine, DuplexModel, DuplexVoicing, SessionLimit
from tests.duplex_helpers import FRAME, user_audio, write_duplex_package


@pytest.fixture(scope="module")
def duplex_package(loaded_personaplex, tmp_path_factory) -> Path:
    return write_duplex_package(loaded_personaplex, tmp_path_factory.mktemp("dpkg") / "pkg")


def _model(path: Path) -> DuplexModel:
    return DuplexModel.load("pp", str(path), slots=4, max_rank=8, max_bytes=1 << 30)


def _tokens_and_audio(runtime, state, frames) -> tuple[list[int], np.ndarray]:
    tokens, audio = [], []
    for frame in frames:
        (out,) = runtime.step([state], [frame])
        tokens.append(out.text_token)
        audio.append(out.pcm)
    return tokens, np.concatenate(audio)


def test_banked_adapter_session_equals_the_fused_model(tiny_personaplex, duplex_package):
    """Adapter in a bank slot (per-row gather + per-slot full tensors) == weights fused in."""
    from finetune.families.personaplex.checkpoint import load_personaplex
    from finetune.families.personaplex.runtime import PersonaPlexRuntime
    from finetune.lora import fuse_lora, load_adapters

    import mlx.core as mx

    from server.duplex.adapters import DuplexAdapterTensors

    frames = [user_audio(0.8, seed=9)[i * FRAME : (i + 1) * FRAME] for i in range(10)]
    banked = _model(tiny_personaplex)
    slot = banked.bank.ensure(DuplexAdapterTensors.read(duplex_package / "adapter"))
    state = banked.runtime.new_session(seed=3, adapter_slot=slot)
    banked.runtime.condition(state)
    bank_tokens, bank_audio = _tokens_and_audio(banked.runtime, state, frames)

    fused = load_personaplex(tiny_personaplex)
    load_adapters(fused.lm, duplex_package / "adapter")
    fuse_lora(fused.lm)
    mx.eval(fused.lm.parameters())
    runtime = PersonaPlexRuntime(fused)
    state = runtime.new_session(seed=3)
    runtime.condition(state)
    fused_tokens, fused_audio = _tokens_and_audio(runtime, state, frames)

    base_state = banked.runtime.new_session(seed=3)
    banked.runtime.condition(base_state)
    base_tokens, _ = _tokens_and_audio(banked.runtime, base_state, frames)

    assert bank_tokens == fused_tokens
    np.testing.assert_allclose(bank_audio, fused_audio, atol=1e-4)
    assert bank_tokens != base_tokens, "the adapter must change what the model says"


def test_inbox_is_bounded_and_drops_are_counted(tiny_personaplex):
    async def scenario() -> tuple[int, int]:
        engine = DuplexEngine(max_sessions=2, max_inbox_frames=5)
        engine.start()
        try:
            model = await engine.run(lambda: _model(tiny_personaplex))
            engine.models["pp"] = model
            session = await engine.open(DuplexVoicing(model="pp", speaker="pp"), seed=0)
            session.paused = True  # nothing is stepped: the inbox only fills
            frames = [np.zeros(FRAME, np.float32)] * 12
            dropped = engine.feed(session, frames)
            queued = len(session.inbox)
            session.paused = False
            outs = [await asyncio.wait_for(session.out.get(), 60) for _ in range(queued)]
            assert all(o.pcm.shape == (FRAME,) for o in outs)
            await engine.close(session)
            return dropped, queued
        finally:
            engine.stop()

    dropped, queued = asyncio.run(scenario())
    assert (dropped, queued) == (7, 5)


def test_session_limit_and_close_frees_state(tiny_personaplex):
    async def scenario() -> None:
        engine = DuplexEngine(max_sessions=2)
        engine.start()
        try:
            engine.models["pp"] = await engine.run(lambda: _model(tiny_personaplex))
            voicing = DuplexVoicing(model="pp", speaker="pp")
            a = await engine.open(voicing, seed=0)
            b = await engine.open(voicing, seed=1)
            with pytest.raises(SessionLimit):
                await engine.open(voicing, seed=2)
            await engine.close(a)
            await engine.close(a)  # twice is fine
            assert a.state is None and a.id not in engine.sessions
            c = await engine.open(voicing, seed=2)
            assert engine.live_sessions == 2
            await engine.close(b)
            await engine.close(c)
            assert engine.live_sessions == 0
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_pcm16_decoder_reframes_any_split():
    samples = (user_audio(0.5, seed=1) * 0.9).astype(np.float32)
    data = Pcm16Encoder().encode(samples)
    decoder = Pcm16Decoder()
    frames = []
    for cut in range(0, len(data), 777):  # odd sizes: samples split across messages
        frames += decoder.feed(data[cut : cut + 777])
    joined = np.concatenate(frames)
    assert len(frames) == len(samples) // FRAME
    np.testing.assert_allclose(joined, samples[: len(joined)], atol=2 / 32767)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "empty"),
        (b"\x07", "unknown message kind"),
        (b"\x02hello", "clients may not send text"),
        (b"\x03", "control"),
        (b"\x03\x09", "control"),
        ("text", "text frames"),
    ],
)
def test_malformed_messages_are_named(message, reason):
    with pytest.raises(proto.MalformedMessage, match=reason):
        proto.parse(message)


def test_well_formed_messages_parse():
    assert proto.parse(b"\x01abc") == (proto.Kind.AUDIO, b"abc")
    assert proto.parse(b"\x03\x02") == (proto.Kind.CONTROL, b"\x02")
    assert proto.parse(b"\x06") == (proto.Kind.PING, b"")
