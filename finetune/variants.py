"""Quantised variants of a checkpoint: the names users pick, and the one way each is made.

A variant is what `make-tiny ... --quantize NAME` and `voicefoundry quantize` produce:

    8, 4        affine 8 / 4-bit, group size 64 (mlx-community's "-8bit" / "-4bit")
    mixed_4_6   mlx-lm's mixed recipe: 4-bit, with v_proj / down_proj of the first and last
                eighths of the layers and every third one between at 6 bits (lm_head 6)
    mxfp4       4-bit microscaling floats, group size 32

Families make them in one of two ways, both here:

- `run_converter`: mlx-audio's own converter (`mlx_audio.convert`, the tool that writes
  mlx-community's checkpoints) as a subprocess, offline, into a staging folder that replaces the
  destination only once the result was checked. The subprocess is `python -m finetune.converter`,
  which enters a family's context manager (e.g. local stand-ins for assets mlx-audio would
  fetch from the hub) and then runs the converter's own `main()` unchanged.
- `quantize_module`: MLX's `nn.quantize` with the converter's predicate semantics (a layer is
  quantised when it can be, its input width divides the group size and the family's predicate
  allows it; `mixed_4_6` picks per-layer bits as mlx-lm's recipe does), for a family the
  converter cannot convert. It returns the config's `quantization` object in the converter's
  form, so loaders and `finetune.identity` read both alike.

`checkpoint_quantization` reads a directory's quantisation back (for `doctor`, identities).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.fsutil import atomic_directory
from finetune.identity import quantization as checkpoint_quantization
from finetune.loading import CheckpointError, tail

CONVERT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Variant:
    name: str
    bits: int
    group_size: int
    mode: str = "affine"
    recipe: str | None = None  # the converter's --quant-predicate

    def converter_args(self) -> list[str]:
        args = ["-q", "--q-bits", str(self.bits), "--q-group-size", str(self.group_size)]
        if self.mode != "affine":
            args += ["--q-mode", self.mode]
        if self.recipe is not None:
            args += ["--quant-predicate", self.recipe]
        return args

    def config_quantization(self) -> dict[str, Any]:
        """The top-level `quantization` object the converter writes for this variant."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


VARIANTS: dict[str, Variant] = {
    "8": Variant("8", bits=8, group_size=64),
    "4": Variant("4", bits=4, group_size=64),
    "mixed_4_6": Variant("mixed_4_6", bits=4, group_size=64, recipe="mixed_4_6"),
    "mxfp4": Variant("mxfp4", bits=4, group_size=32, mode="mxfp4"),
}
MIXED_BITS = {"mixed_4_6": (4, 6)}


class UnknownVariant(ValueError):
    pass


def get_variant(name: str | int) -> Variant:
    try:
        return VARIANTS[str(name)]
    except KeyError:
        raise UnknownVariant(
            f"unknown quantised variant {name!r}; known: {', '.join(VARIANTS)}"
        ) from None


def describe(quant: dict[str, Any] | None) -> str:
    """One phrase for a config's quantization object (None: full precision)."""
    if not quant:
        return "full precision"
    mixed = sorted({v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v})
    bits = f"{quant.get('bits')}-bit" if not mixed else "/".join(map(str, mixed)) + "-bit mixed"
    return f"{bits} {quant.get('mode', 'affine')}, group size {quant.get('group_size')}"


# --------------------------------------------------------------------------- the converter


