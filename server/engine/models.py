"""The models the engine holds: `SpeechModel` (the family surface) and loading by family.

`EngineModel` is the Qwen3-TTS model under its former name (tests/bench/bench_service.py uses
`EngineModel.load(name, path, slots=, max_rank=, max_bytes=)`).
"""

from __future__ import annotations

from server.engine.families.qwen3 import Qwen3Model
from server.engine.family import (
    BankLimits,
    SpeechModel,
    load_speech_model,
    serves_family,
)

EngineModel = Qwen3Model

__all__ = ["BankLimits", "EngineModel", "SpeechModel", "load_speech_model", "serves_family"]
