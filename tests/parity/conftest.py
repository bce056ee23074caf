"""Reference-parity tests: run in .venv-parity (`make parity`), never in the default suite.

That venv holds PyTorch CPU and the reference implementations (qwen-tts, moshi) but NOT the
project: qwen-tts pins transformers 4.57 and mlx-audio needs >= 5.14. Our side therefore runs in
the project's venv (`OUR_PYTHON`, default .venv/bin/python): tests start our real server or CLI
there as a subprocess and compare what it wrote with what the reference computes here.
pytest runs with --confcutdir=tests/parity so tests/conftest.py (which imports MLX) is not loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torchaudio_stand_in import stand_in_torchaudio  # tests/parity, on pytest's path

ROOT = Path(__file__).resolve().parents[2]
OUR_PYTHON = Path(os.environ.get("VF_OUR_PYTHON", ROOT / ".venv" / "bin" / "python"))


stand_in_torchaudio()


@pytest.fixture(scope="session")
def our_python() -> Path:
    """The project's interpreter (MLX, mlx-audio, our server): our side of a comparison."""
    if not OUR_PYTHON.exists():
        raise RuntimeError(f"{OUR_PYTHON} is missing: run `make install` first (make parity does)")
    return OUR_PYTHON
