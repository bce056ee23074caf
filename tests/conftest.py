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