def run_converter(
    src: Path | str,
    dst: Path | str,
    variant: Variant,
    *,
    domain: str,
    context: str | None = None,
    check: Callable[[Path, Variant], list[str]] | None = None,
) -> Path:
    """`mlx_audio.convert` over the local checkpoint `src` into `dst`, offline.

    `context` is "module:function" of a context manager taking the source path, entered in the
    converter's process around its `main()`. `domain` is passed as `--model-domain`: without
    it the converter imports every model module of every domain to guess, and one of them
    (`tts.models.llama`) fetches a codec from the hub at import time. `check` lists what is
    wrong with the staging folder (all at once); `dst` is replaced only when it finds nothing.
    """
    src, dst = Path(src).resolve(), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(src, ["not a local checkpoint directory (no config.json)"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with atomic_directory(dst) as staging:
        command = [sys.executable, "-m", "finetune.converter"]
        if context is not None:
            command += ["--context", context]
        command += [
            "--hf-path",
            str(src),
            "--mlx-path",
            str(staging),
            "--model-domain",
            domain,
            *variant.converter_args(),
        ]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S
        )
        if done.returncode != 0:
            raise CheckpointError(
                src, [f"mlx_audio.convert failed ({done.returncode}): {tail(done.stderr)}"]
            )
        problems = converted_problems(staging, variant)
        if check is not None:
            problems += check(staging, variant)
        if problems:
            raise CheckpointError(dst, problems)
    return dst


def converted_problems(path: Path, variant: Variant) -> list[str]:
    """What every quantised variant must have: the config's quantization as asked, and packed
    weights with scales (the family's check adds which layers)."""
    from finetune.arrays import load_arrays

    import mlx.core as mx

    problems: list[str] = []
    try:
        quant = checkpoint_quantization(path)
    except (OSError, ValueError) as exc:
        return [f"config.json unreadable: {exc}"]
    want = variant.config_quantization()
    if quant is None:
        problems.append("config.json has no 'quantization' object")
    else:
        got = {k: quant.get(k, "affine" if k == "mode" else None) for k in want}
        if got != want:
            problems.append(f"config.json quantization is {got}, asked for {want}")
        if variant.recipe is not None:
            low, high = MIXED_BITS[variant.recipe]
            per_layer = {int(v["bits"]) for v in quant.values() if isinstance(v, dict)}
            if not {low, high} <= per_layer:
                problems.append(f"{variant.name}: per-layer bits are {sorted(per_layer)}")
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        return [*problems, "no model*.safetensors written"]
    weights: dict[str, Any] = {}
    for file in files:
        weights.update(load_arrays(file))
    layers = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    if not layers:
        problems.append("no quantised layer (no '.scales' tensor) in the weights")
    unpacked = [p for p in layers if weights.get(f"{p}.weight", mx.array(0.0)).dtype != mx.uint32]
    if unpacked:
        problems.append(
            f"{len(unpacked)} layers have scales but no packed uint32 weight: {unpacked[:3]}"
        )
    return problems


def quantised_layers(path: Path) -> list[str]:
    """The module paths that hold quantised weights in a checkpoint's model*.safetensors."""
    from finetune.arrays import load_arrays

    layers: list[str] = []
    for file in sorted(path.glob("model*.safetensors")):
        layers += [k[: -len(".scales")] for k in load_arrays(file) if k.endswith(".scales")]
    return layers


# --------------------------------------------------------------------------- nn.quantize


def quantize_module(
    model: Any,
    variant: Variant,
    *,
    allow: Callable[[str, Any], bool],
    layer_index: Callable[[str], int | None] | None = None,
    num_layers: int = 0,
) -> dict[str, Any]:
    """Quantise `model` in place as the converter would; returns config.json's `quantization`.

    `allow(path, module)` is the family's `model_quant_predicate`. For a mixed recipe,
    `layer_index(path)` gives the depth of a module (None: not in a numbered layer) out of
    `num_layers`, the layers whose depth picks high or low bits as mlx-lm's recipe does.
    """
    import mlx.nn as nn

    quant: dict[str, Any] = variant.config_quantization()
    mixed = MIXED_BITS.get(variant.recipe or "")
    if mixed is not None and (layer_index is None or num_layers < 1):
        raise ValueError(f"{variant.name} needs the family's layer numbering")

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            return False
        width = module.weight.shape[-1]
        # The converter's own test (`build_quant_predicate`) also wants widths of 64s.
        if width % variant.group_size or width % 64 or not allow(path, module):
            return False
        if mixed is None:
            return True
        assert layer_index is not None
        index = layer_index(path) or 0
        high = (
            index < num_layers // 8
            or index >= 7 * num_layers // 8
            or (index - num_layers // 8) % 3 == 2
        )
        wide = re.search(r"(v_proj|v_a_proj|v_b_proj|down_proj)", path) is not None
        bits = mixed[1] if (wide and high) or "lm_head" in path else mixed[0]
        quant[path] = {"group_size": variant.group_size, "bits": bits, "mode": "affine"}
        return quant[path]

    nn.quantize(
        model, variant.group_size, variant.bits, mode=variant.mode, class_predicate=predicate
    )
    return quant


def quantize_loaded(
    model: Any,
    quant: dict[str, Any],
    allow: Callable[[str, Any], bool],
    scaled: set[str] | None = None,
) -> None:
    """Give a freshly built module tree the quantised layers `quant` (config.json's object)
    describes, before its weights are loaded, as mlx-audio's `apply_quantization` does: a
    layer named in `quant` takes its own settings, any other is quantised when the weights hold
    its scales (`scaled`: those layers' paths; None: every layer that can be)."""
    import mlx.nn as nn

    group_size = int(quant.get("group_size", 64))

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            return False
        if module.weight.shape[-1] % group_size or not allow(path, module):
            return False
        value = quant.get(path)
        if isinstance(value, dict):
            return value
        return scaled is None or path in scaled

    nn.quantize(
        model,
        group_size=group_size,
        bits=int(quant["bits"]),
        mode=str(quant.get("mode", "affine")),
        class_predicate=predicate,
    )


__all__ = [
    "VARIANTS",
    "UnknownVariant",
    "Variant",
    "checkpoint_quantization",
    "converted_problems",
    "describe",
    "get_variant",
    "quantised_layers",
    "quantize_loaded",
    "quantize_module",
    "run_converter",
]
