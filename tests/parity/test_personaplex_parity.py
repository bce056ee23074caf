"""PersonaPlex and its Mimi against Kyutai's `moshi` (PyPI 0.2.13, PyTorch CPU, fp32).

The checkpoint is the one `python -m finetune make-tiny personaplex` writes (NVIDIA's release
layout: PyTorch Moshi names in `model.safetensors`, the Kyutai Mimi file, the SentencePiece model,
a `config.json` of flat Kyutai LM keys with dep_q 16). Kyutai's own loading path reads it:
`CheckpointInfo.from_hf_repo(..., config_path=...)`, `get_moshi` (a strict `load_state_dict`) and
`get_mimi`. Our side runs in the project's venv (tests/parity/personaplex_ours.py): the server's
`DuplexModel.load` and its runtime step, the training forward, and the Mimi our loader built.

Tolerances. Both sides hold the same bf16 weights widened to fp32 and compute in fp32; they
differ only in summation order and kernels (MLX's fused RMSNorm / RoPE / attention against
PyTorch's), so logits agree to float32 rounding grown through the layers: measured at most 4e-6
absolute on logits of magnitude up to ~8 (about 40 float32 ulps). We require 5e-5 absolute plus
1e-5 of the largest logit: ten times the rounding seen, while any layout or wiring mistake (a
transposed projection, a wrong slice, a missing mask) moves logits by 0.1 or more. Mimi codes are
an argmin over 2048 codewords: they must be equal. Decoded audio (SEANet decoder, transposed
convolutions) measured at most 6e-7 from a signal of peak ~0.5: we require 1e-5.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.models.lm_utils import _delay_sequence
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OURS_SCRIPT = Path(__file__).with_name("personaplex_ours.py")
STEPS = 6  # frames of tokens compared; the first is "one step"
FRAMES = 8  # Mimi frames of audio compared (0.64 s)
FRAME_SIZE = 1920
AGENT = 8  # the depformer slices the server runs (the agent's codebooks)
LOGIT_ATOL, LOGIT_RTOL = 5e-5, 1e-5
PCM_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# fixtures: our checkpoint, our outputs (project venv), Kyutai's models (this venv)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, our_python: Path) -> Path:
    out = tmp_path_factory.mktemp("personaplex") / "tiny"
    subprocess.run(
        [str(our_python), "-m", "finetune", "make-tiny", "personaplex", str(out), "--seed", "0"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    text = rng.integers(0, 32000, (1, 1, STEPS))
    audio = rng.integers(0, 2048, (1, 16, STEPS))
    t = np.arange(FRAMES * FRAME_SIZE) / 24000.0
    pcm = 0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.2 * np.sin(2 * np.pi * 1330.0 * t)
    pcm = (pcm + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    return {
        "codes": np.concatenate([text, audio], axis=1).astype(np.int64),
        "pcm": pcm,
        "decode_codes": rng.integers(0, 2048, (AGENT, FRAMES)).astype(np.int64),
    }


@pytest.fixture(scope="module")
def ours(
    checkpoint: Path,
    inputs: dict[str, np.ndarray],
    our_python: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, np.ndarray]:
    work = tmp_path_factory.mktemp("personaplex-ours")
    np.savez(work / "inputs.npz", **inputs)
    result = subprocess.run(
        [
            str(our_python),
            str(OURS_SCRIPT),
            str(checkpoint),
            str(work / "inputs.npz"),
            str(work / "ours.npz"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(work / "ours.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def info(checkpoint: Path) -> Any:
    """Kyutai's CheckpointInfo for the local directory, as its CLIs build it (every file named,
    so nothing is fetched)."""
    config = json.loads((checkpoint / "config.json").read_text())
    return loaders.CheckpointInfo.from_hf_repo(
        "local/personaplex-tiny",
        moshi_weights=str(checkpoint / config["moshi_name"]),
        mimi_weights=str(checkpoint / config["mimi_name"]),
        tokenizer=str(checkpoint / config["tokenizer_name"]),
        config_path=str(checkpoint / "config.json"),
        mimi_config_path=str(checkpoint / config["mimi_config_name"]),
    )


@pytest.fixture(scope="module")
def moshi_lm(info: Any) -> Any:
    torch.manual_seed(0)
    return info.get_moshi(device="cpu", dtype=torch.float32)  # strict load_state_dict


@pytest.fixture(scope="module")
def moshi_mimi(info: Any) -> Any:
    mimi = info.get_mimi(device="cpu")  # strict load_state_dict
    # Kyutai sizes Mimi as max(dep_q, n_q - dep_q) = 16 codebooks for dep_q 16; PersonaPlex
    # (NVIDIA's loader, and ours) uses the first 8 per stream.
    mimi.set_num_codebooks(AGENT)
    return mimi


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_moshi_loads_every_tensor_with_personaplex_dims(info: Any, moshi_lm: Any) -> None:
    assert info.lm_config["dep_q"] == 16 and info.lm_config["n_q"] == 16
    assert moshi_lm.dep_q == 16 and moshi_lm.n_q == 16 and moshi_lm.card == 2048
    assert len(moshi_lm.linears) == 16 and len(moshi_lm.depformer_in) == 16
    assert moshi_lm.delays == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    fresh = info.get_moshi(device="cpu", dtype=torch.float32, load_weight=False)
    state = load_file(str(info.moshi_weights))
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_moshi_loads_our_mimi_strictly(info: Any, moshi_mimi: Any) -> None:
    assert info.mimi_config is not None  # the tiny codec's own config, in Kyutai's form
    assert moshi_mimi.frame_size == FRAME_SIZE and moshi_mimi.sample_rate == 24000
    fresh = loaders.get_mimi(None, info.mimi_config, device="cpu")
    result = fresh.load_state_dict(load_file(str(info.mimi_weights)), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []


# ---------------------------------------------------------------------------------------------
# language model logits
# ---------------------------------------------------------------------------------------------
def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert np.isfinite(ours).all() and np.isfinite(theirs).all(), what
    diff = float(np.max(np.abs(ours - theirs)))
    bound = LOGIT_ATOL + LOGIT_RTOL * float(np.max(np.abs(theirs)))
    assert diff <= bound, f"{what}: max |ours - moshi| = {diff:.3g} > {bound:.3g}"
    return diff


def test_one_step_text_and_audio_logits_equal(
    moshi_lm: Any, ours: dict[str, np.ndarray], inputs: dict[str, np.ndarray]
) -> None:
    """Step 0: every stream reads its initial token; the depformer is teacher-forced with the
    delayed tokens of step 0 (Moshi's `forward_text` / `forward_depformer_training`)."""
    codes = torch.from_numpy(inputs["codes"])
    with torch.no_grad():
        initial = moshi_lm._get_initial_token()
        targets = _delay_sequence(moshi_lm.delays, codes, initial)[:, :, :1]
        out, text_logits = moshi_lm.forward_text(initial)
        audio_logits = moshi_lm.forward_depformer_training(targets, out)
    text = text_logits[0, 0, 0].numpy()
    audio = audio_logits[0, :, 0].numpy()  # [16, 2048]
    assert text.shape == (32000,) and audio.shape == (16, 2048)
    diffs = [
        _close(ours["serve_text"][0], text, "server step text logits"),
        _close(ours["serve_audio"][:, 0], audio[:AGENT], "server step agent audio logits"),
        _close(ours["train_text"][0], text, "training forward text logits"),
        _close(ours["train_audio"][:, 0], audio, "training forward audio logits (16 slices)"),
    ]
    print(f"one step: max abs diffs {_fmt(diffs)}")


def _fmt(diffs: list[float]) -> str:
    return ", ".join(f"{d:.2e}" for d in diffs)


def _undelay(delayed: np.ndarray, delays: list[int], steps: int) -> np.ndarray:
    """[K, S, V] in delayed time -> [K, steps, V] per frame (NaN where no step predicts it)."""
    out = np.full((delayed.shape[0], steps, delayed.shape[2]), np.nan, np.float32)
    for k, delay in enumerate(delays):
        frames = min(steps, delayed.shape[1] - delay)
        out[k, :frames] = delayed[k, delay : delay + frames]
    return out


def test_every_step_matches_moshis_forward(
    moshi_lm: Any, ours: dict[str, np.ndarray], inputs: dict[str, np.ndarray]
) -> None:
    """All STEPS frames: Moshi's training forward (causal, delays undone) against the server's
    one-step-at-a-time path over its KV caches and our causal training forward."""
    with torch.no_grad():
        out = moshi_lm(torch.from_numpy(inputs["codes"]))
    mask = out.mask[0].numpy()  # [16, T]: frames a step of the sequence predicts
    text_mask = out.text_mask[0, 0].numpy()
    assert text_mask.all() and mask[:, : STEPS - 1].all() and mask.sum() >= 16 * (STEPS - 1)
    text = out.text_logits[0, 0].numpy()
    audio = out.logits[0].numpy()  # [16, T, 2048]
    audio_delays = moshi_lm.delays[1:]
    serve = _undelay(ours["serve_audio"], audio_delays[:AGENT], STEPS)
    train = _undelay(ours["train_audio"], audio_delays, STEPS)
    diffs = [
        _close(ours["serve_text"], text, "server steps text logits"),
        _close(serve[mask[:AGENT]], audio[:AGENT][mask[:AGENT]], "server steps audio logits"),
        _close(ours["train_text"][:STEPS], text, "training forward text logits"),
        _close(train[mask], audio[mask], "training forward audio logits"),
    ]
    print(f"{STEPS} steps: max abs diffs {_fmt(diffs)}")


# ---------------------------------------------------------------------------------------------
# Mimi
# ---------------------------------------------------------------------------------------------
def test_mimi_codes_equal(moshi_mimi: Any, ours: dict[str, np.ndarray], inputs: dict) -> None:
    pcm = torch.from_numpy(inputs["pcm"])[None, None]
    with torch.no_grad():
        batch = moshi_mimi.encode(pcm)[0].numpy()
        with moshi_mimi.streaming(1):
            frames = [
                moshi_mimi.encode(pcm[..., i : i + FRAME_SIZE])[0]
                for i in range(0, pcm.shape[-1], FRAME_SIZE)
            ]
    stream = torch.cat(frames, dim=-1).numpy()
    assert batch.shape == (AGENT, FRAMES) and len(np.unique(batch)) > AGENT
    np.testing.assert_array_equal(stream, batch)  # Kyutai's two paths agree
    np.testing.assert_array_equal(ours["stream_codes"], stream)  # serving (MimiStreamer)
    np.testing.assert_array_equal(ours["batch_codes"], batch)  # training's batch encode


def test_mimi_decode_within_tolerance(
    moshi_mimi: Any, ours: dict[str, np.ndarray], inputs: dict
) -> None:
    codes = torch.from_numpy(inputs["decode_codes"])[None]
    with torch.no_grad():
        batch = moshi_mimi.decode(codes)[0, 0].numpy()
        with moshi_mimi.streaming(1):
            frames = [moshi_mimi.decode(codes[..., f : f + 1])[0, 0] for f in range(FRAMES)]
    stream = torch.cat(frames).numpy()
    assert batch.shape == (FRAMES * FRAME_SIZE,) and float(np.abs(batch).max()) > 1e-3
    diffs = []
    for name, theirs in (("stream_pcm", stream), ("batch_pcm", batch)):
        diff = float(np.max(np.abs(ours[name] - theirs)))
        assert diff <= PCM_ATOL, f"{name}: max |ours - moshi| = {diff:.3g} > {PCM_ATOL}"
        diffs.append(diff)
    print(f"Mimi decode: max abs diffs {_fmt(diffs)} (peak {np.abs(batch).max():.3f})")
