"""LoRA and QLoRA layers for MLX models: apply, save / load adapters, fuse, remove.

An adapter directory holds `adapters.safetensors` (the LoRA tensors, plus any fully-trained
tensors listed in the config's `trained_tensors`) and `adapter_config.json`
(`{"lora": LoRAConfig.to_dict(), **metadata}`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from finetune.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, weight_problems
from finetune.arrays import load_arrays
from finetune.fsutil import atomic_directory

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

_LORA_NAMES = ("lora_a", "lora_b")


class LoRAError(ValueError):
    """LoRA cannot be applied as configured."""


class _LoRABranch(nn.Module):
    """The trainable low-rank branch shared by LoRALinear and QLoRALinear."""

    def __init__(
        self, input_dims: int, output_dims: int, rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
        self.dropout = nn.Dropout(p=dropout)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    def __call__(self, x: mx.array) -> mx.array:
        # `linear` is the frozen base layer every subclass sets.
        return self.linear(x) + self._lora(x)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    def _lora(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return (self.scale * z).astype(x.dtype)

    def _delta(self) -> mx.array:
        """The fused update in nn.Linear's [out, in] layout, fp32."""
        a = self.lora_a.astype(mx.float32)
        b = self.lora_b.astype(mx.float32)
        return self.scale * (a @ b).T


class LoRALinear(_LoRABranch):
    def __init__(
        self, linear: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0
    ) -> None:
        output_dims, input_dims = linear.weight.shape
        super().__init__(input_dims, output_dims, rank, alpha, dropout)
        linear.freeze()
        self.linear = linear

    def fuse(self) -> nn.Linear:
        weight = self.linear.weight
        output_dims, input_dims = weight.shape
        has_bias = "bias" in self.linear
        fused = nn.Linear(input_dims, output_dims, bias=has_bias)
        fused.weight = (weight.astype(mx.float32) + self._delta()).astype(weight.dtype)
        if has_bias:
            fused.bias = self.linear.bias
        return fused


class QLoRALinear(_LoRABranch):
    """LoRA over a frozen quantized layer; the low-rank branch stays in full precision."""

    def __init__(
        self,
        linear: nn.QuantizedLinear,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
    ) -> None:
        input_dims, output_dims = linear_dims(linear)
        super().__init__(input_dims, output_dims, rank, alpha, dropout)
        linear.freeze()
        self.linear = linear

    def fuse(self, *, requantize: bool = False) -> nn.Linear | nn.QuantizedLinear:
        """The dequantized base weight plus the update: a full-precision (fp32) nn.Linear, or
        with `requantize` a QuantizedLinear with the base's bits, group size, mode and scale
        dtype (the fused weight then carries a fresh quantisation error)."""
        fused = self._fuse_fp32()
        if not requantize:
            return fused
        q = self.linear
        out = nn.QuantizedLinear.from_linear(fused, q.group_size, q.bits, q.mode)
        out.scales = out.scales.astype(q.scales.dtype)
        if q.biases is not None and out.biases is not None:
            out.biases = out.biases.astype(q.biases.dtype)
        if "bias" in q:
            out.bias = q.bias
        return out

    def _fuse_fp32(self) -> nn.Linear:
        q = self.linear
        weight = mx.dequantize(
            q.weight,
            q.scales,
            q.get("biases"),
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
            dtype=mx.float32,
        )
        output_dims, input_dims = weight.shape
        has_bias = "bias" in q
        fused = nn.Linear(input_dims, output_dims, bias=has_bias)
        fused.weight = weight + self._delta()
        if has_bias:
            fused.bias = q.bias.astype(mx.float32)
        return fused


_LORA_TYPES = (LoRALinear, QLoRALinear)


