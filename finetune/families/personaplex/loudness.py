"""Integrated loudness (ITU-R BS.1770-4) and normalisation of a voice prompt.

NVIDIA normalises every voice-prompt WAV to -24 LUFS (pyloudnorm) before encoding it; this is
the same measurement (K-weighting, 400 ms blocks with 75 % overlap, absolute gate at -70 LUFS,
relative gate at -10 LU) for mono audio, with scipy's filters.
"""

from __future__ import annotations

import math

import numpy as np

VOICE_PROMPT_LUFS = -24.0


def _k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    # High-shelf then high-pass biquads, coefficients derived for any rate (BS.1770 / pyloudnorm).
    gain, q, fc = 4.0, 1 / math.sqrt(2), 1500.0
    a_lin = 10 ** (gain / 40)
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    sq = 2 * math.sqrt(a_lin) * alpha
    shelf_b = np.array(
        [
            a_lin * ((a_lin + 1) + (a_lin - 1) * cos + sq),
            -2 * a_lin * ((a_lin - 1) + (a_lin + 1) * cos),
            a_lin * ((a_lin + 1) + (a_lin - 1) * cos - sq),
        ]
    )
    shelf_a = np.array(
        [
            (a_lin + 1) - (a_lin - 1) * cos + sq,
            2 * ((a_lin - 1) - (a_lin + 1) * cos),
            (a_lin + 1) - (a_lin - 1) * cos - sq,
        ]
    )
    fc, q = 38.0, 0.5
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    pass_b = np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2])
    pass_a = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return [(shelf_b / shelf_a[0], shelf_a / shelf_a[0]), (pass_b / pass_a[0], pass_a / pass_a[0])]


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """LUFS of mono audio; -inf for silence or audio shorter than one 400 ms block."""
    from scipy.signal import lfilter

    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    for b, a in _k_weighting(rate):
        x = lfilter(b, a, x)
    block, hop = int(0.4 * rate), int(0.1 * rate)
    if x.shape[0] < block:
        return -math.inf
    starts = np.arange(0, x.shape[0] - block + 1, hop)
    power = np.array([np.mean(x[s : s + block] ** 2) for s in starts])
    with np.errstate(divide="ignore"):
        loud = -0.691 + 10 * np.log10(power)
    gated = power[loud > -70.0]
    if gated.size == 0:
        return -math.inf
    relative = -0.691 + 10 * np.log10(gated.mean()) - 10.0
    with np.errstate(divide="ignore"):
        final = power[(loud > -70.0) & (loud > relative)]
    if final.size == 0:
        return -math.inf
    return float(-0.691 + 10 * np.log10(final.mean()))


def normalize_loudness(
    audio: np.ndarray, rate: int, target: float = VOICE_PROMPT_LUFS
) -> np.ndarray:
    """Audio scaled to `target` LUFS (unchanged when it is silent or too short to measure)."""
    loudness = integrated_loudness(audio, rate)
    if not math.isfinite(loudness):
        return np.asarray(audio, dtype=np.float32)
    gain = 10 ** ((target - loudness) / 20)
    return (np.asarray(audio, dtype=np.float64) * gain).astype(np.float32)
