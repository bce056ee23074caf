"""Random-initialised Qwen3-TTS checkpoints with the real module tree, config keys and layout.

No model hub is reachable here, so tests, the demo and benchmarks build their models: the
modules come from mlx-audio itself, filled with seeded random values and written as the real
checkpoint is (HF names, PyTorch conv layout, bf16 talker, speech tokenizer in its own folder).

Tiny sizes respect one quirk of mlx-audio's loader: it guesses a conv's layout from its shape, and
a kernel-1 conv with <= 64 input channels is guessed wrong. Every such conv here has more.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.arrays import flat_items
from finetune.families.qwen3_tts.hf_layout import main_model_to_hf, speech_tokenizer_to_hf
from finetune.families.qwen3_tts.text_tokenizer import write_tiny_qwen_tokenizer
from finetune.fsutil import atomic_directory

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# The released checkpoints: Base (clones from a reference clip: it has the speaker encoder),
# CustomVoice (built-in speakers; the 1.7B one also takes an instruct) and VoiceDesign (no
# speakers: the voice comes from the instruct's description; released as 1.7B only).
VARIANTS = ("base", "custom_voice", "voice_design")
# The distributions users download: `official` is the QwenLM release (what `qwen_tts` loads: HF
# names, PyTorch conv layout); `mlx-community` is what mlx-audio's converter writes from it
# (`python -m mlx_audio.convert`: the talker and speaker encoder under their MLX names and
# layouts, cast to the config's dtype, with an index file; speech_tokenizer/ copied as released).
LAYOUTS = ("official", "mlx-community")

# The built-in speakers of the real CustomVoice checkpoints (rows chosen here, 3000 kept free).
BUILTIN_SPEAKERS = {
    "vivian": 3065,
    "serena": 3066,
    "uncle_fu": 3010,
    "dylan": 2878,
    "eric": 2875,
    "ryan": 3061,
    "aiden": 2861,
    "ono_anna": 2873,
    "sohee": 2864,
}
DIALECT_SPEAKERS = {"dylan": "beijing_dialect", "eric": "sichuan_dialect"}
CODEC_LANGUAGES = {
    "chinese": 2055,
    "english": 2050,
    "german": 2053,
    "italian": 2070,
    "portuguese": 2071,
    "spanish": 2054,
    "japanese": 2058,
    "korean": 2064,
    "french": 2061,
    "russian": 2069,
    "beijing_dialect": 2074,
    "sichuan_dialect": 2062,
}


@dataclass(frozen=True)
class Dims:
    """The sizes that differ between presets; everything else keeps the real values."""

    size_tag: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    text_hidden: int
    cp_hidden: int
    cp_intermediate: int
    cp_layers: int
    cp_heads: int
    cp_kv_heads: int
    cp_head_dim: int
    spk_channels: tuple[int, ...]
    dec_latent: int
    dec_codebook_dim: int
    dec_dim: int
    dec_hidden: int
    dec_intermediate: int
    dec_layers: int
    dec_heads: int
    dec_head_dim: int
    enc_hidden: int
    enc_filters: int
    enc_layers: int
    enc_heads: int
    enc_intermediate: int
    enc_codebook_dim: int
    enc_quantizers: int
    extras: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Dims] = {
    "tiny": Dims(
        size_tag="tiny",
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=16,
        mrope_section=(4, 2, 2),
        text_hidden=32,
        cp_hidden=64,
        cp_intermediate=128,
        cp_layers=1,
        cp_heads=4,
        cp_kv_heads=2,
        cp_head_dim=16,
        spk_channels=(128, 128, 128, 128, 384),
        dec_latent=128,
        dec_codebook_dim=256,
        dec_dim=1152,
        dec_hidden=64,
        dec_intermediate=128,
        dec_layers=1,
        dec_heads=2,
        dec_head_dim=32,
        enc_hidden=128,
        enc_filters=32,
        enc_layers=1,
        enc_heads=4,
        enc_intermediate=256,
        enc_codebook_dim=64,
        enc_quantizers=16,
    ),
    # A little more capacity for tests that must overfit a couple of clips.
    "small": Dims(
        size_tag="small",
        hidden=128,
        intermediate=256,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=32,
        mrope_section=(6, 5, 5),
        text_hidden=64,
        cp_hidden=128,
        cp_intermediate=256,
        cp_layers=1,
        cp_heads=4,
        cp_kv_heads=2,
        cp_head_dim=32,
        spk_channels=(128, 128, 128, 128, 384),
        dec_latent=128,
        dec_codebook_dim=256,
        dec_dim=1152,
        dec_hidden=64,
        dec_intermediate=128,
        dec_layers=1,
        dec_heads=2,
        dec_head_dim=32,
        enc_hidden=128,
        enc_filters=32,
        enc_layers=1,
        enc_heads=4,
        enc_intermediate=256,
        enc_codebook_dim=64,
        enc_quantizers=16,
    ),
    "real-0.6b": Dims(
        size_tag="0b6",
        hidden=1024,
        intermediate=3072,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
        text_hidden=2048,
        cp_hidden=1024,
        cp_intermediate=3072,
        cp_layers=5,
        cp_heads=16,
        cp_kv_heads=8,
        cp_head_dim=128,
        spk_channels=(512, 512, 512, 512, 1536),
        dec_latent=1024,
        dec_codebook_dim=512,
        dec_dim=1536,
        dec_hidden=512,
        dec_intermediate=1024,
        dec_layers=8,
        dec_heads=16,
        dec_head_dim=64,
        enc_hidden=512,
        enc_filters=64,
        enc_layers=8,
        enc_heads=8,
        enc_intermediate=2048,
        enc_codebook_dim=256,
        enc_quantizers=32,
    ),
    "real-1.7b": Dims(
        size_tag="1b7",
        hidden=2048,
        intermediate=6144,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
        text_hidden=2048,
        cp_hidden=1024,
        cp_intermediate=3072,
        cp_layers=5,
        cp_heads=16,
        cp_kv_heads=8,
        cp_head_dim=128,
        spk_channels=(512, 512, 512, 512, 1536),
        dec_latent=1024,
        dec_codebook_dim=512,
        dec_dim=1536,
        dec_hidden=512,
        dec_intermediate=1024,
        dec_layers=8,
        dec_heads=16,
        dec_head_dim=64,
        enc_hidden=512,
        enc_filters=64,
        enc_layers=8,
        enc_heads=8,
        enc_intermediate=2048,
        enc_codebook_dim=256,
        enc_quantizers=32,
    ),
}


def model_config(dims: Dims, variant: str) -> dict[str, Any]:
    talker: dict[str, Any] = {
        "vocab_size": 3072,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "interleaved": True,
            "mrope_section": list(dims.mrope_section),
            "rope_type": "default",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_code_groups": 16,
        "text_hidden_size": dims.text_hidden,
        "position_id_per_seconds": 13,
        "text_vocab_size": 151936,
        "codec_eos_token_id": 2150,
        "codec_think_id": 2154,
        "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157,
        "codec_pad_id": 2148,
        "codec_bos_id": 2149,
        "codec_language_id": dict(CODEC_LANGUAGES),
        "spk_id": {},
        "spk_is_dialect": {},
        "code_predictor_config": {
            "vocab_size": 2048,
            "hidden_size": dims.cp_hidden,
            "intermediate_size": dims.cp_intermediate,
            "num_hidden_layers": dims.cp_layers,
            "num_attention_heads": dims.cp_heads,
            "num_key_value_heads": dims.cp_kv_heads,
            "head_dim": dims.cp_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "attention_bias": False,
            "num_code_groups": 16,
        },
    }
    if variant == "custom_voice":
        talker["spk_id"] = dict(BUILTIN_SPEAKERS)
        talker["spk_is_dialect"] = {n: DIALECT_SPEAKERS.get(n, False) for n in BUILTIN_SPEAKERS}
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tts_model_type": variant,
        "tts_model_size": dims.size_tag,
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "im_start_token_id": 151644,
        "im_end_token_id": 151645,
        "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672,
        "tts_eos_token_id": 151673,
        "torch_dtype": "bfloat16",
        "talker_config": talker,
        "speaker_encoder_config": {
            "mel_dim": 128,
            "enc_dim": dims.hidden,
            "enc_channels": list(dims.spk_channels),
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 128,
            "enc_res2net_scale": 8,
            "enc_se_channels": 128,
            "sample_rate": 24000,
        },
    }


def speech_tokenizer_config(dims: Dims) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": 16,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
        "decoder_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "latent_dim": dims.dec_latent,
            "codebook_dim": dims.dec_codebook_dim,
            "codebook_size": 2048,
            "decoder_dim": dims.dec_dim,
            "hidden_act": "silu",
            "hidden_size": dims.dec_hidden,
            "intermediate_size": dims.dec_intermediate,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "head_dim": dims.dec_head_dim,
            "num_attention_heads": dims.dec_heads,
            "num_hidden_layers": dims.dec_layers,
            "num_key_value_heads": dims.dec_heads,
            "num_quantizers": 16,
            "num_semantic_quantizers": 1,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "semantic_codebook_size": 4096,
            "sliding_window": 72,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
            "vector_quantization_hidden_dimension": dims.dec_codebook_dim,
        },
        "encoder_config": {
            "frame_rate": 12.5,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "audio_channels": 1,
            "codebook_dim": dims.enc_codebook_dim,
            "codebook_size": 2048,
            "compress": 2,
            "dilation_growth_rate": 2,
            "head_dim": dims.enc_hidden // dims.enc_heads,
            "hidden_act": "gelu",
            "hidden_size": dims.enc_hidden,
            "intermediate_size": dims.enc_intermediate,
            "kernel_size": 7,
            "last_kernel_size": 3,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "norm_eps": 1e-5,
            "num_attention_heads": dims.enc_heads,
            "num_filters": dims.enc_filters,
            "num_hidden_layers": dims.enc_layers,
            "num_key_value_heads": dims.enc_heads,
            "num_quantizers": dims.enc_quantizers,
            "num_residual_layers": 1,
            "num_semantic_quantizers": 1,
            "residual_kernel_size": 3,
            "rope_theta": 10000.0,
            "sampling_rate": 24000,
            "sliding_window": 250,
            "upsampling_ratios": [8, 6, 5, 4],
            # transformers' MimiConfig defaults to 512 groups (the real hidden size); qwen_tts
            # builds (and then drops) that upsampler, so a tiny width must name its own.
            "upsample_groups": dims.enc_hidden,
            "use_causal_conv": True,
            "use_conv_shortcut": False,
            "vector_quantization_hidden_dimension": dims.enc_codebook_dim,
        },
    }


GENERATION_CONFIG = {
    "do_sample": True,
    "temperature": 0.9,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.05,
    "max_new_tokens": 8192,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_k": 50,
    "subtalker_top_p": 1.0,
}
PREPROCESSOR_CONFIG = {"padding_side": "left", "processor_class": "Qwen3TTSProcessor"}
SPEECH_PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}


def make_tiny_qwen3_tts(
    out_dir: Path | str,
    *,
    variant: str = "base",
    seed: int = 0,
    preset: str = "tiny",
    layout: str = "official",
) -> Path:
    """Write a random checkpoint to `out_dir` (replaced whole, never left half-written).

    The same seed gives the same weights in every layout."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    from mlx_audio.tts.models.qwen3_tts.config import ModelConfig, Qwen3TTSTokenizerConfig
    from mlx_audio.tts.models.qwen3_tts.qwen3_tts import Model
    from mlx_audio.tts.models.qwen3_tts.speech_tokenizer import Qwen3TTSSpeechTokenizer

    if variant == "voice_design" and PRESETS[preset].size_tag == "0b6":
        raise ValueError("VoiceDesign is released as 1.7B only: use --preset real-1.7b")
    dims = PRESETS[preset]
    out = Path(out_dir)
    config = model_config(dims, variant)
    st_config = speech_tokenizer_config(dims)
    rng = np.random.Generator(np.random.PCG64(seed))

    model = Model(ModelConfig.from_dict(config))
    main = _random_parameters(model, rng)
    speech = _random_parameters(
        Qwen3TTSSpeechTokenizer(Qwen3TTSTokenizerConfig(**st_config_for_mlx(st_config))), rng
    )
    # The real decoder stores each codebook as (embedding_sum, cluster_usage): draw the usage.
    for key in sorted(k for k in speech if k.endswith(".codebook.embed.weight")):
        usage_key = key[: -len("embed.weight")] + "cluster_usage"
        speech[usage_key] = rng.uniform(0.5, 2.0, speech[key].shape[:1]).astype(np.float32)

    with atomic_directory(out) as staging:
        if layout == "official":
            _write_json(staging / "config.json", config)
            _save(staging / "model.safetensors", main_model_to_hf(main), mx.bfloat16)
        else:
            _write_mlx_community(staging, config, main)
        _write_json(staging / "generation_config.json", GENERATION_CONFIG)
        _write_json(staging / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        write_tiny_qwen_tokenizer(staging, seed=seed)
        speech_dir = staging / "speech_tokenizer"
        speech_dir.mkdir()
        _write_json(speech_dir / "config.json", st_config)
        _write_json(speech_dir / "preprocessor_config.json", SPEECH_PREPROCESSOR_CONFIG)
        _save(speech_dir / "model.safetensors", speech_tokenizer_to_hf(speech), mx.float32)
    return out


def _write_mlx_community(
    staging: Path, config: dict[str, Any], main: dict[str, np.ndarray]
) -> None:
    """config.json, model.safetensors and its index as mlx-audio's converter saves them
    (`mlx_audio.lm.convert.save_config` / `save_model`): MLX names and conv layout, every
    tensor in the config's dtype, keys of config.json sorted, `format: mlx` metadata."""
    dtype = getattr(mx, str(config["torch_dtype"]))
    arrays = {k: mx.array(main[k]).astype(dtype) for k in sorted(main)}
    mx.save_safetensors(str(staging / "model.safetensors"), arrays, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
        "weight_map": {k: "model.safetensors" for k in sorted(arrays)},
    }
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (staging / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def st_config_for_mlx(st_config: dict[str, Any]) -> dict[str, Any]:
    from mlx_audio.tts.models.qwen3_tts.config import Qwen3TTSTokenizerConfig as Cfg
    from mlx_audio.tts.models.qwen3_tts.config import filter_dict_for_dataclass

    return filter_dict_for_dataclass(Cfg, st_config)


def _random_parameters(module: nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded values for every parameter, by the role of the module that owns it."""
    roles = _parameter_roles(module)
    values: dict[str, np.ndarray] = {}
    shapes = {k: tuple(v.shape) for k, v in flat_items(module.parameters())}
    for key in sorted(shapes):
        values[key] = _value_for(key, shapes[key], roles.get(key, "weight"), rng)
    for key in sorted(values):
        if key.endswith("codebook.embedding_sum"):  # Mimi stores sum = embedding * usage
            usage = values[key[: -len("embedding_sum")] + "cluster_usage"]
            values[key] = values[key] * usage[:, None]
    return values


def _parameter_roles(module: nn.Module) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name, sub in module.named_modules():
        kind = type(sub).__name__.lower()
        prefix = f"{name}." if name else ""
        if "norm" in kind and "conv" not in kind:
            roles[f"{prefix}weight"] = "one"
            roles[f"{prefix}bias"] = "zero"
            roles[f"{prefix}running_mean"] = "zero"
            roles[f"{prefix}running_var"] = "one"
        if "layerscale" in kind:
            roles[f"{prefix}scale"] = "layer_scale"
    return roles


def _value_for(key: str, shape: tuple[int, ...], role: str, rng: np.random.Generator) -> np.ndarray:
    leaf = key.rsplit(".", 1)[-1]
    if role == "one":
        return np.ones(shape, np.float32)
    if role == "zero" or leaf == "bias":
        return np.zeros(shape, np.float32)
    if role == "layer_scale" or leaf == "gamma":
        return np.full(shape, 0.1, np.float32)
    if leaf in ("alpha", "beta"):  # snake activations, log-parametrised
        return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if leaf == "cluster_usage":
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if leaf == "initialized":
        return np.ones(shape, np.float32)
    if leaf in ("embedding_sum",) or key.endswith("embed.weight"):
        return rng.normal(0.0, 1.0, shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape).astype(np.float32)


def _save(path: Path, weights: dict[str, np.ndarray], dtype: mx.Dtype) -> None:
    arrays = {k: mx.array(weights[k]).astype(dtype) for k in sorted(weights)}
    mx.save_safetensors(str(path), arrays, metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def describe(preset: str) -> dict[str, Any]:
    return asdict(PRESETS[preset])
