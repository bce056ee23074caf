"""The streaming full-duplex generator for PersonaPlex: many sessions over one loaded model.

mlx-audio's `LmGen` cannot drive PersonaPlex (dep_q 16, forced tokens, prompts), so this is
ours, following NVIDIA's `LMGen` and `server.py`:

- `new_session` makes a `DuplexSession` that owns every piece of conversation state (temporal
  KV cache, Mimi encoder / decoder streams, delayed-stream ring buffer, RNG key, sampling
  parameters, adapter slot). The runtime keeps no reference to any session.
- `condition` runs the prompts before the session goes live, in NVIDIA's order: the voice
  prompt (normalised to -24 LUFS, streamed through a fresh Mimi encoder) as forced agent tokens
  with text token 3 and sine tokens on the user stream; 0.5 s of agent silence; the text prompt
  `<system> ... <system>`, one forced text token a step; 0.5 s of silence (`conditioning.py`,
  which training prepends to every exchange too). Every token of those
  steps is forced, so nothing is sampled and the depformer is not needed: the steps' model
  inputs are run as one causal prefill of the temporal transformer (chunks of 256 steps).
- `step` advances any subset of live sessions by one 80 ms frame: ONE batched Mimi encode
  (see `mimi_stream.py`), ONE batched temporal-transformer pass and ONE batched depformer pass
  for all of them (see `temporal.py` for the per-row attention), then ONE batched Mimi decode.
  Only the 8 agent depformer slices run: the 8 user-stream slices' samples are always
  overwritten by the user's own tokens (NVIDIA computes and discards them).
- The output frame of a step is aligned across delays as in NVIDIA's server: its text token is
  the one sampled on the previous step, its audio the agent codes completed on this one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from finetune.families.personaplex.conditioning import (
    DuplexConditioning,
    Frame,
    encode_voice_prompt,
    prompt_frames,
)
from finetune.families.personaplex.layout import (
    FRAME_SIZE,
    SAMPLE_RATE,
    STREAM_CODEBOOKS,
    TEXT_EPAD_ID,
    TEXT_PAD_ID,
)
from finetune.families.personaplex.mimi_stream import MimiStreamer
from finetune.families.personaplex.sampling import (
    CandidateDraw,
    Draw,
    FullVocabDraw,
    SamplingParams,
    bias_text_logits,
    candidate_count,
    draw_noise,
    sample_top_k,
    stream_keys,
)
from finetune.families.personaplex.session import DuplexError, DuplexSession, StepOut
from finetune.families.personaplex.streams import DelayedStreams, PreparedStep
from finetune.families.personaplex.temporal import (
    FullWeights,
    depformer_sample,
    embed_inputs,
    new_temporal_cache,
    out_norm,
    temporal_forward,
)
from finetune.families.personaplex.text_tokenizer import text_prompt_tokens, token_text
from finetune.lora import AdapterError

import mlx.core as mx
import numpy as np

PREFILL_CHUNK = 256
MAX_VOICE_PROMPT_SECONDS = 120.0
UNPENALISED = frozenset({TEXT_PAD_ID, TEXT_EPAD_ID})  # the model's silence is no repetition


class PersonaPlexRuntime:
    def __init__(
        self,
        loaded: Any,
        set_rows: Callable[[list[int] | None], None] | None = None,
        *,
        fast: bool = True,
    ) -> None:
        """`fast=False` keeps the tick as it was before its speed-ups (MLX's ELU in Mimi, a
        full sort for top-k, noise over the whole vocabulary): only there for
        tests/bench/bench_duplex.py to measure against."""
        self.loaded = loaded
        self.lm = loaded.lm
        self.cfg = loaded.lm_config
        self.tokenizer = loaded.text_tokenizer
        self.fast = fast
        self.mimi = MimiStreamer(loaded.mimi, fast=fast)
        self.set_rows = set_rows
        self.agent = STREAM_CODEBOOKS
        self.delays = [0, *self.cfg.audio_delays]
        self.text_vocab = int(self.cfg.text_out_vocab_size)
        self.audio_card = int(self.cfg.audio_vocab_size) - 1  # 2048 codes; 2048 = initial token
        self._full: dict[int, FullWeights] = {}
        self._full_shapes = {"out_norm.weight": tuple(self.lm.out_norm.weight.shape)}
        for k, emb in enumerate(self.lm.audio_embs):
            self._full_shapes[f"audio_embs.{k}.weight"] = tuple(emb.weight.shape)

    # -----------------------------------------------------------------------------------------
    # Sessions
    # -----------------------------------------------------------------------------------------
    def new_session(
        self,
        *,
        seed: int | None = None,
        voice_prompt: np.ndarray | None = None,
        text_prompt: str | None = None,
        adapter_slot: int = 0,
        text_temperature: float = 0.7,
        audio_temperature: float = 0.8,
        text_top_k: int = 25,
        audio_top_k: int = 250,
        repetition_penalty: float = 1.0,
        repetition_context: int = 64,
        pad_bias: float = 0.0,
        text_seed: int | None = None,
        audio_seed: int | None = None,
    ) -> DuplexSession:
        """`seed` seeds both the text and the audio streams' sampling; `text_seed` /
        `audio_seed` seed one of them instead (None: `seed`; `seed` None: a random one)."""
        sampling = SamplingParams(
            text_temperature,
            audio_temperature,
            text_top_k,
            audio_top_k,
            repetition_penalty=repetition_penalty,
            repetition_context=repetition_context,
            pad_bias=pad_bias,
        )
        problems = sampling.problems()
        if not isinstance(adapter_slot, int) or adapter_slot < 0:
            problems.append(f"adapter_slot must be an int >= 0, not {adapter_slot!r}")
        for name, value in (("seed", seed), ("text_seed", text_seed), ("audio_seed", audio_seed)):
            if value is not None and (not isinstance(value, int) or not 0 <= value < 2**63):
                problems.append(f"{name} must be an int in [0, 2**63), not {value!r}")
        prompt = None
        if voice_prompt is not None:
            prompt, prompt_problem = _voice_prompt(voice_prompt)
            if prompt_problem:
                problems.append(prompt_problem)
        if text_prompt is not None and not isinstance(text_prompt, str):
            problems.append("text_prompt must be a string")
        if problems:
            raise DuplexError("; ".join(problems))
        seed = secrets.randbits(31) if seed is None else seed
        return DuplexSession(
            seed=seed,
            adapter_slot=adapter_slot,
            sampling=sampling,
            rng_key=stream_keys(seed, text_seed, audio_seed),
            voice_prompt=prompt,
            text_prompt_tokens=text_prompt_tokens(self.tokenizer, text_prompt),
            streams=DelayedStreams(
                self.delays,
                text_initial=self.text_vocab,
                audio_initial=self.audio_card,
                agent=self.agent,
            ),
            temporal_cache=new_temporal_cache(self.lm),
            encoder=self.mimi.new_encoder(),
            decoder=self.mimi.new_decoder(),
        )

    def close(self, session: DuplexSession) -> None:
        """Free the session's state; it cannot be stepped again."""
        session.free()

    def condition(self, session: DuplexSession) -> None:
        """Run the voice prompt, spacers and text prompt; the session is live afterwards."""
        if session.phase != "new":
            raise DuplexError(f"session is {session.phase}; only a new session can be conditioned")
        frames = self._prompt_frames(session)
        inputs = []
        for text, agent, user in frames:
            prepared = session.streams.prepare(user=user, agent=agent, text=text)
            if prepared is None:
                continue
            if not prepared.forced[: 1 + 2 * self.agent].all():
                raise RuntimeError("a conditioning step left a token to sample")
            inputs.append(prepared.inputs)
            session.streams.commit(prepared, int(prepared.target[0]), None)
        overrides = [self._full.get(session.adapter_slot)]
        for start in range(0, len(inputs), PREFILL_CHUNK):
            chunk = mx.array(np.stack(inputs[start : start + PREFILL_CHUNK]))[None]
            self._call_set_rows([session.adapter_slot])
            xs = embed_inputs(self.lm, chunk, overrides)
            temporal_forward(self.lm, xs, [session.temporal_cache])
            mx.eval([a for cache in session.temporal_cache for a in cache.arrays()])
        session.encoder = self.mimi.new_encoder()  # the user's stream starts fresh
        session.voice_prompt = None
        session.conditioning_steps = len(frames)
        session.phase = "live"

    def _prompt_frames(self, session: DuplexSession) -> list[Frame]:
        """The shared conditioning (`conditioning.py`): what training prepends, too."""
        voice = session.voice_prompt
        codes = None if voice is None else encode_voice_prompt(self.mimi, voice)
        return prompt_frames(DuplexConditioning(codes, list(session.text_prompt_tokens)))

    # -----------------------------------------------------------------------------------------
    # Live steps
    # -----------------------------------------------------------------------------------------
    def step(self, sessions: list[DuplexSession], user_pcm: list[np.ndarray]) -> list[StepOut]:
        """Advance each live session by one frame of the user's audio (1920 float32 samples)."""
        frames = self._check_step(sessions, user_pcm)
        if not sessions:
            return []
        codes = self.mimi.encode_batch([s.encoder for s in sessions], mx.array(np.stack(frames)))
        mx.eval(codes, [a for s in sessions for a in s.encoder.arrays()])
        user = list(np.array(codes)[:, :, 0])
        prepared = [s.streams.prepare(user=u) for s, u in zip(sessions, user, strict=True)]
        ready = [(i, p) for i, p in enumerate(prepared) if p is not None]
        rows = [i for i, _ in ready]
        sampled: dict[int, tuple[int, np.ndarray]] = {}
        if rows:
            sampled = self._model_step([sessions[i] for i in rows], [p for _, p in ready])
            sampled = {rows[j]: value for j, value in sampled.items()}
        outputs: list[np.ndarray | None] = []
        for i, (session, prep) in enumerate(zip(sessions, prepared, strict=True)):
            if prep is None:
                outputs.append(None)
                continue
            text, audio = sampled[i]
            outputs.append(session.streams.commit(prep, text, audio))
        return self._decode(sessions, outputs)

    def _check_step(
        self, sessions: list[DuplexSession], user_pcm: list[np.ndarray]
    ) -> list[np.ndarray]:
        if len(sessions) != len(user_pcm):
            raise DuplexError(f"{len(sessions)} sessions but {len(user_pcm)} PCM frames")
        if len({id(s) for s in sessions}) != len(sessions):
            raise DuplexError("a session appears twice in one step")
        frames = []
        for index, (session, pcm) in enumerate(zip(sessions, user_pcm, strict=True)):
            if session.phase != "live":
                raise DuplexError(f"session {index} is {session.phase}, not live")
            frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
            if frame.shape[0] != FRAME_SIZE:
                raise DuplexError(
                    f"frame {index} has {frame.shape[0]} samples, expected {FRAME_SIZE}"
                )
            if not np.isfinite(frame).all():
                raise DuplexError(f"frame {index} holds NaN or infinite samples")
            frames.append(frame)
        return frames

    def _model_step(
        self, sessions: list[DuplexSession], prepared: list[PreparedStep]
    ) -> dict[int, tuple[int, np.ndarray]]:
        """One batched temporal + depformer pass; row -> (sampled text, sampled agent codes)."""
        lm = self.lm
        slots = [s.adapter_slot for s in sessions]
        overrides = [self._full.get(slot) for slot in slots] if self._full else None
        self._call_set_rows(slots)
        tokens = mx.array(np.stack([p.inputs for p in prepared]))[:, None, :]
        hidden = temporal_forward(
            lm, embed_inputs(lm, tokens, overrides), [s.temporal_cache for s in sessions]
        )
        hidden = out_norm(lm, hidden, overrides)
        text_logits = lm.text_linear(hidden)[:, 0]
        if any(s.sampling.biases_text for s in sessions):
            text_logits = bias_text_logits(
                text_logits,
                [list(s.recent_text) for s in sessions],
                [s.sampling for s in sessions],
                pad_id=TEXT_PAD_ID,
                exempt=UNPENALISED,
            )

        params = [s.sampling for s in sessions]
        text_draw, audio_draw = self._draws(sessions, params)
        text = sample_top_k(text_logits, text_draw)
        forced = np.stack([p.forced for p in prepared])
        target = np.stack([p.target for p in prepared])
        next_text = mx.where(mx.array(forced[:, 0]), mx.array(target[:, 0], mx.int32), text)
        agent = slice(1, 1 + self.agent)

        def sample_audio(logits: mx.array, codebook: int) -> mx.array:
            return sample_top_k(logits, audio_draw, codebook)

        audio = depformer_sample(
            lm,
            hidden,
            next_text,
            mx.array(target[:, agent], mx.int32),
            mx.array(forced[:, agent]),
            sample_audio,
            self.agent,
        )
        state = [s.rng_key for s in sessions]
        state += [a for s in sessions for cache in s.temporal_cache for a in cache.arrays()]
        mx.eval(text, next_text, audio, state)
        text_np, audio_np = np.array(text), np.array(audio)
        for session, token in zip(sessions, np.array(next_text), strict=True):
            session.recent_text.append(int(token))
            while len(session.recent_text) > session.sampling.repetition_context:
                session.recent_text.popleft()
        return {row: (int(text_np[row]), audio_np[row]) for row in range(len(sessions))}

    def _draws(
        self, sessions: list[DuplexSession], params: list[SamplingParams]
    ) -> tuple[Draw, Draw]:
        """This tick's text and audio draws; advances every session's key once."""
        noises = []
        for session, p in zip(sessions, params, strict=True):
            text_width, audio_width = self.text_vocab, self.audio_card
            if self.fast:
                text_width = candidate_count(p.text_top_k, self.text_vocab)
                audio_width = candidate_count(p.audio_top_k, self.audio_card)
            session.rng_key, noise = draw_noise(
                session.rng_key, text_width, audio_width, self.agent
            )
            noises.append(noise)
        text_temp = [p.text_temperature for p in params]
        audio_temp = [p.audio_temperature for p in params]
        text_k = [p.text_top_k for p in params]
        audio_k = [p.audio_top_k for p in params]
        text_noise = [n.text for n in noises]
        audio_noise = [n.audio for n in noises]
        if self.fast:
            return (
                CandidateDraw(text_temp, text_k, self.text_vocab, text_noise),
                CandidateDraw(audio_temp, audio_k, self.audio_card, audio_noise),
            )
        return (
            FullVocabDraw(text_temp, text_k, text_noise, sort=True),
            FullVocabDraw(audio_temp, audio_k, audio_noise, sort=True),
        )

    def _decode(
        self, sessions: list[DuplexSession], frames: list[np.ndarray | None]
    ) -> list[StepOut]:
        rows, codes = [], []
        for row, (session, frame) in enumerate(zip(sessions, frames, strict=True)):
            session.live_steps += 1
            if frame is None or (frame[1:] >= self.audio_card).any():
                continue  # the delayed streams are still filling
            session.last_tokens = [int(t) for t in frame]
            rows.append(row)
            codes.append(frame[1:, None].astype(np.int32))
        pcms: list[np.ndarray | None] = [None] * len(sessions)
        if rows:
            decoders = [sessions[r].decoder for r in rows]
            decoded = self.mimi.decode_batch(decoders, mx.array(np.stack(codes)))
            mx.eval(decoded, [a for d in decoders for a in d.arrays()])
            for row, pcm in zip(rows, np.array(decoded, np.float32), strict=True):
                pcms[row] = pcm
        outs = []
        for frame, pcm in zip(frames, pcms, strict=True):
            token = TEXT_PAD_ID if frame is None else int(frame[0])
            audio = np.zeros(FRAME_SIZE, np.float32) if pcm is None else pcm
            outs.append(
                StepOut(pcm=audio, text_token=token, text=token_text(self.tokenizer, token))
            )
        return outs

    def _call_set_rows(self, slots: list[int]) -> None:
        if self.set_rows is not None:
            self.set_rows(list(slots))

    # -----------------------------------------------------------------------------------------
    # Fully trained adapter tensors
    # -----------------------------------------------------------------------------------------
    def install_full_weights(self, slot: int, tensors: dict[str, np.ndarray]) -> None:
        """Rows whose session uses `slot` take these `audio_embs.N.weight` / `out_norm.weight`
        instead of the base ones (mlx-audio Lm parameter names)."""
        if not isinstance(slot, int) or slot < 1:
            raise AdapterError(
                f"slot {slot}", ["full weights need an adapter slot >= 1 (0 is the base)"]
            )
        problems = []
        weights: FullWeights = {}
        for name in sorted(tensors):
            expected = self._full_shapes.get(name)
            value = np.asarray(tensors[name])
            if expected is None:
                problems.append(f"{name} is not a fully trained PersonaPlex tensor")
            elif tuple(value.shape) != expected:
                problems.append(f"{name} has shape {tuple(value.shape)}, expected {expected}")
            elif not np.isfinite(value).all():
                problems.append(f"{name} holds NaN or infinite values")
            else:
                weights[name] = mx.array(value.astype(np.float32))
        if problems:
            raise AdapterError(f"slot {slot}", problems)
        if not weights:
            self._full.pop(slot, None)
            return
        mx.eval(list(weights.values()))
        self._full[slot] = weights

    def clear_full_weights(self, slot: int) -> None:
        self._full.pop(slot, None)

    def full_weight_slots(self) -> list[int]:
        return sorted(self._full)


def _voice_prompt(audio: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    try:
        pcm = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError):
        return None, "voice_prompt must be a float32 mono array"
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1 or pcm.shape[0] == 0:
        return None, f"voice_prompt must be non-empty mono audio, got shape {pcm.shape}"
    if pcm.shape[0] > MAX_VOICE_PROMPT_SECONDS * SAMPLE_RATE:
        return None, f"voice_prompt is longer than {MAX_VOICE_PROMPT_SECONDS:.0f} s"
    if not np.isfinite(pcm).all():
        return None, "voice_prompt holds NaN or infinite samples"
    return pcm.copy(), None
