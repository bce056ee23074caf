"""`Family`: everything the rest of the code may know about one model family.

A family package exports one `FAMILY` (in its `family.py`); `finetune.families` collects them
into the registry. Nothing here imports MLX, the family's heavy modules or `server`: the
server-side model class is named as a "module:Class" string and imported by the server.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Literal

import yaml

Engine = Literal["speech", "duplex"]
ENGINES: tuple[Engine, ...] = ("speech", "duplex")
DEFAULT_MIN_JOB_SECONDS = 4.0


def configs_dir() -> Path:
    """The repository's `configs/` directory (the tested recipes)."""
    import finetune

    return Path(finetune.__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Family:
    name: str  # what `model.family`, settings and voice packages say
    title: str  # the name people know it by, for messages
    strategies: tuple[str, ...]  # the `model.strategy` values it trains
    engine: Engine  # the server engine that serves it: "speech" (/speak) or "duplex" (/duplex)
    served_by: str  # "module:Class" of the server-side model (imported by the server only)
    entry: str  # module with make_tiny / train / smoke_config / run_job
    default_targets: tuple[str, ...]  # LoRA target patterns when a config names none
    presets: tuple[str, ...]  # `make-tiny --preset` names
    variants: tuple[str, ...] = ("base",)  # `make-tiny --variant` names
    # `make-tiny --layout` names (the distributions users download), the first the default;
    # empty: the family writes one layout and its make_tiny takes no `layout`.
    layouts: tuple[str, ...] = ()
    # `make-tiny --quantize` / the entry's `quantize(src, dst, variant)` names (finetune.variants)
    quantized: tuple[str, ...] = ()
    # strategy -> recipe file name under configs/
    recipes: Mapping[str, str] = field(default_factory=dict, hash=False)
    # strategy -> the least audio (seconds, all clips together) a fine-tune job needs; others 4 s
    min_job_seconds: Mapping[str, float] = field(default_factory=dict, hash=False)
    # Models that place the transcript's text tokens on audio frames (at most one per frame)
    # need each clip's transcript to fit: the frames a second; None when text is not framed.
    text_frame_rate: float | None = None
    # The files a download from a model hub fetches (huggingface_hub allow-patterns: fnmatch
    # over repository paths, where `*` also matches `/`); empty: every file of the repository.
    hub_files: tuple[str, ...] = ()
    # Its trainer shards batches over `mx.distributed` ranks (finetune/distributed.py): a job of
    # it may run on several hosts (`run-job --hosts`, a worker's `worker_hosts`).
    data_parallel: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not self.strategies:
            problems.append("a family trains at least one strategy")
        stray = sorted(set(self.recipes) - set(self.strategies))
        if stray:
            problems.append(f"recipes for strategies it does not train: {', '.join(stray)}")
        if ":" not in self.served_by:
            problems.append(f"served_by must be 'module:Class', not {self.served_by!r}")
        stray = sorted(set(self.min_job_seconds) - set(self.strategies))
        if stray:
            problems.append(f"min_job_seconds for strategies it does not train: {', '.join(stray)}")
        if self.text_frame_rate is not None and not self.text_frame_rate > 0:
            problems.append(f"text_frame_rate must be > 0, not {self.text_frame_rate!r}")
        if problems:
            raise ValueError(f"family {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "recipes", MappingProxyType(dict(self.recipes)))
        object.__setattr__(self, "min_job_seconds", MappingProxyType(dict(self.min_job_seconds)))

    def job_seconds(self, strategy: str) -> float:
        """The least audio a fine-tune job of `strategy` needs, in seconds."""
        return self.min_job_seconds.get(strategy, DEFAULT_MIN_JOB_SECONDS)

    def entry_module(self) -> ModuleType:
        return importlib.import_module(self.entry)

    def recipe_path(self, strategy: str) -> Path:
        if strategy not in self.recipes:
            known = ", ".join(sorted(self.recipes)) or "none"
            raise LookupError(
                f"family {self.name!r} has no recipe for strategy {strategy!r}; recipes: {known}"
            )
        return configs_dir() / self.recipes[strategy]

    def recipe(self, strategy: str) -> dict[str, Any]:
        """The parsed YAML mapping of the tested recipe for `strategy`."""
        path = self.recipe_path(strategy)
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe must be a mapping")
        return raw
