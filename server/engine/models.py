"""A base model as the engine holds it: loaded once, with its adapter bank and baked voices."""

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
from server.engine.qwen3_batch import Qwen3BatchGenerator, Qwen3Prompter


@dataclass
class EngineModel:
    name: str
    loaded: LoadedQwen3TTS
    bank: AdapterBank
    prompter: Qwen3Prompter
    generator: Qwen3BatchGenerator
    clone_cache: dict[str, mx.array] = field(default_factory=dict)
    original_rows: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def load(
        cls, name: str, path: str, *, slots: int, max_rank: int, max_bytes: int
    ) -> EngineModel:
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

    def builtin_speakers(self) -> list[str]:
        return sorted((self.model.config.talker_config.spk_id or {}).keys())

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
