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
)
