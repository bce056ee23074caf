"""Reference-parity tests: run in .venv-parity (`make parity`), never in the default suite.

That venv holds PyTorch CPU and the reference implementations (qwen-tts, moshi) but NOT the
project: qwen-tts pins transformers 4.57 and mlx-audio needs >= 5.14. Our side therefore runs in
the project's venv (`OUR_PYTHON`, default .venv/bin/python): tests start our real server or CLI
there as a subprocess and compare what it wrote with what the reference computes here.
pytest runs with --confcutdir=tests/parity so tests/conftest.py (which imports MLX) is not loaded.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUR_PYTHON = Path(os.environ.get("VF_OUR_PYTHON", ROOT / ".venv" / "bin" / "python"))


def _stand_in_torchaudio() -> None:
    """qwen_tts imports `torchaudio.compliance.kaldi` at package import, for the 25 Hz speech
    tokenizer's fbank features only. No PyPI torchaudio loads beside torch 2.13 (its C++
    extension fails to load), and the 12 Hz tokenizer these tests compare never calls it, so an
    empty module stands in for that one import; any call into it raises AttributeError."""
    if "torchaudio" in sys.modules:
        return
    names = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi")
    modules = {}
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules[name] = module
    modules["torchaudio"].compliance = modules["torchaudio.compliance"]  # type: ignore[attr-defined]
    modules["torchaudio.compliance"].kaldi = modules["torchaudio.compliance.kaldi"]  # type: ignore[attr-defined]
    sys.modules.update(modules)


_stand_in_torchaudio()


@pytest.fixture(scope="session")
def our_python() -> Path:
    """The project's interpreter (MLX, mlx-audio, our server): our side of a comparison."""
    if not OUR_PYTHON.exists():
        raise RuntimeError(f"{OUR_PYTHON} is missing: run `make install` first (make parity does)")
    return OUR_PYTHON
