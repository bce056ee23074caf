"""PersonaPlex adapters in the server: LoRA tensors go into the adapter bank (per-row gather),
fully trained tensors (`audio_embs.N.weight`, `out_norm.weight`) into the runtime's per-slot
weight overrides. Both are written and dropped together with the bank slot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.adapter_files import AdapterError, read_adapter, weight_problems
from finetune.families.personaplex.family import FAMILY

import numpy as np

from server.engine.bank import AdapterBank, AdapterTensors

MODULE = "lm"


@dataclass
class DuplexAdapterTensors(AdapterTensors):
    full: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def read(  # type: ignore[override]
        cls, path: Path, module: str = MODULE, *, family: str = FAMILY.name
    ) -> DuplexAdapterTensors:
        """`family`: the family of the model it goes on (the loaded model's `family`)."""
        path = Path(path)
        files = read_adapter(path)  # the config and the LoRA tensors checked on their own
        config, weights = files.config, files.tensors
        problems = []
        if config.family != family:
            problems.append(f"adapter is for family {config.family!r}, not {family}")
        if (config.module or module) != module:
            problems.append(f"adapter is for module {config.module!r}, not {module!r}")
        rank, alpha = config.lora.rank, config.lora.alpha
        trained = set(config.trained_tensors)
        full = {k: np.asarray(v, np.float32) for k, v in weights.items() if k in trained}
        lora_tensors = {
            k: np.asarray(v, np.float32)
            for k, v in weights.items()
            if k.endswith((".lora_a", ".lora_b"))
        }
        stray = sorted(set(weights) - set(full) - set(lora_tensors))
        if stray:
            problems.append(f"tensors neither LoRA nor listed in trained_tensors: {stray[:3]}")
        problems += weight_problems(full)  # finite values
        if problems:
            raise AdapterError(path, problems)
        nbytes = sum(a.nbytes for a in (*lora_tensors.values(), *full.values()))
        return cls(path, alpha / rank, rank, lora_tensors, nbytes, full)


class DuplexAdapterBank(AdapterBank):
    """An AdapterBank whose slots also carry the adapter's fully trained tensors."""

    def __init__(self, root: Any, targets: list[str], *, runtime: Any, **kwargs: Any) -> None:
        super().__init__(root, targets, **kwargs)
        self.runtime = runtime

    def _write(self, slot: int, adapter: AdapterTensors) -> None:
        super()._write(slot, adapter)
        full = getattr(adapter, "full", None)
        if full:
            self.runtime.install_full_weights(slot, full)
        else:
            self.runtime.clear_full_weights(slot)

    def _clear(self, slot: int) -> None:
        super()._clear(slot)
        self.runtime.clear_full_weights(slot)
