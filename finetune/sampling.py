"""Sampling options of a speech request, family-neutral: a family uses the ones its model has
(Qwen3-TTS all of them, CSM temperature and top_k). The server's requests and the trainer's
quality previews both use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9  # 0: greedy (argmax)
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_tokens: int = 2048  # frames per segment
