"""Load a Qwen3-TTS checkpoint through mlx-audio's real path, loudly.

mlx-audio's `post_load_hook` prints a warning and carries on when the text tokenizer or the
speech tokenizer fails to load, and loads speech-tokenizer weights with `strict=False`; the model
then fails much later. Here every such problem is collected and raised at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items, load_arrays
from finetune.loading import (
    CheckpointError,
    captured_output,
    offline_hub,
    read_config,
    resolve_model_path,
    tail,
)
from finetune.runtime import PreparedModel, fast_cpu_active, prepare_model
from finetune.runtime.half import bf16_linears

import mlx.core as mx
import mlx.nn as nn


@dataclass
class LoadedQwen3TTS:
    model: Any  # mlx_audio.tts.models.qwen3_tts.Model
    path: Path
    config: dict[str, Any]
    runtime: PreparedModel

    @property
    def tts_model_type(self) -> str:
        return str(self.config.get("tts_model_type", "base"))

    @property
    def quantization(self) -> dict[str, Any] | None:
        """config.json's quantization (mlx-audio's converter writes it), None: full precision."""
        quant = self.config.get("quantization", self.config.get("quantization_config"))
        return quant if isinstance(quant, dict) else None


def load_qwen3_tts(name: str | Path, *, serving: bool = False) -> LoadedQwen3TTS:
    """Load and verify a checkpoint; `serving`: for inference only (a bf16 talker stays bf16 on
    the CPU backend, finetune/runtime/half.py), not for training."""
    from finetune.families.qwen3_tts.vocoder import use_sliding_window

    from mlx_audio.tts.utils import load_model

    path = resolve_model_path(name)
    config = read_config(path)
    if config.get("model_type") != "qwen3_tts":
        raise CheckpointError(path, [f"model_type is {config.get('model_type')!r}, not qwen3_tts"])

    with offline_hub(), captured_output() as printed:
        try:
            model = load_model(path)
        except Exception as exc:  # mlx-audio raises ValueError / KeyError / OSError here
            raise CheckpointError(path, [f"{type(exc).__name__}: {exc}"]) from exc

    problems: list[str] = []
    if model.tokenizer is None:
        problems.append(f"text tokenizer did not load ({tail(printed.getvalue())})")
    else:
        problems.extend(_text_tokenizer_problems(model.tokenizer, config))
    decoder = None
    speech_dir = path / "speech_tokenizer"
    if not speech_dir.is_dir():
        problems.append("speech_tokenizer/ is missing")
    elif model.speech_tokenizer is None:
        problems.append(f"speech tokenizer did not load ({tail(printed.getvalue())})")
    else:
        decoder, weight_problems = _verified_speech_tokenizer(model.speech_tokenizer, speech_dir)
        problems.extend(weight_problems)
    if config.get("tts_model_type", "base") == "base" and model.speaker_encoder is None:
        problems.append("base model without a speaker encoder")
    problems.extend(_quantization_problems(model, config))
    if problems:
        raise CheckpointError(path, problems)

    if decoder is not None and fast_cpu_active():
        # mlx-audio wraps the vocoder in mx.compile, which is slower than the plain module on
        # CPU; the verified plain decoder replaces it (a Module value goes back into the tree).
        model.speech_tokenizer.decoder = decoder
        if model.speech_tokenizer.decoder is not decoder:
            raise RuntimeError("could not replace mlx-audio's compiled vocoder")
    use_sliding_window(model)  # the decoder attends as the official one (vocoder.py)
    # The talker decodes frame by frame, reading every weight a step: its bf16 layers stay bf16.
    # The vocoder's products have many rows (compute-bound): fp32 there.
    half = bf16_linears(model.talker) if serving else []
    runtime = prepare_model(model, bf16_layers=half)
    return LoadedQwen3TTS(model=model, path=path, config=config, runtime=runtime)


PROBE_TEXT = "Hello world."


def _quantization_problems(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """The quantised layers must be what config.json says (mlx-audio quantises by its keys)."""
    quant = config.get("quantization", config.get("quantization_config"))
    layers = {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    if not isinstance(quant, dict):
        if layers:
            return [f"{len(layers)} layers loaded quantised but config.json has no quantization"]
        return []
    if not layers:
        return [f"config.json says quantised ({quant}) but no layer loaded quantised"]
    want = (quant.get("bits"), quant.get("group_size", 64), quant.get("mode", "affine"))
    off = [
        path
        for path, layer in layers.items()
        if path not in quant and (layer.bits, layer.group_size, layer.mode) != want
    ]
    if off:
        return [f"{len(off)} layers are not quantised as config.json says {want}: {off[:3]}"]
    return []


def _text_tokenizer_problems(tokenizer: Any, config: dict[str, Any]) -> list[str]:
    """transformers builds a near-empty tokenizer from tokenizer_config.json alone: catch it."""
    im_start = int(config.get("im_start_token_id", 151644))
    specials = {
        "<|im_start|>": im_start,
        "<tts_pad>": int(config.get("tts_pad_token_id", 151671)),
        "<tts_text_bos>": int(config.get("tts_bos_token_id", 151672)),
        "<tts_text_eod>": int(config.get("tts_eos_token_id", 151673)),
    }
    problems = [
        f"text tokenizer maps {token} to {tokenizer.convert_tokens_to_ids(token)}, "
        f"config says {expected}"
        for token, expected in specials.items()
        if tokenizer.convert_tokens_to_ids(token) != expected
    ]
    ids = tokenizer.encode(f"<|im_start|>assistant\n{PROBE_TEXT}<|im_end|>\n")
    if len(ids) < 6 or ids[0] != im_start:
        problems.append(f"text tokenizer cannot encode the chat template (got ids {ids[:8]})")
    elif tokenizer.decode(ids[3:-2]) != PROBE_TEXT:
        problems.append(f"text tokenizer does not round-trip {PROBE_TEXT!r}")
    return problems


def _verified_speech_tokenizer(
    speech_tokenizer: Any, speech_dir: Path
) -> tuple[nn.Module | None, list[str]]:
    """Check the speech tokenizer's files against its modules; return a plain decoder too."""
    from mlx_audio.tts.models.qwen3_tts.speech_tokenizer import (
        Qwen3TTSSpeechTokenizer,
        Qwen3TTSSpeechTokenizerDecoder,
    )

    files = sorted(speech_dir.glob("*.safetensors"))
    if not files:
        return None, ["speech_tokenizer/ holds no .safetensors weights"]
    raw: dict[str, mx.array] = {}
    for file in files:
        try:
            raw.update(load_arrays(file))
        except Exception as exc:  # mx.load raises RuntimeError / ValueError on corrupt files
            return None, [f"speech_tokenizer/{file.name} is unreadable: {exc}"]
    weights = Qwen3TTSSpeechTokenizer.sanitize(raw)

    # Freshly built modules only allocate lazily: comparing shapes costs no memory.
    decoder = Qwen3TTSSpeechTokenizerDecoder(speech_tokenizer.config.decoder_config)
    decoder_weights = {
        k[len("decoder.") :]: v for k, v in weights.items() if k.startswith("decoder.")
    }
    problems = _compare("speech tokenizer decoder", decoder, decoder_weights)
    encoder = speech_tokenizer.encoder_model
    if encoder is not None:
        prefix = "encoder_model."
        encoder_weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        problems += _compare("speech tokenizer encoder", encoder, encoder_weights)
    if problems:
        return None, problems
    decoder.load_weights(list(decoder_weights.items()), strict=True)
    mx.eval(decoder.parameters())
    decoder.eval()
    return decoder, []


def _compare(what: str, module: nn.Module, weights: dict[str, mx.array]) -> list[str]:
    # Mimi's `initialized` flags are never stored; mlx-audio rebuilds codebooks after loading.
    expected = {
        k: v.shape
        for k, v in flat_items(module.parameters())
        if not k.endswith("codebook.initialized")
    }
    problems = []
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"{what}: {len(missing)} weights missing, e.g. {', '.join(missing[:4])}")
    if extra:
        problems.append(f"{what}: {len(extra)} unexpected weights, e.g. {', '.join(extra[:4])}")
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != tuple(expected[key]):
            problems.append(
                f"{what}: {key} has shape {tuple(weights[key].shape)}, "
                f"expected {tuple(expected[key])}"
            )
    return problems
