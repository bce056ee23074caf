"""The PersonaPlex duplex runtime: conditioning, streaming, batching, adapters, cleanup."""

from __future__ import annotations

import gc
import weakref

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)
from finetune.families.personaplex.loudness import integrated_loudness, normalize_loudness
from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.personaplex.session import DuplexError, DuplexSession
from finetune.lora import AdapterError

import mlx.core as mx
import numpy as np
import pytest

from tests.personaplex_helpers import Trace, live, record, run_alone, user_frame

VOICE = (0.3 * np.random.default_rng(7).normal(size=24000)).astype(np.float32)
ROLE = "You enjoy having a good conversation."


@pytest.fixture(scope="module")
def runtime(loaded_personaplex) -> PersonaPlexRuntime:
    return PersonaPlexRuntime(loaded_personaplex)


def test_conditioned_session_streams_three_seconds(runtime: PersonaPlexRuntime) -> None:
    session = live(runtime, 11, voice_prompt=VOICE, text_prompt=ROLE)
    prompt_tokens = len(runtime.tokenizer.encode(f"<system> {ROLE} <system>"))
    assert session.phase == "live"
    # 13 voice-prompt frames (1 s) + 6 spacer + the role tokens + 6 spacer.
    assert session.position == 13 + 6 + prompt_tokens + 6
    tokens = []
    for i in range(38):
        out = runtime.step([session], [user_frame(1, i)])[0]
        assert out.pcm.dtype == np.float32 and out.pcm.shape == (1920,)
        assert np.isfinite(out.pcm).all()
        assert 0 <= out.text_token < 32000
        assert out.text is None or isinstance(out.text, str)
        tokens.append(out.text_token)
    assert tokens[0] == 3  # the first frame's text is the last spacer's forced pad
    assert len(set(tokens)) > 5 and np.abs(out.pcm).max() > 0
    assert session.live_steps == 38


def test_same_seed_same_output_other_seed_differs(runtime: PersonaPlexRuntime) -> None:
    first = run_alone(runtime, live(runtime, 3, voice_prompt=VOICE, text_prompt=ROLE), 1, 8)
    again = run_alone(runtime, live(runtime, 3, voice_prompt=VOICE, text_prompt=ROLE), 1, 8)
    other = run_alone(runtime, live(runtime, 4, voice_prompt=VOICE, text_prompt=ROLE), 1, 8)
    assert first == again
    assert [t[:2] for t in first] != [t[:2] for t in other]


def test_batched_steps_match_sessions_stepped_alone(runtime: PersonaPlexRuntime) -> None:
    """Three sessions joining at different times: batched output == each session alone."""
    specs = {
        "a": dict(seed=21, voice_prompt=VOICE, text_prompt=ROLE),
        "b": dict(seed=22, text_prompt="Your name is Jane."),
        "c": dict(seed=23),
    }
    starts = {"a": 0, "b": 2, "c": 4}
    ticks = 7
    alone = {
        name: run_alone(runtime, live(runtime, **specs[name]), i, ticks - starts[name])
        for i, name in enumerate(specs)
    }
    sessions: dict[str, DuplexSession] = {}
    batched: dict[str, Trace] = {name: [] for name in specs}
    for tick in range(ticks):
        for name, start in starts.items():
            if start == tick:
                sessions[name] = live(runtime, **specs[name])
        names = sorted(sessions, reverse=tick % 2 == 1)  # row order must not matter
        frames = [user_frame(list(specs).index(n), tick - starts[n]) for n in names]
        outs = runtime.step([sessions[n] for n in names], frames)
        for name, out in zip(names, outs, strict=True):
            record(sessions[name], out, batched[name])
    for name in specs:
        assert batched[name] == alone[name], name


def test_set_rows_and_full_weights_apply_per_session(loaded_personaplex) -> None:
    calls: list[list[int] | None] = []
    runtime = PersonaPlexRuntime(loaded_personaplex, set_rows=calls.append)

    def pair() -> tuple[Trace, Trace]:
        adapted = live(runtime, 31, text_prompt=ROLE, adapter_slot=2)
        assert calls[-1] == [2]  # conditioning runs the session's own row
        base = live(runtime, 32, text_prompt=ROLE)
        traces: tuple[Trace, Trace] = ([], [])
        for i in range(5):
            outs = runtime.step([adapted, base], [user_frame(1, i), user_frame(2, i)])
            assert calls[-1] == [2, 0]
            record(adapted, outs[0], traces[0])
            record(base, outs[1], traces[1])
        return traces

    plain_adapted, plain_base = pair()
    rng = np.random.default_rng(5)
    dim = loaded_personaplex.lm_config.transformer.d_model
    full = {f"audio_embs.{k}.weight": rng.normal(size=(2049, dim)) for k in (0, 3, 12)}
    full["out_norm.weight"] = rng.uniform(0.2, 3.0, size=(dim,))
    runtime.install_full_weights(2, full)
    assert runtime.full_weight_slots() == [2]
    tuned_adapted, tuned_base = pair()
    assert tuned_base == plain_base
    assert [t[:2] for t in tuned_adapted] != [t[:2] for t in plain_adapted]
    runtime.clear_full_weights(2)
    cleared_adapted, _ = pair()
    assert cleared_adapted == plain_adapted

    with pytest.raises(AdapterError, match="slot >= 1"):
        runtime.install_full_weights(0, full)
    with pytest.raises(AdapterError) as err:
        runtime.install_full_weights(
            3, {"text_linear.weight": np.zeros((2, 2)), "out_norm.weight": np.zeros(3)}
        )
    assert "text_linear.weight is not a fully trained" in str(err.value)
    assert "out_norm.weight has shape (3,)" in str(err.value)
    assert runtime.full_weight_slots() == []


