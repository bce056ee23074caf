"""Shared fixtures: tiny models are built once per test session, never per test."""

from __future__ import annotations

from pathlib import Path

import pytest

import finetune  # noqa: F401  (optimised BLAS before mlx.core is imported)


@pytest.fixture(scope="session")
def tiny_qwen3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    return make_tiny_qwen3_tts(tmp_path_factory.mktemp("models") / "qwen3_base", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("models") / "qwen3_custom"
    return make_tiny_qwen3_tts(out, variant="custom_voice", seed=1)


@pytest.fixture(scope="session")
def loaded_qwen3_base(tiny_qwen3_base: Path):
    from finetune.families.qwen3_tts.checkpoint import load_qwen3_tts

    return load_qwen3_tts(tiny_qwen3_base)


@pytest.fixture(scope="session")
def small_qwen3_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A somewhat larger tiny model, for tests that must overfit a couple of clips."""
    from finetune.families.qwen3_tts.tiny import make_tiny_qwen3_tts

    out = tmp_path_factory.mktemp("models") / "qwen3_small"
    return make_tiny_qwen3_tts(out, seed=0, preset="small")


@pytest.fixture(scope="session")
def speaker_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic clips of one 'speaker' with a ref clip: train.jsonl (+ val.jsonl)."""
    from finetune.data import synthetic_dataset

    return synthetic_dataset(tmp_path_factory.mktemp("speaker_data"), 6, seed=3, with_ref=True)
