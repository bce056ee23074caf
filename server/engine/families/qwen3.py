"""Qwen3-TTS as the engine serves it: loaded once, with its adapter bank and baked voices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.audio import load_audio
from finetune.config import QWEN3_CODE_PREDICTOR_TARGETS, QWEN3_TALKER_TARGETS
from finetune.families.qwen3_tts.bake import bake_into_model, check_slot, unbake_from_model
from finetune.families.qwen3_tts.checkpoint import LoadedQwen3TTS, load_qwen3_tts

import mlx.core as mx
import numpy as np

from server.engine.bank import AdapterBank
from server.engine.qwen3_batch import Qwen3BatchGenerator, Qwen3Prompter, Row
from server.engine.requests import SpeakJob, Voicing

# Frames of left context a streamed chunk is decoded with, for continuity at its seams.
DECODE_CONTEXT_FRAMES = 25


@dataclass
class Qwen3Model:
    name: str
    loaded: LoadedQwen3TTS
    bank: AdapterBank
    prompter: Qwen3Prompter
    generator: Qwen3BatchGenerator
    clone_cache: dict[str, mx.array] = field(default_factory=dict)
    original_rows: dict[int, np.ndarray] = field(default_factory=dict)
    family: str = "qwen3_tts"
    adapter_module: str = "talker"

    @classmethod
    def load(cls, name: str, path: str, *, slots: int, max_rank: int, max_bytes: int) -> Qwen3Model:
        loaded = load_qwen3_tts(path)
        bank = AdapterBank(
            loaded.model.talker,
            QWEN3_TALKER_TARGETS + QWEN3_CODE_PREDICTOR_TARGETS,
            slots=slots,
            max_rank=max_rank,
            max_bytes=max_bytes,
        )
        mx.eval(loaded.model.parameters())
        return cls(
            name=name,
            loaded=loaded,
            bank=bank,
            prompter=Qwen3Prompter(loaded.model),
            generator=Qwen3BatchGenerator(loaded.model, bank.set_rows),
        )

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.model.speech_tokenizer.decode_upsample_rate

    def builtin_speakers(self) -> list[str]:
        return sorted((self.model.config.talker_config.spk_id or {}).keys())

    # --- generation (the engine's SpeechModel surface) ------------------------------------
    def make_row(self, job: SpeakJob, *, slot: int) -> Row:
        v = job.voicing
        speaker = None
        if v.speaker_name is not None:
            speaker = self.prompter.speaker_vector(v.speaker_name)
        elif v.ref_clip is not None:
            speaker = self.clone_vector(v.ref_clip)
        return Row(
            prompt=self.prompter.prompt(job.text, job.language, speaker),
            sampling=job.sampling,
            seed=job.segment_seed,
            slot=slot,
            cancel=job.cancel,
        )

    def run(self, rows: list[Row]) -> None:
        self.generator.run(rows)

    def decode_chunk(self, row: Row, start: int, end: int) -> np.ndarray:
        """Frames [start, end) as audio, decoded with left context for continuity."""
        ctx = min(start, DECODE_CONTEXT_FRAMES)
        codes = mx.array(np.stack(row.frames[start - ctx : end]))[None].transpose(0, 2, 1)
        wav = self.model.speech_tokenizer.decoder(codes)[0, 0]
        upsample = self.model.speech_tokenizer.decode_upsample_rate
        return np.array(wav[ctx * upsample :], dtype=np.float32)

    def decode_all(self, row: Row) -> np.ndarray:
        """The same decode and trim as mlx-audio's non-streaming generate."""
        codes = mx.array(np.stack(row.frames))[None]
        audio, lengths = self.model.speech_tokenizer.decode(codes)
        audio = audio[0]
        valid = int(lengths[0])
        if 0 < valid < audio.shape[0]:
            audio = audio[:valid]
        return np.array(audio, dtype=np.float32)

    def forget(self, voicing: Voicing) -> None:
        if voicing.ref_clip is not None:
            self.clone_cache.pop(str(voicing.ref_clip), None)

    # --- voices ------------------------------------------------------------------------------
    def clone_vector(self, ref_clip: Path) -> mx.array:
        key = str(ref_clip)
        if key not in self.clone_cache:
            if self.model.speaker_encoder is None:
                raise ValueError(f"model {self.name} has no speaker encoder to clone with")
            wav = load_audio(ref_clip, 24_000)
            self.clone_cache[key] = self.model.extract_speaker_embedding(mx.array(wav))[0]
        return self.clone_cache[key]

    def bake(self, name: str, slot: int, embedding: np.ndarray) -> None:
        check_slot(self.model, name, slot, force=False)
        weight = self.model.talker.model.codec_embedding.weight
        self.original_rows.setdefault(slot, np.array(weight[slot]))
        bake_into_model(self.model, name, slot, embedding)

    def unbake(self, name: str) -> None:
        spk_id = self.model.config.talker_config.spk_id or {}
        if name not in spk_id:
            return
        slot = int(spk_id[name])
        original = self.original_rows.pop(slot, None)
        if original is None:
            original = np.zeros(self.model.talker.model.codec_embedding.weight.shape[1], np.float32)
        unbake_from_model(self.model, name, original)
