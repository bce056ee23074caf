"""One reader for adapter directories (adapter_config.json + adapters.safetensors), used by the
speech bank, the duplex bank and training: every problem of both files in one AdapterError."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.adapter_files import AdapterError, read_adapter, weight_problems

import numpy as np
import pytest
from safetensors.numpy import save_file

from server.duplex.adapters import DuplexAdapterTensors
from server.engine.bank import AdapterTensors


def _write(folder: Path, config: object, tensors: dict[str, np.ndarray] | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapters.safetensors"))
    return folder


def test_a_broken_config_and_missing_tensors_are_reported_together(tmp_path: Path) -> None:
    folder = _write(tmp_path / "a", {"lora": {"rank": 0, "alpha": 1.0}}, None)
    for read in (read_adapter, AdapterTensors.read, DuplexAdapterTensors.read):
        with pytest.raises(AdapterError) as caught:
            read(folder)
        problems = caught.value.problems
        assert len(problems) == 2, problems
        assert "rank" in problems[0] and "missing adapters.safetensors" in problems[1]


def test_every_tensor_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = np.ones((4, 2), np.float32)
    bad[0, 0] = np.nan
    tensors = {
        "layers.0.q.lora_a": bad,  # not finite
        "layers.0.q.lora_b": np.zeros((2, 4), np.float32),
        "layers.1.q.lora_a": np.zeros((4, 3), np.float32),  # rank 3, config says 2
        "layers.1.q.lora_b": np.zeros((2, 4), np.float32),
        "layers.2.q.lora_a": np.zeros((4, 2), np.float32),  # no lora_b
    }
    folder = _write(tmp_path / "a", {"lora": {"rank": 2, "alpha": 4.0}}, tensors)
    for read in (read_adapter, AdapterTensors.read, DuplexAdapterTensors.read):
        with pytest.raises(AdapterError) as caught:
            read(folder)
        text = "\n".join(caught.value.problems)
        assert "layers.0.q.lora_a: holds values that are not finite" in text
        assert "layers.1.q.lora_a: shape (4, 3) does not match lora.rank 2" in text
        assert "layers.2.q.lora_a: its lora_b is missing" in text


def test_a_good_adapter_reads(tmp_path: Path) -> None:
    tensors = {"l.lora_a": np.zeros((4, 2), np.float32), "l.lora_b": np.zeros((2, 4), np.float32)}
    folder = _write(tmp_path / "a", {"lora": {"rank": 2, "alpha": 4.0}, "strategy": "x"}, tensors)
    files = read_adapter(folder)
    assert files.config.lora.rank == 2 and files.raw["strategy"] == "x"
    assert set(files.lora_tensors) == set(tensors)
    assert AdapterTensors.read(folder).scale == 2.0


def test_weight_problems_checks_expected_shapes_and_finite_values() -> None:
    problems = weight_problems(
        {"w": np.array([np.inf, 1.0], np.float32), "v": np.zeros(3, np.float32)},
        expected={"v": (4,)},
    )
    assert problems == ["v: shape (3,), expected (4,)", "w: holds values that are not finite"]


def test_training_refuses_an_adapter_with_values_that_are_not_finite(tmp_path: Path) -> None:
    from finetune.lora import ADAPTER_WEIGHTS, load_adapters

    import mlx.core as mx

    from tests.test_lora import make_tiny, trained_adapter

    out, _ = trained_adapter(tmp_path)
    weights = dict(mx.load(str(out / ADAPTER_WEIGHTS)))
    name = sorted(k for k in weights if k.endswith(".lora_b"))[0]
    weights[name] = mx.full(weights[name].shape, float("nan"))
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights)
    with pytest.raises(AdapterError, match=f"{name}: holds values that are not finite"):
        load_adapters(make_tiny(), out)
