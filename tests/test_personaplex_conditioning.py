"""Training reads exactly what a duplex session reads: the shared conditioning (voice prompt,
spacers, `<system>` text prompt, the streams' first step) makes the teacher-forced logits of an
exchange equal the streaming runtime's, step for step."""

from __future__ import annotations

from finetune.families.personaplex import runtime as runtime_module
from finetune.families.personaplex.conditioning import (
    DuplexConditioning,
    conditioned_codes,
    prefix_codes,
)
from finetune.families.personaplex.forward import teacher_forced
from finetune.families.personaplex.mimi_stream import MimiStreamer
from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.personaplex.training import mimi_encoder

import mlx.core as mx
import numpy as np

from tests.duplex_helpers import FRAME, user_audio

FRAMES = 6
TEXT_PROMPT = "You are a wise and friendly teacher."


def test_teacher_forced_exchange_equals_the_conditioned_session(loaded_personaplex, monkeypatch):
    loaded = loaded_personaplex
    rng = np.random.default_rng(5)
    voice = user_audio(0.6, seed=4)
    user = user_audio(FRAMES * FRAME / 24_000, seed=6)
    text = rng.integers(4, 150, FRAMES)
    agent = rng.integers(0, 2048, (FRAMES, 8))
    exchange = np.concatenate([text[:, None], agent, mimi_encoder(loaded.mimi)(user)], axis=1)
    cond = DuplexConditioning.build(
        MimiStreamer(loaded.mimi),
        loaded.text_tokenizer,
        voice_prompt=voice,
        text_prompt=TEXT_PROMPT,
    )
    codes, prompt = conditioned_codes(prefix_codes(cond), exchange)
    trained = teacher_forced(loaded.lm, codes.T[None])

    # The session samples exactly the exchange's tokens; its logits are recorded.
    calls: list[mx.array] = []

    def forcing(logits: mx.array, *_: object) -> mx.array:
        step, index = divmod(len(calls), 9)  # the text, then 8 agent codebooks
        calls.append(logits)
        if index == 0:
            return mx.array([int(text[step])], mx.int32)
        if index == 1:
            return mx.array([int(agent[step, 0])], mx.int32)
        return mx.array([int(agent[max(step - 1, 0), index - 1])], mx.int32)  # delayed by one

    monkeypatch.setattr(runtime_module, "sample_top_k", forcing)
    runtime = PersonaPlexRuntime(loaded)
    session = runtime.new_session(seed=0, voice_prompt=voice, text_prompt=TEXT_PROMPT)
    runtime.condition(session)
    assert session.conditioning_steps == prompt + 1  # the first prompt frame is never read
    for n in range(FRAMES):
        runtime.step([session], [user[n * FRAME : (n + 1) * FRAME]])

    served_text = np.stack([np.array(calls[9 * n][0]) for n in range(FRAMES)])
    trained_text = np.array(trained.text_logits[0, prompt : prompt + FRAMES])
    np.testing.assert_allclose(served_text, trained_text, atol=2e-3, rtol=1e-3)
    served_audio = np.stack([np.array(calls[9 * n + 1][0]) for n in range(FRAMES)])
    trained_audio = np.array(trained.audio_logits[0, 0, prompt : prompt + FRAMES])
    np.testing.assert_allclose(served_audio, trained_audio, atol=2e-3, rtol=1e-3)

    # Without the prompts (what training did before), the logits are another model's.
    bare = teacher_forced(loaded.lm, exchange.T[None])
    assert not np.allclose(np.array(bare.text_logits[0, :FRAMES]), served_text, atol=1e-2)
