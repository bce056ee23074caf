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
    variants=("base", "custom_voice", "voice_design"),  # tiny.VARIANTS
    layouts=("official", "mlx-community"),  # the keys of tiny.LAYOUTS
    recipes={"speaker": "qwen3_tts_speaker.yaml", "language": "qwen3_tts_hindi.yaml"},
    min_job_seconds={"language": 8.0},
    data_parallel=True,  # a new language needs more than a voice
    # mlx-audio's converter (quantize.py); its mixed_4_6 recipe does not apply to Qwen3-TTS
    quantized=("8", "4", "mxfp4"),
    # What a hub download fetches: both layouts (an mlx-community repo adds the index file),
    # the text tokenizer's files and the speech tokenizer; not READMEs, assets or PyTorch bins.
    hub_files=(
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "*.safetensors",
        "*.safetensors.index.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "speech_tokenizer/*",
    ),
)
