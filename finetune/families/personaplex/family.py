"""NVIDIA PersonaPlex in the family registry."""

from __future__ import annotations

from finetune.config import PERSONAPLEX_TARGETS
from finetune.families.base import Family

FAMILY = Family(
    name="personaplex",
    title="PersonaPlex",
    strategies=("duplex",),
    engine="duplex",
    served_by="server.duplex.engine:DuplexModel",
    entry="finetune.families.personaplex.entry",
    default_targets=tuple(PERSONAPLEX_TARGETS),
    presets=("tiny", "width", "real-7b"),  # the keys of tiny.PRESETS
    recipes={"duplex": "personaplex_hindi.yaml"},
    text_frame_rate=12.5,  # one text token at most per 80 ms Mimi frame
    quantized=("8", "4", "mxfp4"),  # nn.quantize, Kyutai's MLX layout (quantize.py)
    # NVIDIA's release: the LM and Mimi weights, the SentencePiece model, the configs Kyutai's
    # loader reads (mimi_config.json when the Mimi is not the real one) and the voice prompts.
    hub_files=(
        "config.json",
        "mimi_config.json",
        "*.safetensors",
        "*.model",
        "voices/*",
        "voices.tgz",
    ),
)
