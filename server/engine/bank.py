"""Hot-swappable LoRA adapters for batched serving (the Punica / S-LoRA idea).

Every targeted Linear of a loaded base model is wrapped once by `BankedLoRALinear`, which holds a
bank of adapter slots (A: [S, in, r_max], B: [S, r_max, out], scale: [S]; slot 0 is "no
adapter"). A batch sets one slot index per row on the shared `BankContext`, so requests for
different adapters run in the same forward pass. Loading an adapter writes its tensors into a
free slot: the base model is never reloaded.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.adapter_files import (
    AdapterConfig,
    AdapterError,
    decode_adapter_config,
    read_adapter,
    weight_problems,
)
from finetune.lora import linear_dims

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten


class BankContext:
    """The batch's rows, shared by every banked layer of one model: per layer, the adapter
    tensors gathered for the batch's slot indices once, when the rows change, not per call."""

    def __init__(self) -> None:
        self.slot_ids: mx.array | None = None
        self.rows: dict[int, tuple[mx.array, mx.array]] = {}


class BankedLoRALinear(nn.Module):
    def __init__(
        self, base: nn.Linear | nn.QuantizedLinear, slots: int, max_rank: int, ctx: BankContext
    ) -> None:
        super().__init__()
        self.base = base
        # A QuantizedLinear base is used as it is: the bank adds its rows to the quantised
        # layer's output, as QLoRALinear does in training.
        in_dims, out_dims = linear_dims(base)
        self.lora_a = mx.zeros((slots, in_dims, max_rank))
        self.lora_b = mx.zeros((slots, max_rank, out_dims))
        self.scales = mx.zeros((slots,))
        self._ctx = ctx
        self.freeze()

    def gather(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """This layer's A [B, in, r] and B [B, r, out] for the batch's slots, each row's scale
        folded into its B (once per change of rows, not per call)."""
        return self.lora_a[ids], self.lora_b[ids] * self.scales[ids][:, None, None]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        rows = self._ctx.rows.get(id(self)) if self._ctx.slot_ids is not None else None
        if rows is None:
            return y
        a, b = rows
        # As few graph nodes as the sum takes: a real-0.6B frame runs ~700 banked layers, and
        # MLX's CPU dispatch costs each node. For a [B, L, in] input in fp32 (the CPU path) the
        # second product adds onto the base output in BLAS (`addmm`, beta = 1): two nodes
        # instead of three, within an ulp of the product and the add apart, and still one GEMM
        # per row (a row's values are the same alone or batched).
        flat = x if x.ndim == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        down = flat @ a
        if y.ndim == 3 and y.dtype == down.dtype == b.dtype == mx.float32:
            return mx.addmm(y, down, b)
        delta = down @ b
        if delta.shape != y.shape:
            delta = delta.reshape(y.shape)
        return y + delta.astype(y.dtype)


def adapter_config(path: Path, config: Any) -> AdapterConfig:
    """`config` (adapter_config.json's object) decoded, or an AdapterError saying what is wrong."""
    return decode_adapter_config(path, config)


def read_adapter_files(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """adapter_config.json (checked against AdapterConfig) and adapters.safetensors, or one
    AdapterError with every problem of both."""
    files = read_adapter(path)
    return files.raw, files.tensors


def lora_problems(tensors: dict[str, np.ndarray], rank: int) -> list[str]:
    """What is wrong with an adapter's LoRA tensors on their own: unpaired A / B, shapes that
    disagree with `rank`, values that are not finite (checked against the model by the bank)."""
    return weight_problems(tensors, rank=rank)


@dataclass
class AdapterTensors:
    """An adapter read from disk (off the MLX thread), ready to be installed into a slot."""

    path: Path
    scale: float
    rank: int
    tensors: dict[str, np.ndarray]  # layer path -> lora_a / lora_b arrays
    nbytes: int

    @classmethod
    def read(
        cls, path: Path, module: str = "talker", installed_elsewhere: tuple[str, ...] = ()
    ) -> AdapterTensors:
        path = Path(path)
        files = read_adapter(path)
        config, weights = files.config, files.tensors
        if (config.module or module) != module:
            raise AdapterError(path, [f"adapter is for module {config.module!r}"])
        rank, alpha = config.lora.rank, config.lora.alpha
        # Fully trained tensors the family installs itself (e.g. Qwen3-TTS language rows) are
        # not banked: leave them to the caller.
        riders = set(config.trained_tensors) & set(installed_elsewhere)
        weights = {k: v for k, v in weights.items() if k not in riders}
        extra = sorted(k for k in weights if not k.endswith((".lora_a", ".lora_b")))
        if extra:
            raise AdapterError(path, [f"fully trained tensors cannot be banked: {extra[:3]}"])
        arrays = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        problems = lora_problems(arrays, rank)
        if problems:
            raise AdapterError(path, problems)
        return cls(path, alpha / rank, rank, arrays, sum(a.nbytes for a in arrays.values()))


@dataclass
class _Slot:
    key: str
    nbytes: int
    in_use: int = 0


@dataclass
class BankStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class BankUsage:
    """A bank's slots at one moment: how many adapters it can hold, holds, and running rows
    hold (`held` slots, `references` rows in all)."""

    capacity: int
    resident: int
    held: int
    references: int


class BankFull(RuntimeError):
    pass


class AdapterBank:
    """Slots of one base model's banked layers, LRU-evicted under a slot and a byte budget.

    All methods run on the engine's MLX thread, except `AdapterTensors.read` (any thread).
    """

    def __init__(
        self, root: nn.Module, targets: list[str], *, slots: int, max_rank: int, max_bytes: int
    ) -> None:
        self.ctx = BankContext()
        self.slots = slots
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.layers = self._install(root, targets)
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, LRU order
        self._slots: dict[int, _Slot] = {}
        self.stats = BankStats()
        self._lock = threading.Lock()

    def _install(self, root: nn.Module, targets: list[str]) -> dict[str, BankedLoRALinear]:
        patterns = [re.compile(t) for t in targets]
        wrapped: dict[str, BankedLoRALinear] = {}
        for path, module in root.named_modules():
            if isinstance(module, nn.Linear | nn.QuantizedLinear) and any(
                p.fullmatch(path) for p in patterns
            ):
                wrapped[path] = BankedLoRALinear(module, self.slots, self.max_rank, self.ctx)
        if not wrapped:
            raise ValueError("adapter bank: no layer matched the target patterns")
        root.update_modules(tree_unflatten(list(wrapped.items())))
        return wrapped

    @property
    def resident_bytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values())

    def usage(self) -> BankUsage:
        """Read from any thread (the metrics endpoint): one snapshot of the slot table."""
        slots = list(self._slots.values())
        return BankUsage(
            capacity=self.slots - 1,
            resident=len(slots),
            held=sum(1 for s in slots if s.in_use),
            references=sum(s.in_use for s in slots),
        )

    def slot_of(self, key: str) -> int | None:
        return self._resident.get(key)

    def has_room(self) -> bool:
        """Whether a new adapter could take a slot now (a free one, or an idle one to evict),
        byte budget aside: checked before reading its files."""
        if len(self._slots) < self.slots - 1:
            return True
        return any(s.in_use == 0 for s in self._slots.values())

    def ensure(self, adapter: AdapterTensors) -> int:
        """The adapter's slot, installing it (evicting idle LRU adapters) if needed."""
        key = str(adapter.path)
        slot = self._resident.get(key)
        if slot is not None:
            self._resident.move_to_end(key)
            self.stats.hits += 1
            return slot
        self.stats.misses += 1
        if adapter.rank > self.max_rank:
            raise AdapterError(
                adapter.path, [f"rank {adapter.rank} exceeds the bank's max rank {self.max_rank}"]
            )
        self._check_layers(adapter)
        slot = self._free_slot(adapter.nbytes)
        self._write(slot, adapter)
        self._slots[slot] = _Slot(key, adapter.nbytes)
        self._resident[key] = slot
        return slot

    def _check_layers(self, adapter: AdapterTensors) -> None:
        problems = []
        for name, array in adapter.tensors.items():
            layer_path, _, leaf = name.rpartition(".")
            layer = self.layers.get(layer_path)
            if layer is None:
                problems.append(f"{name}: no banked layer at {layer_path}")
                continue
            want = layer.lora_a.shape[1] if leaf == "lora_a" else layer.lora_b.shape[2]
            got = array.shape[0] if leaf == "lora_a" else array.shape[1]
            if got != want:
                problems.append(f"{name}: shape {array.shape} does not fit the base model")
        if problems:
            raise AdapterError(adapter.path, problems)

    def _free_slot(self, nbytes: int) -> int:
        used = set(self._slots)
        free = [s for s in range(1, self.slots) if s not in used]
        while not free or self.resident_bytes + nbytes > self.max_bytes:
            victim = next(
                (k for k, s in self._resident.items() if self._slots[s].in_use == 0), None
            )
            if victim is None:
                raise BankFull("every adapter slot is busy; try again shortly")
            slot = self._resident.pop(victim)
            del self._slots[slot]
            self._clear(slot)
            self.stats.evictions += 1
            free = [s for s in range(1, self.slots) if s not in self._slots]
        return free[0]

    def _write(self, slot: int, adapter: AdapterTensors) -> None:
        r = adapter.rank
        for path, layer in self.layers.items():
            a = adapter.tensors.get(f"{path}.lora_a")
            b = adapter.tensors.get(f"{path}.lora_b")
            if a is None or b is None:
                self._clear_layer(layer, slot)
                continue
            layer.lora_a[slot] = mx.zeros(layer.lora_a.shape[1:])
            layer.lora_b[slot] = mx.zeros(layer.lora_b.shape[1:])
            layer.lora_a[slot, :, :r] = mx.array(a)
            layer.lora_b[slot, :r, :] = mx.array(b)
            layer.scales[slot] = adapter.scale
        mx.eval([(layer.lora_a, layer.lora_b, layer.scales) for layer in self.layers.values()])

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            self._clear_layer(layer, slot)

    @staticmethod
    def _clear_layer(layer: BankedLoRALinear, slot: int) -> None:
        layer.scales[slot] = 0.0

    def acquire(self, slot: int) -> None:
        if slot:
            self._slots[slot].in_use += 1

    def release(self, slot: int) -> None:
        if slot and slot in self._slots:
            self._slots[slot].in_use = max(self._slots[slot].in_use - 1, 0)

    def unload(self, key: str) -> bool:
        slot = self._resident.get(key)
        if slot is None or self._slots[slot].in_use:
            return False
        del self._resident[key]
        del self._slots[slot]
        self._clear(slot)
        return True

    def set_rows(self, slots: list[int] | None) -> None:
        if not slots or not any(slots):
            self.ctx.slot_ids = None
            self.ctx.rows = {}
            return
        ids = mx.array(slots)
        self.ctx.slot_ids = ids
        self.ctx.rows = {id(layer): layer.gather(ids) for layer in self.layers.values()}
        mx.eval(list(self.ctx.rows.values()))