def linear_dims(layer: nn.Linear | nn.QuantizedLinear) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or a QuantizedLinear (whose weight is packed into
    uint32 words of 32 // bits values each)."""
    output_dims, stored = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return stored * 32 // layer.bits, output_dims
    return stored, output_dims


@dataclass(kw_only=True)
class LoRAConfig:
    """Which Linear layers get LoRA, and its hyper-parameters.

    `targets` are regular expressions matched with `re.fullmatch` against module paths relative
    to `scope` (a path prefix such as "talker"; "" is the whole model).
    """

    targets: list[str]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scope: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            problems.append(f"alpha must be a number, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.scope, str) or self.scope.strip(".") != self.scope:
            problems.append(f"scope must be a dotted module path or '', got {self.scope!r}")
        compiled: list[re.Pattern[str]] = []
        if isinstance(self.targets, str) or not isinstance(self.targets, list | tuple):
            problems.append(f"targets must be a list of patterns, got {self.targets!r}")
        elif not self.targets:
            problems.append("targets is empty")
        else:
            for pattern in self.targets:
                try:
                    compiled.append(re.compile(pattern))
                except (re.error, TypeError) as exc:
                    problems.append(f"target {pattern!r} is not a regular expression ({exc})")
        if problems:
            raise LoRAError("invalid LoRA config: " + "; ".join(problems))
        self.targets = list(self.targets)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self._patterns = compiled

    def matches(self, relative_path: str) -> bool:
        return any(p.fullmatch(relative_path) for p in self._patterns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "scope": self.scope,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise LoRAError(f"unknown LoRA config keys: {', '.join(unknown)}")
        if "targets" not in data:
            raise LoRAError("LoRA config has no 'targets'")
        return cls(**data)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear | QLoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, _LORA_TYPES)]


def _replace_modules(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> None:
    if replacements:
        model.update_modules(tree_unflatten(replacements))


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap every matching Linear under `config.scope`; returns their paths."""
    if _lora_layers(model):
        raise LoRAError("the model already has LoRA layers; remove_lora() or fuse_lora() first")
    prefix = f"{config.scope}." if config.scope else ""
    modules = model.named_modules()
    if config.scope and not any(path == config.scope for path, _ in modules):
        raise LoRAError(f"scope {config.scope!r} names no module of the model")

    replacements: list[tuple[str, nn.Module]] = []
    not_linear: list[str] = []
    for path, module in modules:
        if not path.startswith(prefix) or path == config.scope:
            continue
        if not config.matches(path[len(prefix) :]):
            continue
        if isinstance(module, nn.QuantizedLinear):
            layer: nn.Module = QLoRALinear(
                module, rank=config.rank, alpha=config.alpha, dropout=config.dropout
            )
        elif isinstance(module, nn.Linear):
            layer = LoRALinear(module, rank=config.rank, alpha=config.alpha, dropout=config.dropout)
        else:
            not_linear.append(f"{path} ({type(module).__name__})")
            continue
        replacements.append((path, layer))

    if not_linear:
        raise LoRAError(
            f"{len(not_linear)} matched module(s) are not Linear layers: " + ", ".join(not_linear)
        )
    if not replacements:
        where = f" under scope {config.scope!r}" if config.scope else ""
        raise LoRAError(f"no Linear layer{where} matches any of the targets {config.targets}")

    model.freeze()
    _replace_modules(model, replacements)
    return sorted(path for path, _ in replacements)


def trainable_parameters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    return {
        f"{path}.{name}": getattr(layer, name)
        for path, layer in _lora_layers(model)
        for name in _LORA_NAMES
    }


def save_adapters(
    out_dir: Path | str, model: nn.Module, config: LoRAConfig, metadata: dict[str, Any]
) -> Path:
    """Write the adapter directory atomically: built beside `out_dir`, then renamed into place."""
    out_dir = Path(out_dir)
    if "lora" in metadata:
        raise LoRAError("metadata must not hold a 'lora' key (it is written from the config)")
    tensors = lora_state(model)
    if not tensors:
        raise LoRAError("the model has no LoRA layers to save")
    trained = list(metadata.get("trained_tensors", []))
    if trained:
        params = dict(tree_flatten(model.parameters()))
        absent = [name for name in trained if name not in params]
        if absent:
            raise LoRAError(f"trained_tensors not in the model: {', '.join(absent)}")
        tensors.update({name: params[name] for name in trained})
    document = json.dumps({"lora": config.to_dict(), **metadata}, indent=2, sort_keys=True)

    mx.eval(tensors)
    with atomic_directory(out_dir) as staging:
        mx.save_safetensors(str(staging / ADAPTER_WEIGHTS), tensors, metadata={"format": "mlx"})
        (staging / ADAPTER_CONFIG).write_text(document + "\n")
    return out_dir


def read_adapter_config(adapter_dir: Path | str) -> dict[str, Any]:
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(adapter_dir, [f"{ADAPTER_CONFIG}: file is missing"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(adapter_dir, [f"{ADAPTER_CONFIG}: not valid JSON ({exc})"]) from exc
    if not isinstance(config, dict):
        raise AdapterError(adapter_dir, [f"{ADAPTER_CONFIG}: does not hold an object"])
    problems: list[str] = []
    if not isinstance(config.get("lora"), dict):
        problems.append(f"{ADAPTER_CONFIG}: has no 'lora' object")
    else:
        try:
            LoRAConfig.from_dict(config["lora"])
        except (LoRAError, TypeError) as exc:
            problems.append(f"{ADAPTER_CONFIG}: {exc}")
    trained = config.get("trained_tensors", [])
    if not isinstance(trained, list) or not all(isinstance(t, str) for t in trained):
        problems.append(f"{ADAPTER_CONFIG}: 'trained_tensors' must be a list of parameter paths")
    if problems:
        raise AdapterError(adapter_dir, problems)
    return config


def _read_weights(adapter_dir: Path) -> dict[str, mx.array]:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(adapter_dir, [f"{ADAPTER_WEIGHTS}: file is missing"])
    try:
        weights = load_arrays(path)
        mx.eval(weights)
    except Exception as exc:  # mlx raises RuntimeError / ValueError for damaged files
        raise AdapterError(adapter_dir, [f"{ADAPTER_WEIGHTS}: cannot be read ({exc})"]) from exc
    return weights


def _summarise(kind: str, items: list[str]) -> str:
    return f"{len(items)} {kind}: " + ", ".join(items)


def _weight_problems(
    model: nn.Module,
    weights: dict[str, mx.array],
    trained: list[str],
    ignore: Collection[str] = (),
) -> tuple[list[str], dict[str, mx.array]]:
    """Every mismatch between the file and the model; the tensors to load, cast to the model."""
    weights = {k: v for k, v in weights.items() if k not in ignore}
    trained = [name for name in trained if name not in ignore]
    expected = lora_state(model)
    params = dict(tree_flatten(model.parameters()))
    problems: list[str] = []
    not_in_model = [name for name in trained if name not in params]
    if not_in_model:
        problems.append(_summarise("trained_tensors not in the model", not_in_model))
    expected.update({name: params[name] for name in trained if name in params})

    unknown = sorted(name for name in weights if name not in expected)
    missing = sorted(name for name in expected if name not in weights)
    wrong_shape: list[str] = []
    wrong_dtype: list[str] = []
    to_load: dict[str, mx.array] = {}
    for name in sorted(set(weights) & set(expected)):
        value, target = weights[name], expected[name]
        if not mx.issubdtype(value.dtype, mx.floating):
            wrong_dtype.append(f"{name} ({value.dtype})")
        elif tuple(value.shape) != tuple(target.shape):
            wrong_shape.append(f"{name} (file {tuple(value.shape)}, model {tuple(target.shape)})")
        else:
            to_load[name] = value.astype(target.dtype)
    for kind, items in (
        ("unknown tensor(s) (not LoRA tensors of this model nor trained_tensors)", unknown),
        ("missing tensor(s)", missing),
        ("tensor(s) with the wrong shape", wrong_shape),
        ("tensor(s) with a non-float dtype", wrong_dtype),
    ):
        if items:
            problems.append(_summarise(kind, items))
    return problems, to_load


def _scale_problems(model: nn.Module, lora: LoRAConfig) -> list[str]:
    scale = lora.alpha / lora.rank
    counts = Counter(layer.scale for _, layer in _lora_layers(model))
    off = {s: n for s, n in counts.items() if not math.isclose(s, scale, rel_tol=1e-6)}
    return [
        f"{n} LoRA layer(s) have scale {s:g}, the adapter was trained with {scale:g}"
        for s, n in sorted(off.items())
    ]


def load_adapters(
    model: nn.Module,
    adapter_dir: Path | str,
    *,
    apply: bool = True,
    ignore: Collection[str] = (),
) -> dict[str, Any]:
    """Check every tensor of an adapter against `model`, then load it; returns its config.

    With `apply` and no LoRA layers in `model` yet, the saved LoRAConfig is applied first (and
    undone again if the adapter does not fit). Tensors named in `ignore` (in the file or in
    `trained_tensors`) are left out: the caller installs them itself (e.g. Qwen3-TTS
    `language_rows.weight`, which belongs in `codec_embedding` rows, not in a module of its own).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = _read_weights(adapter_dir)
    lora = LoRAConfig.from_dict(config["lora"])

    applied = False
    if apply and not _lora_layers(model):
        try:
            apply_lora(model, lora)
        except LoRAError as exc:
            raise AdapterError(adapter_dir, [f"LoRA config does not fit the model: {exc}"]) from exc
        applied = True

    problems, to_load = _weight_problems(model, weights, config.get("trained_tensors", []), ignore)
    problems.extend(_scale_problems(model, lora))
    as_numpy = {k: np.asarray(v.astype(mx.float32)) for k, v in to_load.items()}
    problems.extend(weight_problems(as_numpy, lora=False))  # finite values (shapes: above)
    if problems:
        if applied:
            remove_lora(model)
        raise AdapterError(adapter_dir, problems)
    model.load_weights(list(to_load.items()), strict=False)
    mx.eval(model.parameters())
    return config


def fuse_lora(model: nn.Module, *, requantize: bool = False) -> list[str]:
    """Replace each LoRA layer by a plain (frozen) Linear holding W + scale * (A @ B).T.

    A QLoRA layer fuses to a full-precision (fp32) Linear, or with `requantize` to a
    QuantizedLinear quantised as its base was (a voice fused on a quantised base stays so).
    """
    fused: list[tuple[str, nn.Module]] = []
    for path, layer in _lora_layers(model):
        if requantize and isinstance(layer, QLoRALinear):
            linear = layer.fuse(requantize=True)
        else:
            linear = layer.fuse()
        linear.freeze()
        fused.append((path, linear))
    _replace_modules(model, fused)
    return sorted(path for path, _ in fused)


def dequantize_linears(model: nn.Module) -> list[str]:
    """Replace every QuantizedLinear of `model` by a full-precision Linear holding its
    dequantised weight (the quantisation error stays; nothing is re-quantised)."""
    plain: list[tuple[str, nn.Module]] = []
    for path, layer in model.named_modules():
        if not isinstance(layer, nn.QuantizedLinear):
            continue
        weight = mx.dequantize(
            layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, mode=layer.mode
        )
        output_dims, input_dims = weight.shape
        linear = nn.Linear(input_dims, output_dims, bias="bias" in layer)
        linear.weight = weight.astype(layer.scales.dtype)
        if "bias" in layer:
            linear.bias = layer.bias
        linear.freeze()
        plain.append((path, linear))
    _replace_modules(model, plain)
    return sorted(path for path, _ in plain)


def remove_lora(model: nn.Module) -> list[str]:
    """Put the base layers back in place of the LoRA layers; returns their paths."""
    bases: list[tuple[str, nn.Module]] = [(p, layer.linear) for p, layer in _lora_layers(model)]
    _replace_modules(model, bases)
    return sorted(path for path, _ in bases)
