"""MLX parameter names and layouts -> the Hugging Face checkpoint names and PyTorch layouts.

The inverse of mlx-audio's `Model.sanitize` / `Qwen3TTSSpeechTokenizer.sanitize`, so a random
model built from MLX modules can be written exactly as a real Qwen3-TTS checkpoint is laid out.
"""

from __future__ import annotations

import re

import numpy as np

# SEANet encoder: MLX layer path -> HF `encoder.encoder.layers.{N}`.
_SEANET_CONVS = {
    "init_conv1d": 0,
    "layers.0.downsample": 3,
    "layers.1.downsample": 6,
    "layers.2.downsample": 9,
    "layers.3.downsample": 12,
    "final_conv1d": 14,
}
_SEANET_RESIDUAL_LAYERS = {0: 1, 1: 4, 2: 7, 3: 10}
_SEANET_RESIDUAL_BLOCKS = {0: 1, 1: 3}
_ENCODER_TRANSFORMER = {
    "self_attn.out_proj.weight": "self_attn.o_proj.weight",
    "gating.linear1.weight": "mlp.fc1.weight",
    "gating.linear2.weight": "mlp.fc2.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm1.bias": "input_layernorm.bias",
    "norm2.weight": "post_attention_layernorm.weight",
    "norm2.bias": "post_attention_layernorm.bias",
    "layer_scale_1.scale": "self_attn_layer_scale.scale",
    "layer_scale_2.scale": "mlp_layer_scale.scale",
}
_RVQ_NAMES = {
    "rvq_first": "semantic_residual_vector_quantizer",
    "rvq_rest": "acoustic_residual_vector_quantizer",
}


def torch_conv(weight: np.ndarray) -> np.ndarray:
    """MLX conv [out, k, in] -> PyTorch conv [out, in, k]."""
    return np.ascontiguousarray(weight.transpose(0, 2, 1))


def torch_conv_transpose(weight: np.ndarray) -> np.ndarray:
    """MLX transposed conv [out, k, in] -> PyTorch ConvTranspose1d [in, out, k]."""
    return np.ascontiguousarray(weight.transpose(2, 0, 1))


def main_model_to_hf(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`talker.*` and `speaker_encoder.*` keep their names; their convs go to PyTorch layout."""
    out = {}
    for key, value in params.items():
        is_conv = ("conv" in key or "speaker_encoder.fc" in key) and key.endswith("weight")
        out[key] = torch_conv(value) if is_conv and value.ndim == 3 else value
    return out


def speech_tokenizer_to_hf(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Speech tokenizer (decoder + optional encoder) in Hugging Face names and layouts.

    Codebooks are stored the way the real checkpoint stores them: `embedding_sum` and
    `cluster_usage` (embedding = embedding_sum / cluster_usage), which `params` must already
    hold for the encoder; decoder codebooks are expanded from their embedding here with the
    usage found under the matching `*.cluster_usage` key of `params`.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in params.items():
        if key.startswith("decoder."):
            _decoder_to_hf(key, value, params, out)
        elif key.startswith("encoder_model."):
            _encoder_to_hf(key[len("encoder_model.") :], value, out)
    return out


def _decoder_to_hf(
    key: str, value: np.ndarray, params: dict[str, np.ndarray], out: dict[str, np.ndarray]
) -> None:
    if key.endswith(".codebook.cluster_usage"):
        return
    if key.endswith(".codebook.embed.weight"):
        base = key[: -len(".codebook.embed.weight")]
        usage = params[f"{base}.codebook.cluster_usage"]
        out[f"{base}._codebook.cluster_usage"] = usage
        out[f"{base}._codebook.embedding_sum"] = value * usage[:, None]
        return
    is_transpose = ("upsample" in key and ".0.conv.weight" in key) or (
        "decoder.decoder" in key and "block.1.conv.weight" in key
    )
    if value.ndim == 3 and is_transpose:
        out[key] = torch_conv_transpose(value)
    elif value.ndim == 3 and ("conv.weight" in key or "_proj.weight" in key):
        out[key] = torch_conv(value)
    else:
        out[key] = value


def _encoder_to_hf(key: str, value: np.ndarray, out: dict[str, np.ndarray]) -> None:
    conv = value.ndim == 3 and key.endswith("weight")
    if key.startswith("encoder."):
        path, _, suffix = key[len("encoder.") :].partition(".conv.conv.")
        residual = re.fullmatch(r"layers\.(\d+)\.residuals\.0\.block\.(\d+)", path)
        if residual:
            layer = _SEANET_RESIDUAL_LAYERS[int(residual.group(1))]
            block = _SEANET_RESIDUAL_BLOCKS[int(residual.group(2))]
            name = f"encoder.encoder.layers.{layer}.block.{block}.conv.{suffix}"
        else:
            name = f"encoder.encoder.layers.{_SEANET_CONVS[path]}.conv.{suffix}"
        out[name] = torch_conv(value) if conv else value
    elif key.startswith("encoder_transformer.transformer.layers."):
        match = re.fullmatch(r"encoder_transformer\.transformer\.layers\.(\d+)\.(.+)", key)
        assert match is not None
        index, rest = match.group(1), match.group(2)
        prefix = f"encoder.encoder_transformer.layers.{index}"
        if rest == "self_attn.in_proj.weight":
            q, k, v = np.split(value, 3, axis=0)
            out[f"{prefix}.self_attn.q_proj.weight"] = q
            out[f"{prefix}.self_attn.k_proj.weight"] = k
            out[f"{prefix}.self_attn.v_proj.weight"] = v
        else:
            out[f"{prefix}.{_ENCODER_TRANSFORMER[rest]}"] = value
    elif key.startswith("downsample.conv.conv.conv."):
        suffix = key[len("downsample.conv.conv.") :]
        out[f"encoder.downsample.{suffix}"] = torch_conv(value) if conv else value
    elif key.startswith("quantizer."):
        match = re.fullmatch(r"quantizer\.(rvq_first|rvq_rest)\.(.+)", key)
        assert match is not None
        hf_rvq = f"encoder.quantizer.{_RVQ_NAMES[match.group(1)]}"
        rest = match.group(2)
        # transformers' Mimi (which qwen_tts builds the encoder from) has no `vq.` level:
        # `<side>_residual_vector_quantizer.layers.N.codebook.{embed_sum,cluster_usage,
        # initialized}`, as the released checkpoints store them.
        if rest.startswith("vq.layers."):
            rest = rest[len("vq.") :]
        if rest.endswith(".codebook.initialized"):
            out[f"{hf_rvq}.{rest}"] = np.ones((1,), np.float32)
        elif rest.endswith(".codebook.embedding_sum"):
            out[f"{hf_rvq}.{rest[: -len('embedding_sum')]}embed_sum"] = value
        elif rest.endswith(".codebook.cluster_usage"):
            out[f"{hf_rvq}.{rest}"] = value
        else:
            out[f"{hf_rvq}.{rest}"] = torch_conv(value) if conv else value
    else:
        raise KeyError(f"no Hugging Face name known for speech tokenizer key encoder_model.{key}")