def test_closed_session_is_freed(runtime: PersonaPlexRuntime) -> None:
    session = live(runtime, 41, text_prompt=ROLE)
    runtime.step([session], [user_frame(0, 0)])
    ref = weakref.ref(session)
    runtime.close(session)
    assert session.phase == "closed" and session.temporal_cache == []
    with pytest.raises(DuplexError, match="closed"):
        runtime.step([session], [user_frame(0, 1)])
    del session
    gc.collect()
    assert ref() is None  # the runtime keeps no reference
    for module, attr in runtime.mimi._encoder.slots + runtime.mimi._decoder.slots:
        assert getattr(module, attr) in (None, False)  # no session state left on Mimi


def test_bad_inputs_get_typed_errors(runtime: PersonaPlexRuntime) -> None:
    fresh = runtime.new_session(seed=1)
    with pytest.raises(DuplexError, match="not live"):
        runtime.step([fresh], [user_frame(0, 0)])
    runtime.condition(fresh)
    with pytest.raises(DuplexError, match="only a new session"):
        runtime.condition(fresh)
    with pytest.raises(DuplexError, match="960 samples, expected 1920"):
        runtime.step([fresh], [np.zeros(960, np.float32)])
    with pytest.raises(DuplexError, match="appears twice"):
        runtime.step([fresh, fresh], [user_frame(0, 0)] * 2)
    with pytest.raises(DuplexError, match="text_temperature"):
        runtime.new_session(text_temperature=-1.0)
    with pytest.raises(DuplexError, match="voice_prompt"):
        runtime.new_session(voice_prompt=np.zeros((2, 100), np.float32))


def test_loudness_normalisation_matches_bs1770() -> None:
    rate = 48000
    t = np.arange(rate * 3) / rate
    sine = np.sin(2 * np.pi * 997 * t).astype(np.float32)
    assert integrated_loudness(sine, rate) == pytest.approx(-3.01, abs=0.1)
    quiet = normalize_loudness(0.01 * sine, rate, target=-24.0)
    assert integrated_loudness(quiet, rate) == pytest.approx(-24.0, abs=0.01)
    silent = np.zeros(rate, np.float32)
    assert np.array_equal(normalize_loudness(silent, rate), silent)


def test_mimi_batch_matches_each_session_alone(runtime: PersonaPlexRuntime) -> None:
    """One batched Mimi encode / decode per tick == each stream alone, bit for bit, with
    streams joining at different ticks (fresh rows beside running ones) and rows reordered."""
    mimi = runtime.mimi
    starts = [0, 0, 1, 3, 3]
    rng = np.random.default_rng(9)
    pcm = [[user_frame(s, t) for t in range(5)] for s in range(len(starts))]
    codes = [rng.integers(0, 2048, (5, 8, 1)).astype(np.int32) for _ in starts]
    alone = [(mimi.new_encoder(), mimi.new_decoder()) for _ in starts]
    batched = [(mimi.new_encoder(), mimi.new_decoder()) for _ in starts]
    for tick in range(5):
        rows = [s for s, start in enumerate(starts) if start <= tick]
        rows = rows[::-1] if tick % 2 else rows
        local = [tick - starts[s] for s in rows]
        enc = mimi.encode_batch(
            [batched[s][0] for s in rows],
            mx.array(np.stack([pcm[s][t] for s, t in zip(rows, local, strict=True)])),
        )
        dec = mimi.decode_batch(
            [batched[s][1] for s in rows],
            mx.array(np.stack([codes[s][t] for s, t in zip(rows, local, strict=True)])),
        )
        enc, dec = np.array(enc), np.array(dec)
        assert enc.shape == (len(rows), 8, 1) and dec.shape == (len(rows), 1920)
        for j, (s, t) in enumerate(zip(rows, local, strict=True)):
            one_enc = np.array(mimi.encode(alone[s][0], mx.array(pcm[s][t])))[0]
            one_dec = np.array(mimi.decode(alone[s][1], mx.array(codes[s][t])))
            assert np.array_equal(enc[j], one_enc), (tick, s)
            assert np.array_equal(dec[j], one_dec), (tick, s)
    for state in [batched[0][0], batched[0][1]]:
        assert state.frames == 5 and all(c.offset == 10 for c in state.caches)
    for module, attr in mimi._encoder.slots + mimi._decoder.slots:
        assert getattr(module, attr) in (None, False)  # no session state left on Mimi
    with pytest.raises(ValueError, match="one row per state"):
        mimi.encode_batch([alone[0][0]], mx.zeros((2, 1920)))
