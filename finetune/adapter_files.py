"""Reading an adapter directory (adapter_config.json + adapters.safetensors) and checking its
tensors, in one place: every problem of both files is reported at once, in one AdapterError.

No MLX here (numpy only): the server reads adapters off its MLX thread with this module, and the
trainer and bake check the same config and tensors with it before loading them into a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
LORA_LEAVES = ("lora_a", "lora_b")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded, with every problem found in it."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"cannot load adapter at {path} ({count}):\n{listing}")

    def renamed(self, name: str) -> AdapterError:
        """The same problems, naming the adapter `name` (e.g. as its package names it) instead
        of by the path it was read from."""
        problems = [p.replace(self.path, name) for p in self.problems]
        return AdapterError(name, problems)


class LoraParams(msgspec.Struct, kw_only=True):
    """adapter_config.json's "lora" object, as far as loading reads it."""

    rank: Annotated[int, msgspec.Meta(ge=1)]
    alpha: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a finite number > 0, not {self.alpha!r}")


class AdapterConfig(msgspec.Struct, kw_only=True):
    """adapter_config.json, as far as loading reads it (other keys are the trainer's)."""

    lora: LoraParams
    module: str | None = None
    family: str | None = None
    trained_tensors: list[str] = []


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter directory, read and checked on its own (the model checks come later)."""

    path: Path
    raw: dict[str, Any]  # adapter_config.json as written (the trainer's keys included)
    config: AdapterConfig
    tensors: dict[str, np.ndarray]

    @property
    def lora_tensors(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.tensors.items() if k.endswith((".lora_a", ".lora_b"))}


def decode_adapter_config(path: Path | str, raw: Any) -> AdapterConfig:
    """`raw` (adapter_config.json's object) decoded, or an AdapterError saying what is wrong."""
    try:
        return msgspec.convert(raw, AdapterConfig)
    except msgspec.ValidationError as exc:
        raise AdapterError(path, [f"{ADAPTER_CONFIG}: {exc}"]) from exc


def _read_config(folder: Path, problems: list[str]) -> tuple[dict[str, Any], AdapterConfig] | None:
    file = folder / ADAPTER_CONFIG
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            problems.append(f"{ADAPTER_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
            return None
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        problems.append(f"missing {ADAPTER_CONFIG}")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{ADAPTER_CONFIG}: not valid JSON ({exc})")
        return None
    try:
        config = msgspec.convert(raw, AdapterConfig)
    except msgspec.ValidationError as exc:
        problems.append(f"{ADAPTER_CONFIG}: {exc}")
        return None
    return raw, config


def _read_tensors(folder: Path, problems: list[str]) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        problems.append(f"missing {ADAPTER_WEIGHTS}")
        return None
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        problems.append(f"unreadable {ADAPTER_WEIGHTS}: {exc}")
        return None


def read_adapter(folder: Path | str) -> AdapterFiles:
    """Both files of an adapter directory, checked: the config against `AdapterConfig`, the
    LoRA tensors against its rank (pairs, shapes, finite values). Raises one AdapterError with
    every problem of both files."""
    folder = Path(folder)
    problems: list[str] = []
    config = _read_config(folder, problems)
    tensors = _read_tensors(folder, problems)
    if config is not None and tensors is not None:
        lora = {k: v for k, v in tensors.items() if k.endswith((".lora_a", ".lora_b"))}
        problems += weight_problems(lora, rank=config[1].lora.rank)
    if problems or config is None or tensors is None:
        raise AdapterError(folder, problems)
    return AdapterFiles(folder, config[0], config[1], tensors)


def weight_problems(
    tensors: Mapping[str, Any],
    *,
    rank: int | None = None,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    lora: bool = True,
) -> list[str]:
    """What is wrong with a set of weights: values that are not finite, LoRA A / B tensors
    unpaired or not 2-D or of another rank than `rank`, shapes other than `expected` (when
    given: name -> shape; names missing from `tensors` are not reported here). `lora=False`
    leaves out the LoRA pair and rank checks (for a caller that checked them against a model)."""
    problems = []
    for name, value in sorted(tensors.items()):
        array = np.asarray(value)
        layer, _, leaf = name.rpartition(".")
        if lora and leaf in LORA_LEAVES:
            other = f"{layer}.{'lora_b' if leaf == 'lora_a' else 'lora_a'}"
            if other not in tensors:
                problems.append(f"{name}: its {other.rpartition('.')[2]} is missing")
            if array.ndim != 2:
                problems.append(f"{name}: shape {array.shape} is not 2-D")
            elif (
                rank is not None
                and (array.shape[1] if leaf == "lora_a" else array.shape[0]) != rank
            ):
                problems.append(f"{name}: shape {array.shape} does not match lora.rank {rank}")
        if (
            expected is not None
            and name in expected
            and tuple(array.shape) != tuple(expected[name])
        ):
            problems.append(f"{name}: shape {tuple(array.shape)}, expected {tuple(expected[name])}")
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            problems.append(f"{name}: holds values that are not finite")
    return problems
