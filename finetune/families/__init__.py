"""The model families, found in ONE registry: `FAMILIES` (name -> `Family`).

Each family is one package `finetune/families/<name>/` whose `family.py` exports `FAMILY` (a
`Family`: strategies, default LoRA targets, tiny presets, recipes, the serving engine and model
class, the entry module). Adding a family is that package plus one line in `FAMILY_MODULES`.
Every list of family names and every check of a family field derives from `FAMILIES`.

A family's entry module (`Family.entry`) has the same small surface, so the CLI, the job runner
and the trainer dispatch on `model.family` without knowing any family:

- `make_tiny(out_dir, *, seed, preset, variant) -> Path`;
- `train(config, *, progress, resume) -> TrainResult`;
- `smoke_config(config, workdir, *, keep_output) -> TrainConfig` (tiny model + synthetic data);
- `run_job(spec, config, progress) -> int` (what `python -m finetune run-job` runs).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from finetune.families.base import Engine, Family, configs_dir

FAMILY_MODULES = (
    "finetune.families.qwen3_tts.family",
    "finetune.families.csm.family",
    "finetune.families.personaplex.family",
)


def _load(modules: tuple[str, ...]) -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module in modules:
        family = importlib.import_module(module).FAMILY
        if family.name in found:
            raise ValueError(f"two families are named {family.name!r}")
        found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _load(FAMILY_MODULES)


class UnknownFamily(ValueError):
    pass


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def unknown_family_message(name: object) -> str:
    return f"unknown model family {name!r}; known: {', '.join(FAMILIES)}"


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UnknownFamily(unknown_family_message(name)) from None


def families_with(strategy: str) -> tuple[Family, ...]:
    """The families that train `strategy`."""
    return tuple(f for f in FAMILIES.values() if strategy in f.strategies)


def all_strategies() -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for f in FAMILIES.values() for s in f.strategies))


def family_entry(family: str) -> ModuleType:
    return get_family(family).entry_module()


__all__ = [
    "FAMILIES",
    "FAMILY_MODULES",
    "Engine",
    "Family",
    "UnknownFamily",
    "all_strategies",
    "configs_dir",
    "families_with",
    "family_entry",
    "family_names",
    "get_family",
    "unknown_family_message",
]
