"""One session's delayed streams: the ring buffer of tokens and of which ones are forced.

The same bookkeeping as NVIDIA's `LMGen` (`prepare_step_input` / `process_transformer_output`):
17 streams (text, 8 agent, 8 user codebooks) with per-stream delays. A token given for step
`t` is written at `t + delay`; step `t` feeds the model the column at `t - 1` and samples the
column at `t` wherever no token was forced there. The first call (t = 0) runs no model; an output
frame (aligned across delays) comes once `t > max(delays)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNGENERATED = -2


@dataclass
class PreparedStep:
    inputs: np.ndarray  # [K] tokens fed to the model this step
    target: np.ndarray  # [K] tokens already at the target column (valid where forced)
    forced: np.ndarray  # [K] bool: target token was given, not to be sampled
    input_position: int
    target_position: int


class DelayedStreams:
    def __init__(
        self, delays: Sequence[int], *, text_initial: int, audio_initial: int, agent: int
    ) -> None:
        self.delays = np.asarray(delays, dtype=np.int64)
        self.streams = len(self.delays)
        self.agent = agent
        self.user = self.streams - 1 - agent
        self.max_delay = int(self.delays.max())
        self.width = self.max_delay + 3
        self.tokens = np.full((self.streams, self.width), UNGENERATED, dtype=np.int64)
        self.provided = np.zeros((self.streams, self.width), dtype=bool)
        self.initial = np.array([text_initial] + [audio_initial] * (self.streams - 1))
        self.offset = 0

    def prepare(
        self,
        *,
        user: Sequence[int] | np.ndarray | None,
        agent: Sequence[int] | np.ndarray | None = None,
        text: int | None = None,
    ) -> PreparedStep | None:
        """Write the tokens given for this step; None on the very first step (no model call)."""
        width = self.width
        if user is not None:
            self._write(1 + self.agent, user)
        if agent is not None:
            self._write(1, agent)
        if text is not None:
            position = (self.offset + int(self.delays[0])) % width
            self.tokens[0, position] = int(text)
            self.provided[0, position] = True
        current = self.offset % width
        for k in np.nonzero(self.offset <= self.delays)[0]:
            self.tokens[k, current] = self.initial[k]
            self.provided[k, current] = True
        if self.offset == 0:
            self.tokens[:, 0] = self.initial
            self.offset = 1
            return None
        input_position = (self.offset - 1) % width
        target_position = self.offset % width
        inputs = self.tokens[:, input_position].copy()
        if (inputs == UNGENERATED).any():
            raise RuntimeError(f"ungenerated token in the model input at step {self.offset}")
        return PreparedStep(
            inputs=inputs,
            target=self.tokens[:, target_position].copy(),
            forced=self.provided[:, target_position].copy(),
            input_position=input_position,
            target_position=target_position,
        )

    def _write(self, first: int, values: Sequence[int] | np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.int64).reshape(-1)
        for q, value in enumerate(flat):
            k = first + q
            position = (self.offset + int(self.delays[k])) % self.width
            self.tokens[k, position] = value
            self.provided[k, position] = True

    def commit(
        self, step: PreparedStep, text: int, agent_audio: Sequence[int] | np.ndarray | None
    ) -> np.ndarray | None:
        """Store the sampled tokens where nothing was forced; the aligned output frame
        [text, agent codebooks...] once the delayed streams are full, else None."""
        target = step.target_position
        self.provided[:, step.input_position] = False
        if not self.provided[0, target]:
            self.tokens[0, target] = text
        generated = 1 + self.agent
        if agent_audio is not None:
            sampled = np.asarray(agent_audio, dtype=np.int64)
            kept = self.tokens[1:generated, target]
            forced = self.provided[1:generated, target]
            self.tokens[1:generated, target] = np.where(forced, kept, sampled)
        elif not self.provided[1:generated, target].all():
            raise RuntimeError("agent audio tokens were neither forced nor sampled")
        if not self.provided[generated:, target].all():
            raise RuntimeError("user audio tokens must be given every step")
        if self.offset <= self.max_delay:
            self.offset += 1
            return None
        columns = (self.offset - self.max_delay + self.delays[:generated]) % self.width
        frame = self.tokens[np.arange(generated), columns].copy()
        self.offset += 1
        return frame
