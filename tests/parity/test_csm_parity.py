"""Sesame CSM against transformers' `CsmForConditionalGeneration` (4.57.3, PyTorch CPU, fp32).

What loads where. `make-tiny csm` writes the mlx-community layout (`model.backbone.*`,
`model.decoder.*`, `model.text_embeddings`, `model.codebook0_head`, `model.audio_head`, a Kyutai
Mimi file under `mimi/`), which is what mlx-audio reads. transformers does NOT load it: its
checkpoint names are `backbone_model.*`, `depth_decoder.model.*`, `embed_text_tokens`, `lm_head`,
`depth_decoder.codebooks_head` and the codec inside the same file as `codec_model.*` (HF Mimi
names), and its config needs a `codec_config` (without one it builds the real Mimi). Given our
directory, `from_pretrained` reports every tensor missing and every one of ours unexpected
(first test). mlx-audio 0.6.2 cannot read transformers' layout either (its sesame `sanitize` maps
only Sesame's original names), so neither side serves the other's files: the comparison below runs
on a converted copy (`_to_transformers`: renames, Mimi's fused attention projection split in
three, the q / k rows reordered from interleaved to half-split RoPE as transformers' own
conversion does; no value changed), which transformers loads with no missing or unexpected key.

Tolerances: the same fp32 weights on both sides; MLX and PyTorch differ only in summation order
and kernels. Backbone and depth-decoder logits (magnitude up to ~6) measured within 5e-6
absolute; we require 5e-5 absolute plus 1e-5 of the largest logit, ten times that, while a
mis-wired tensor moves logits by 0.1 or more.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CsmForConditionalGeneration

ROOT = Path(__file__).resolve().parents[2]
OURS_SCRIPT = Path(__file__).with_name("csm_ours.py")
MIMI_FILE = "mimi/tokenizer-e351c8d8-checkpoint125.safetensors"
LOGIT_ATOL, LOGIT_RTOL = 5e-5, 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, our_python: Path) -> Path:
    out = tmp_path_factory.mktemp("csm") / "tiny"
    subprocess.run(
        [str(our_python), "-m", "finetune", "make-tiny", "csm", str(out), "--seed", "0"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def ours(checkpoint: Path, our_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("csm-ours") / "ours.npz"
    result = subprocess.run(
        [str(our_python), str(OURS_SCRIPT), str(checkpoint), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    converted = _to_transformers(checkpoint, tmp_path_factory.mktemp("csm-hf"))
    model, info = CsmForConditionalGeneration.from_pretrained(
        converted, dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert info["mismatched_keys"] == [] and info["error_msgs"] == [], info
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert on_meta == []
    return model.eval()


def test_transformers_does_not_load_the_mlx_community_layout(checkpoint: Path) -> None:
    _, info = CsmForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, output_loading_info=True
    )
    ours = set(load_file(str(checkpoint / "model.safetensors")))
    assert set(info["unexpected_keys"]) == {k.removeprefix("model.") for k in ours}
    missing = set(info["missing_keys"])
    assert {"lm_head.weight", "embed_text_tokens.weight", "backbone_model.norm.weight"} <= missing
    assert any(k.startswith("codec_model.") for k in missing)


def test_backbone_and_depth_decoder_logits_equal(hf_model: Any, ours: dict) -> None:
    """The prompt (a context clip's text and audio frames, then `[0]Hello there.`), then each
    generated frame fed back as an audio row: transformers' codebook-0 logits at each frame's last
    row, and its depth decoder's logits for codebooks 1..N-1 given the same picks."""
    tokens, mask = ours["prompt_tokens"], ours["prompt_mask"]
    codes, logits = ours["codes"], ours["logits"]  # [F, N], [F, N, V]
    n = codes.shape[1]
    rows = [tokens[i] for i in range(len(tokens))] + [
        np.append(codes[f], 0) for f in range(len(codes) - 1)
    ]
    is_text = list(mask[:, -1]) + [False] * (len(codes) - 1)
    assert any(is_text) and not all(is_text)
    with torch.no_grad():
        embeds = torch.cat(
            [
                hf_model.embed_text_tokens(torch.tensor([[int(row[-1])]]))
                if text
                else hf_model.backbone_model.embed_tokens(torch.tensor(row[None, None, :n]))
                for row, text in zip(rows, is_text, strict=True)
            ],
            dim=1,
        )
        hidden = hf_model.backbone_model(inputs_embeds=embeds).last_hidden_state[0]
        c0 = hf_model.lm_head(hidden).numpy()
        diffs = []
        for f in range(len(codes)):
            last = len(tokens) - 1 + f  # the row whose hidden state predicts frame f
            diffs.append(_close(c0[last], logits[f, 0], f"frame {f} backbone logits"))
            ids = torch.tensor([[0, *codes[f, : n - 1]]])
            depth = hf_model.depth_decoder(
                input_ids=ids, backbone_last_hidden_state=hidden[last][None]
            ).logits[0]
            diffs.append(_close(depth.numpy(), logits[f, 1:], f"frame {f} depth decoder logits"))
    print(f"CSM: max abs diffs {', '.join(f'{d:.2e}' for d in diffs)}")


def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    diff = float(np.max(np.abs(ours - theirs)))
    bound = LOGIT_ATOL + LOGIT_RTOL * float(np.max(np.abs(theirs)))
    assert diff <= bound, f"{what}: max |transformers - ours| = {diff:.3g} > {bound:.3g}"
    return diff


# ---------------------------------------------------------------------------------------------
# mlx-community layout -> transformers' layout (names, Mimi's fused qkv split, RoPE row order)
# ---------------------------------------------------------------------------------------------
_LM_NAMES = (
    (r"^model\.backbone\.", "backbone_model."),
    (r"^model\.decoder\.", "depth_decoder.model."),
    (r"^model\.text_embeddings\.weight$", "embed_text_tokens.weight"),
    (r"^model\.audio_embeddings\.weight$", "backbone_model.embed_tokens.embed_audio_tokens.weight"),
    (r"^model\.projection\.weight$", "depth_decoder.model.inputs_embeds_projector.weight"),
    (r"^model\.codebook0_head\.weight$", "lm_head.weight"),
    (r"^model\.audio_head$", "depth_decoder.codebooks_head.weight"),
)
_MIMI_NAMES = (
    (r"^(en|de)coder\.model\.(\d+)\.(conv\.conv|convtr\.convtr)\.", r"\1coder.layers.\2.conv."),
    (
        r"^(en|de)coder\.model\.(\d+)\.block\.(\d+)\.conv\.conv\.",
        r"\1coder.layers.\2.block.\3.conv.",
    ),
    (r"^downsample\.conv\.conv\.conv\.", "downsample.conv."),
    (r"^upsample\.convtr\.convtr\.convtr\.", "upsample.conv."),
    (r"^(en|de)coder_transformer\.transformer\.", r"\1coder_transformer."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.linear([12])\.", r".mlp.fc\1."),
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.layer_scale_1\.", ".self_attn_layer_scale."),
    (r"\.layer_scale_2\.", ".mlp_layer_scale."),
    (r"^quantizer\.rvq_first\.", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_rest\.", "quantizer.acoustic_residual_vector_quantizer."),
    (r"\.vq\.layers\.(\d+)\._codebook\.embedding_sum$", r".layers.\1.codebook.embed_sum"),
    (r"\.vq\.layers\.(\d+)\._codebook\.cluster_usage$", r".layers.\1.codebook.cluster_usage"),
    (r"\.vq\.layers\.(\d+)\._codebook\._initialized$", r".layers.\1.codebook.initialized"),
)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _to_transformers(src: Path, dst: Path) -> Path:
    config = json.loads((src / "config.json").read_text())
    weights = {
        _rename(k, _LM_NAMES): v for k, v in load_file(str(src / "model.safetensors")).items()
    }
    _unpair_rope(weights, "backbone_model", config)
    _unpair_rope(weights, "depth_decoder.model", config["depth_decoder_config"])
    # Tied in transformers (tie_codebooks_embeddings), but its loader ties the backbone's table TO
    # the depth decoder's: a file holding only the backbone's leaves both unloaded (on the meta
    # device) and reports nothing missing. So both names are written.
    audio = weights["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    weights["depth_decoder.model.embed_tokens.weight"] = audio.copy()
    for key, value in load_file(str(src / MIMI_FILE)).items():
        if key.endswith(".self_attn.in_proj_weight"):
            base = "codec_model." + _rename(key[: -len("in_proj_weight")], _MIMI_NAMES)
            for name, part in zip(("q", "k", "v"), np.split(value, 3), strict=True):
                weights[f"{base}{name}_proj.weight"] = part
        else:
            weights["codec_model." + _rename(key, _MIMI_NAMES)] = value
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()}, str(dst / "model.safetensors")
    )
    config["codec_config"] = _codec_config(json.loads((src / "mimi" / "config.json").read_text()))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _unpair_rope(weights: dict[str, np.ndarray], prefix: str, config: dict[str, Any]) -> None:
    """Sesame's (and mlx-audio's) attention rotates interleaved pairs (dims 2i, 2i + 1);
    transformers' rotates halves (i, i + head_dim / 2). Its conversion script reorders the q / k
    projection rows to match (the same `permute` as for Llama checkpoints); so does this."""
    head_dim = config["head_dim"]
    for name, heads in (
        ("q_proj", config["num_attention_heads"]),
        ("k_proj", config["num_key_value_heads"]),
    ):
        for layer in range(config["num_hidden_layers"]):
            key = f"{prefix}.layers.{layer}.self_attn.{name}.weight"
            w = weights[key]
            w = w.reshape(heads, head_dim // 2, 2, w.shape[1]).transpose(0, 2, 1, 3)
            weights[key] = w.reshape(heads * head_dim, -1)


def _codec_config(mimi: dict[str, Any]) -> dict[str, Any]:
    """transformers' MimiConfig for our Mimi's sizes (mlx-audio's MimiConfig as JSON)."""
    seanet, t = mimi["seanet"], mimi["transformer"]
    return {
        "model_type": "mimi",
        "sampling_rate": mimi["sample_rate"],
        "frame_rate": mimi["frame_rate"],
        "audio_channels": mimi["channels"],
        "hidden_size": seanet["dimension"],
        "num_filters": seanet["nfilters"],
        "num_residual_layers": seanet["nresidual_layers"],
        "upsampling_ratios": seanet["ratios"],
        "kernel_size": seanet["ksize"],
        "last_kernel_size": seanet["last_ksize"],
        "residual_kernel_size": seanet["residual_ksize"],
        "dilation_growth_rate": seanet["dilation_base"],
        "use_causal_conv": seanet["causal"],
        "pad_mode": seanet["pad_mode"],
        "compress": seanet["compress"],
        "codebook_size": mimi["quantizer_bins"],
        "codebook_dim": mimi["quantizer_dim"],
        "vector_quantization_hidden_dimension": mimi["quantizer_dim"],
        "num_quantizers": mimi["quantizer_nq"],
        "num_semantic_quantizers": 1,
        "upsample_groups": seanet["dimension"],
        "num_hidden_layers": t["num_layers"],
        "intermediate_size": t["dim_feedforward"],
        "num_attention_heads": t["num_heads"],
        "num_key_value_heads": t["num_heads"],
        "head_dim": t["d_model"] // t["num_heads"],
        "sliding_window": t["context"],
        "rope_theta": float(t["max_period"]),
        "layer_scale_initial_scale": t["layer_scale"],
    }
