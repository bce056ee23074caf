"""PyTorch (NVIDIA / Kyutai) tensor names and shapes of a PersonaPlex checkpoint.

The real files hold PyTorch names: mlx-audio's `Lm.load_pytorch_weights` and
`Mimi.load_pytorch_weights` rename them on load. These functions give the inverse: the exact
PyTorch key set (with shapes) that an mlx-audio module tree reads, used both to write tiny
checkpoints and to check a directory before loading it (every problem at once).
"""

from __future__ import annotations

import re
from typing import Any

from finetune.arrays import flat_items

import numpy as np

Shape = tuple[int, ...]

_ENCODER_RESIDUAL = (1, 4, 7, 10)
_ENCODER_DOWNSAMPLE = (3, 6, 9, 12)
_DECODER_UPSAMPLE = (2, 5, 8, 11)
_DECODER_RESIDUAL = (3, 6, 9, 12)
_SEANET_LAST = 14


# ---------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------
def lm_pytorch_shapes(lm: Any) -> dict[str, Shape]:
    """PyTorch key -> shape for every tensor `Lm.load_pytorch_weights` reads from `lm`'s config.

    The depformer stores one norm per layer for all slices, and its per-slice attention
    projections stacked along the output axis (`depformer_weights_per_step`).
    """
    cfg = lm.cfg
    if cfg.depformer.weights_per_step_schedule is not None:
        raise ValueError("depformer weights_per_step_schedule is not used by PersonaPlex")
    slices = cfg.depformer.num_slices
    shapes: dict[str, Shape] = {}
    for name, value in flat_items(lm.parameters()):
        shape = tuple(value.shape)
        if name.startswith("depformer."):
            _depformer_key(name, shape, slices, shapes)
        elif name == "out_norm.weight":
            shapes["out_norm.alpha"] = (1, 1, shape[0])
        elif name.startswith("audio_embs."):
            shapes["emb." + name[len("audio_embs.") :]] = shape
        elif name.startswith("transformer."):
            if name.endswith((".norm1.weight", ".norm2.weight")):
                shapes[name[: -len("weight")] + "alpha"] = (1, 1, shape[0])
            else:
                shapes[name.replace(".in_proj.weight", ".in_proj_weight")] = shape
        else:  # text_emb.weight, text_linear.weight (and any conditioner / extra head)
            shapes[name] = shape
    return shapes


def _depformer_key(name: str, shape: Shape, slices: int, shapes: dict[str, Shape]) -> None:
    m = re.fullmatch(r"depformer\.slices\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"unexpected depformer parameter {name}")
    idx, rest = int(m.group(1)), m.group(2)
    if rest == "linear_in.weight":
        shapes[f"depformer_in.{idx}.weight"] = shape
    elif rest == "linear_out.weight":
        shapes[f"linears.{idx}.weight"] = shape
    elif rest.startswith("emb."):
        base = "depformer_text_emb" if idx == 0 else f"depformer_emb.{idx - 1}"
        shapes[base + rest[len("emb") :]] = shape
    else:
        layer = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)", rest)
        if layer is None:
            raise ValueError(f"unexpected depformer parameter {name}")
        prefix, leaf = f"depformer.layers.{layer.group(1)}", layer.group(2)
        if leaf in ("norm1.weight", "norm2.weight"):
            shapes[f"{prefix}.{leaf[:5]}.alpha"] = (1, 1, shape[0])
        elif leaf.startswith("gating."):
            shapes[f"{prefix}.gating.{idx}.{leaf[len('gating.') :]}"] = shape
        elif leaf == "self_attn.in_proj.weight":
            shapes[f"{prefix}.self_attn.in_proj_weight"] = (slices * shape[0], shape[1])
        elif leaf == "self_attn.out_proj.weight":
            shapes[f"{prefix}.self_attn.out_proj.weight"] = (slices * shape[0], shape[1])
        else:
            raise ValueError(f"unexpected depformer parameter {name}")


# ---------------------------------------------------------------------------------------------
# Mimi
# ---------------------------------------------------------------------------------------------
def mimi_pytorch_name(name: str) -> str:
    """The PyTorch key that mlx-audio's Mimi loader renames to the MLX parameter `name`."""
    out = name
    for side in ("encoder", "decoder"):
        out = re.sub(rf"^{side}\.init_conv1d\.", f"{side}.model.0.", out)
        out = re.sub(rf"^{side}\.final_conv1d\.", f"{side}.model.{_SEANET_LAST}.", out)
    out = re.sub(
        r"^encoder\.layers\.(\d)\.residuals\.0\.",
        lambda m: f"encoder.model.{_ENCODER_RESIDUAL[int(m.group(1))]}.",
        out,
    )
    out = re.sub(
        r"^encoder\.layers\.(\d)\.downsample\.",
        lambda m: f"encoder.model.{_ENCODER_DOWNSAMPLE[int(m.group(1))]}.",
        out,
    )
    out = re.sub(
        r"^decoder\.layers\.(\d)\.upsample\.",
        lambda m: f"decoder.model.{_DECODER_UPSAMPLE[int(m.group(1))]}.",
        out,
    )
    out = re.sub(
        r"^decoder\.layers\.(\d)\.residuals\.0\.",
        lambda m: f"decoder.model.{_DECODER_RESIDUAL[int(m.group(1))]}.",
        out,
    )
    out = re.sub(r"\.block\.(\d)\.", lambda m: f".block.{2 * int(m.group(1)) + 1}.", out)
    out = out.replace(".self_attn.in_proj.weight", ".self_attn.in_proj_weight")
    out = re.sub(r"\.gating\.(linear[12])\.", r".\1.", out)
    out = out.replace(".codebook.initialized", "._codebook._initialized")
    out = out.replace(".codebook.", "._codebook.")
    return out


def _mimi_layout(name: str, shape: Shape) -> tuple[Shape, tuple[int, ...] | None]:
    """PyTorch shape of an MLX Mimi tensor, and the axes permutation MLX -> PyTorch."""
    if name.endswith((".conv.weight", ".output_proj.weight", ".input_proj.weight")):
        return (shape[0], shape[2], shape[1]), (0, 2, 1)  # (out, k, in) -> (out, in, k)
    if name.endswith(".convtr.weight"):
        if shape[2] == 1:  # depthwise (C, k, 1) -> (C, 1, k)
            return (shape[0], shape[2], shape[1]), (0, 2, 1)
        return (shape[2], shape[0], shape[1]), (2, 0, 1)  # (out, k, in) -> (in, out, k)
    return shape, None


def mimi_pytorch_shapes(mimi: Any) -> dict[str, Shape]:
    return {
        mimi_pytorch_name(k): _mimi_layout(k, tuple(v.shape))[0]
        for k, v in flat_items(mimi.parameters())
    }


def mimi_to_pytorch(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        _, perm = _mimi_layout(name, tuple(value.shape))
        out[mimi_pytorch_name(name)] = value if perm is None else np.transpose(value, perm)
    return out
