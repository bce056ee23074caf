"""A PersonaPlex session stepped in process (no socket): seeded user frames and the trace of
what each tick gave, for tests that compare two runs tick for tick."""

from __future__ import annotations

from finetune.families.personaplex.runtime import PersonaPlexRuntime
from finetune.families.personaplex.session import DuplexSession, StepOut

import numpy as np

# One entry a tick: the text token, the audio tokens, the PCM bytes.
Trace = list[tuple[int, tuple[int, ...], bytes]]


def user_frame(stream: int, step: int) -> np.ndarray:
    return np.random.default_rng(1000 * stream + step).normal(0.0, 0.1, 1920).astype(np.float32)


def record(session: DuplexSession, out: StepOut, trace: Trace) -> None:
    trace.append((out.text_token, tuple(session.last_tokens), out.pcm.tobytes()))


def live(runtime: PersonaPlexRuntime, seed: int, **kwargs) -> DuplexSession:
    session = runtime.new_session(seed=seed, **kwargs)
    runtime.condition(session)
    return session


def run_alone(runtime: PersonaPlexRuntime, session: DuplexSession, stream: int, n: int) -> Trace:
    trace: Trace = []
    for i in range(n):
        record(session, runtime.step([session], [user_frame(stream, i)])[0], trace)
    return trace
