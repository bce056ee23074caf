"""An empty `torchaudio` for qwen-tts in .venv-parity (the parity tests and the foundation
benchmark's peer run): imported before qwen_tts, with no MLX and no project imports."""

from __future__ import annotations

import importlib.machinery
import sys
import types


def stand_in_torchaudio() -> None:
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
