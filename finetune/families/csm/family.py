"""Sesame CSM in the family registry."""

from __future__ import annotations

from finetune.families.base import Family

# Relative to the SesameModel, the LoRA root ("model." of the loaded mlx-audio Model).
# What CSM adapters say they wrap: mlx-audio's SesameModel (`loaded.backbone`).
ADAPTER_MODULE = "model"

CSM_BACKBONE_TARGETS = [
    r"backbone\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"backbone\.layers\.\d+\.mlp\.(gate|up|down)_proj",
]
CSM_DECODER_TARGETS = [
    r"decoder\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"decoder\.layers\.\d+\.mlp\.(gate|up|down)_proj",
]

FAMILY = Family(
    name="csm",
    title="Sesame CSM",
    strategies=("speaker", "language"),
    engine="speech",
    served_by="server.engine.families.csm:CsmModel",
    entry="finetune.families.csm.entry",
    default_targets=tuple(CSM_BACKBONE_TARGETS),
    presets=("tiny", "real-1b"),  # the keys of tiny.PRESETS
    recipes={"speaker": "csm_speaker.yaml"},
    min_job_seconds={"language": 8.0},
    quantized=("8", "4", "mixed_4_6", "mxfp4"),  # mlx-audio's converter (quantize.py)
    # The mlx-community layout: weights, the fast text tokenizer, and a Mimi under mimi/.
    hub_files=(
        "config.json",
        "*.safetensors",
        "*.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "mimi/*",
    ),
)
