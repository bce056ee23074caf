"""Load a PersonaPlex checkpoint directory through mlx-audio's real path, loudly.

The language model goes through `Lm.load_pytorch_weights(strict=True)` and the codec through
`Mimi.load_pytorch_weights(strict=True)` (all 32 codebooks of the file), after which the Mimi
keeps its first 8 codebooks as NVIDIA's `set_num_codebooks(8)` does. Before any of that, every
file, key, shape and the text tokenizer are checked, so a bad directory raises ONE
`CheckpointError` listing every problem (mlx-audio would stop at the first KeyError, or load a
codec non-strictly and fail much later).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.families.personaplex.kyutai_mimi import mimi_section_from_kyutai
from finetune.families.personaplex.layout import (
    CONFIG_NAME,
    MIMI_NAME,
    MOSHI_NAME,
    PERSONAPLEX_DELAYS,
    STREAM_CODEBOOKS,
    TEXT_TOKENIZER_NAME,
    lm_config,
    mimi_config,
    real_lm_config_dict,
)
from finetune.families.personaplex.pytorch_names import (
    Shape,
    lm_pytorch_shapes,
    mimi_pytorch_shapes,
)
from finetune.families.personaplex.text_tokenizer import load_spm, tokenizer_problems
from finetune.loading import CheckpointError, captured_output, offline_hub, resolve_model_path, tail
from finetune.runtime import PreparedModel, prepare_model
from finetune.runtime.accelerate import to_float32
from finetune.runtime.half import bf16_linears

import mlx.core as mx

_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_LISTED = 12


@dataclass
class LoadedPersonaPlex:
    path: Path
    lm: Any  # mlx_audio.sts.models.moshi.lm.Lm, fp32, eval mode
    lm_config: Any  # mlx_audio.sts.models.moshi.lm.LmConfig
    mimi: Any  # mlx_audio.codec.models.mimi.Mimi with 8 codebooks
    text_tokenizer: Any  # sentencepiece.SentencePieceProcessor
    config: dict[str, Any]
    runtime: PreparedModel | None = None

    @property
    def user_codebooks(self) -> int:
        return STREAM_CODEBOOKS

    @property
    def agent_codebooks(self) -> int:
        return STREAM_CODEBOOKS


def read_personaplex_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The config dict to build from (real 7B dims when absent or not in Kyutai's flat form)."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        return real_lm_config_dict(), []
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return real_lm_config_dict(), [f"{CONFIG_NAME} is not valid JSON: {exc}"]
    if not isinstance(config, dict):
        return real_lm_config_dict(), [f"{CONFIG_NAME} does not hold an object"]
    if "dim" not in config:  # e.g. a hub-style config without LM dims: the real model's
        merged = real_lm_config_dict()
        kept = ("mimi", "mimi_config_name", "moshi_name", "mimi_name", "tokenizer_name")
        merged.update({k: v for k, v in config.items() if k in kept})
        return merged, []
    return config, []


def read_mimi_section(path: Path, config: dict[str, Any]) -> tuple[Any, list[str]]:
    """Our Mimi section (None: the real Mimi): from the Kyutai-form file `mimi_config_name`
    names, else from the `mimi` section directories written before it carry."""
    name = config.get("mimi_config_name")
    if name is None:
        return config.get("mimi"), []
    file = path / str(name)
    if not file.is_file():
        return None, [f"{file.name} is missing ({CONFIG_NAME} names it as mimi_config_name)"]
    try:
        return mimi_section_from_kyutai(json.loads(file.read_text())), []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{file.name} is not valid JSON: {exc}"]
    except (KeyError, TypeError, ValueError) as exc:
        return None, [f"{file.name}: not a Mimi config this codec follows ({exc})"]


def load_personaplex(name: str | Path, *, serving: bool = False) -> LoadedPersonaPlex:
    """Load and verify a checkpoint; `serving`: for inference only (a bf16 checkpoint's Linear
    layers stay bf16 on the CPU backend, finetune/runtime/half.py), not for training."""
    from mlx_audio.codec.models.mimi.mimi import Mimi
    from mlx_audio.sts.models.moshi.lm import Lm

    path = resolve_model_path(name)
    config, problems = read_personaplex_config(path)
    lm_cfg, cfg_problems = _lm_config(config)
    problems += cfg_problems
    mimi_section, mimi_problems = read_mimi_section(path, config)
    problems += mimi_problems
    mimi_cfg = None
    try:
        mimi_cfg = None if mimi_problems else mimi_config(mimi_section)
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"{CONFIG_NAME}: bad mimi section ({type(exc).__name__}: {exc})")

    moshi_file = path / str(config.get("moshi_name", MOSHI_NAME))
    mimi_file = path / str(config.get("mimi_name", MIMI_NAME))
    spm_file = path / str(config.get("tokenizer_name", TEXT_TOKENIZER_NAME))
    for file in (moshi_file, mimi_file, spm_file):
        if not file.is_file():
            problems.append(f"{file.name} is missing")

    quant = config.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        problems.append(f"{CONFIG_NAME}: quantization is not an object")
        quant = None
    if moshi_file.is_file():
        if quant is not None:  # an MLX-named quantised variant (personaplex/quantize.py)
            expected = None if lm_cfg is None else _quantised_shapes(Lm(lm_cfg), quant)
            problems += _weight_problems(moshi_file, expected, quantised=True)
        else:
            expected = lm_pytorch_shapes(Lm(lm_cfg)) if lm_cfg is not None else None
            problems += _weight_problems(moshi_file, expected)
    if mimi_file.is_file():
        expected = mimi_pytorch_shapes(Mimi(mimi_cfg)) if mimi_cfg is not None else None
        problems += _weight_problems(mimi_file, expected)

    tokenizer = None
    if spm_file.is_file():
        try:
            tokenizer = load_spm(spm_file)
        except (OSError, RuntimeError) as exc:
            problems.append(f"{spm_file.name} is not a readable SentencePiece model: {exc}")
        else:
            vocab = lm_cfg.text_out_vocab_size if lm_cfg is not None else 32000
            problems += [f"{spm_file.name}: {p}" for p in tokenizer_problems(tokenizer, vocab)]
    if problems:
        raise CheckpointError(path, problems)
    assert lm_cfg is not None and mimi_cfg is not None and tokenizer is not None

    lm = _load_lm(path, moshi_file, lm_cfg, quant)
    # The temporal transformer and the depformer run every 80 ms tick, reading every weight.
    half = bf16_linears(lm) if serving else []
    runtime = prepare_model(lm, bf16_layers=half, fp32_everywhere=True)
    mimi = _load_mimi(path, mimi_file, mimi_cfg)
    prepare_model(mimi)
    return LoadedPersonaPlex(
        path=path,
        lm=lm,
        lm_config=lm_cfg,
        mimi=mimi,
        text_tokenizer=tokenizer,
        config=config,
        runtime=runtime,
    )


def _lm_config(config: dict[str, Any]) -> tuple[Any, list[str]]:
    try:
        cfg = lm_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        return None, [f"{CONFIG_NAME}: cannot build the LM config ({type(exc).__name__}: {exc})"]
    problems = []
    if cfg.audio_codebooks != 2 * STREAM_CODEBOOKS:
        problems.append(f"n_q is {cfg.audio_codebooks}, PersonaPlex has {2 * STREAM_CODEBOOKS}")
    if cfg.depformer.num_slices != 2 * STREAM_CODEBOOKS:
        problems.append(
            f"dep_q is {cfg.depformer.num_slices}, PersonaPlex has {2 * STREAM_CODEBOOKS}"
        )
    if cfg.audio_vocab_size != 2049:
        problems.append(f"card is {cfg.audio_vocab_size - 1}, the Mimi codebooks have 2048")
    if [0, *cfg.audio_delays] != PERSONAPLEX_DELAYS:
        problems.append(f"delays are {[0, *cfg.audio_delays]}, expected {PERSONAPLEX_DELAYS}")
    if cfg.depformer.weights_per_step_schedule is not None:
        problems.append("depformer_weights_per_step_schedule is not supported")
    return (cfg if not problems else None), problems


def safetensors_header(file: Path) -> dict[str, tuple[str, Shape]]:
    """Tensor name -> (dtype, shape) from a .safetensors header, without reading the data."""
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        total = file.stat().st_size
        if size > total - 8 or size > 100_000_000:
            raise ValueError(f"header length {size} does not fit in a {total}-byte file")
        header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out: dict[str, tuple[str, Shape]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= total - 8 - size:
            raise ValueError(f"{key}: data offsets {start}..{end} lie outside the file")
        out[key] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    return out


def _quantised_shapes(lm: Any, quant: dict[str, Any]) -> dict[str, Shape]:
    """MLX name -> shape of the LM tree as a quantised variant stores it."""
    from finetune.arrays import flat_items
    from finetune.families.personaplex.quantize import quant_allowed
    from finetune.variants import quantize_loaded

    quantize_loaded(lm, quant, quant_allowed)
    return {k: tuple(v.shape) for k, v in flat_items(lm.parameters())}


def _weight_problems(
    file: Path, expected: dict[str, Shape] | None, *, quantised: bool = False
) -> list[str]:
    try:
        found = safetensors_header(file)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return [f"{file.name} is not a readable safetensors file ({exc})"]
    if expected is None:  # the config could not say what to expect
        return []
    problems = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{file.name}: {len(missing)} tensors missing: {_listing(missing)}")
    if extra:
        problems.append(f"{file.name}: {len(extra)} unexpected tensors: {_listing(extra)}")
    for key in sorted(set(found) & set(expected)):
        dtype, shape = found[key]
        if shape != expected[key]:
            problems.append(f"{file.name}: {key} has shape {shape}, expected {expected[key]}")
        packed = quantised and key.endswith(".weight") and f"{key[:-7]}.scales" in expected
        if packed and dtype != "U32":
            problems.append(f"{file.name}: {key} has dtype {dtype}, expected packed U32")
        elif quantised and key.endswith(".scales") and dtype == "U8":
            pass  # microscaling (mxfp4) scales are 8-bit exponents
        elif not packed and dtype not in _FLOAT_DTYPES:
            problems.append(f"{file.name}: {key} has dtype {dtype}, expected a float type")
    return problems


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown}, ... ({len(names) - _LISTED} more)"


def _load_lm(path: Path, file: Path, cfg: Any, quant: dict[str, Any] | None = None) -> Any:
    from mlx_audio.sts.models.moshi.lm import Lm

    lm = Lm(cfg)
    if quant is not None:
        _quantised_shapes(lm, quant)
    with offline_hub(), captured_output() as printed:
        try:
            if quant is not None:
                lm.load_weights(str(file), strict=True)
            else:
                lm.load_pytorch_weights(str(file), cfg, strict=True)
        except Exception as exc:  # mlx raises ValueError / KeyError / RuntimeError here
            raise CheckpointError(
                path, [f"{file.name} did not load: {type(exc).__name__}: {exc}"]
            ) from exc
    if "error" in printed.getvalue().lower():
        raise CheckpointError(path, [f"{file.name}: {tail(printed.getvalue())}"])
    lm.eval()
    return lm


def _load_mimi(path: Path, file: Path, cfg: Any) -> Any:
    from mlx_audio.codec.models.mimi.mimi import Mimi

    mimi = Mimi(cfg)
    with offline_hub(), captured_output():
        try:
            mimi.load_pytorch_weights(str(file), strict=True)
        except Exception as exc:  # mlx raises ValueError / KeyError / RuntimeError here
            raise CheckpointError(
                path, [f"{file.name} did not load: {type(exc).__name__}: {exc}"]
            ) from exc
    keep_codebooks(mimi, STREAM_CODEBOOKS)
    to_float32(mimi)
    mx.eval(mimi.parameters())
    mimi.eval()
    return mimi


def keep_codebooks(mimi: Any, count: int) -> None:
    """Keep the first `count` codebooks of a loaded Mimi (NVIDIA's `set_num_codebooks`)."""
    quantizer = mimi.quantizer
    rest = quantizer.rvq_rest.vq.layers
    if count < 1 or count - 1 > len(rest):
        raise ValueError(f"cannot keep {count} codebooks of {len(rest) + 1}")
    quantizer.rvq_rest.vq.layers = rest[: count - 1]
    quantizer._nq = count
    mimi.cfg = dataclasses.replace(mimi.cfg, quantizer_nq=count)
