"""Qwen3-TTS in the family registry."""

from __future__ import annotations

from finetune.config import QWEN3_TALKER_TARGETS
from finetune.families.base import Family

FAMILY = Family(
    name="qwen3_tts",
    title="Qwen3-TTS",
    strategies=("speaker", "language"),
    engine="speech",
    served_by="server.engine.families.qwen3:Qwen3Model",
    entry="finetune.families.qwen3_tts.entry",
    default_targets=tuple(QWEN3_TALKER_TARGETS),
    presets=("tiny", "small", "real-0.6b", "real-1.7b"),  # the keys of tiny.PRESETS
    variants=("base", "custom_voice"),
    layouts=("official", "mlx-community"),  # the keys of tiny.LAYOUTS
    recipes={"speaker": "qwen3_tts_speaker.yaml", "language": "qwen3_tts_hindi.yaml"},
    min_job_seconds={"language": 8.0},  # a new language needs more than a voice
)
