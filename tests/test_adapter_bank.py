"""The adapter bank: banked layers equal LoRA layers, LRU eviction, busy slots are kept."""

from __future__ import annotations

from pathlib import Path

from finetune.lora import AdapterError, LoRAConfig, apply_lora, lora_state, save_adapters

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from server.engine.bank import AdapterBank, AdapterTensors, BankFull

TARGETS = [r"layers\.\d+\.(q|v)"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 48)
        self.v = nn.Linear(32, 32)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [Block(), Block()]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer.v(x) + layer.q(x)[..., :32]
        return x


def _adapter(tmp: Path, seed: int, rank: int = 4) -> Path:
    mx.random.seed(seed)
    model = Tiny()
    config = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    apply_lora(model, config)
    rng = np.random.default_rng(seed)
    model.update(
        tree_unflatten(
            [
                (k, mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32)))
                for k, v in lora_state(model).items()
            ]
        )
    )
    out = tmp / f"adapter{seed}"
    save_adapters(out, model, config, {"family": "test", "module": "talker"})
    return out


@pytest.fixture
def base() -> Tiny:
    mx.random.seed(0)
    return Tiny()


def test_banked_rows_equal_each_adapter_applied_alone(base, tmp_path):
    from finetune.lora import load_adapters

    paths = [_adapter(tmp_path, s) for s in (1, 2)]
    x = mx.random.normal((3, 5, 32))
    expected = []
    for path in paths:
        solo = Tiny()
        solo.update(base.parameters())
        load_adapters(solo, path)
        expected.append(solo(x))
    plain = base(x)

    bank = AdapterBank(base, TARGETS, slots=4, max_rank=8, max_bytes=1 << 20)
    slots = [bank.ensure(AdapterTensors.read(p)) for p in paths]
    bank.set_rows([slots[0], 0, slots[1]])  # adapter 1, no adapter, adapter 2 in one batch
    out = base(x)
    bank.set_rows(None)
    assert mx.abs(out[0] - expected[0][0]).max().item() < 1e-5
    assert mx.abs(out[1] - plain[1]).max().item() < 1e-6
    assert mx.abs(out[2] - expected[1][2]).max().item() < 1e-5


def test_lru_eviction_keeps_busy_adapters_and_counts(base, tmp_path):
    bank = AdapterBank(base, TARGETS, slots=3, max_rank=8, max_bytes=1 << 20)  # 2 usable
    a, b, c = (AdapterTensors.read(_adapter(tmp_path, s)) for s in (1, 2, 3))
    slot_a = bank.ensure(a)
    bank.ensure(b)
    assert bank.ensure(a) == slot_a and bank.stats.hits == 1  # a is now most recent
    bank.ensure(c)  # evicts b, the least recently used
    assert bank.slot_of(str(b.path)) is None and bank.slot_of(str(a.path)) == slot_a
    assert bank.stats.evictions == 1 and bank.stats.misses == 3
    bank.acquire(slot_a)
    bank.acquire(bank.slot_of(str(c.path)))
    with pytest.raises(BankFull):
        bank.ensure(b)  # both slots busy: nothing may be evicted
    bank.release(slot_a)
    assert bank.ensure(b) == slot_a  # a was idle again, so it made room


def test_byte_budget_evicts_too(base, tmp_path):
    a = AdapterTensors.read(_adapter(tmp_path, 1))
    bank = AdapterBank(base, TARGETS, slots=8, max_rank=8, max_bytes=int(a.nbytes * 1.5))
    bank.ensure(a)
    bank.ensure(AdapterTensors.read(_adapter(tmp_path, 2)))
    assert bank.stats.evictions == 1 and bank.resident_bytes <= bank.max_bytes


def test_adapters_that_do_not_fit_are_refused(base, tmp_path):
    bank = AdapterBank(base, TARGETS, slots=4, max_rank=2, max_bytes=1 << 20)
    with pytest.raises(AdapterError, match="max rank"):
        bank.ensure(AdapterTensors.read(_adapter(tmp_path, 1, rank=4)))
    broken = _adapter(tmp_path, 5)
    (broken / "adapters.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="unreadable"):
        AdapterTensors.read(broken)
