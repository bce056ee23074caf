"""Typed doors to two untyped MLX calls: reading a safetensors file and flattening a parameter tree.

`mx.load` returns one of three shapes and `tree_flatten` one of two, depending on arguments; every
caller here wants the same one, so it is checked once, here, instead of at each call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten


def load_arrays(path: str | Path) -> dict[str, mx.array]:
    """Every tensor of a safetensors file, by name."""
    loaded = mx.load(str(path), format="safetensors")
    if not isinstance(loaded, dict):
        raise ValueError(f"{Path(path).name}: not a safetensors file of named tensors")
    return loaded


def scalar(value: mx.array) -> float:
    """A one-element array's value as a Python float."""
    item = value.item()
    assert isinstance(item, int | float), f"not a real scalar: {item!r}"
    return float(item)


def flat_items(tree: Any) -> list[tuple[str, Any]]:
    """(dotted name, leaf) pairs of a nested parameter tree, in tree order."""
    flat = tree_flatten(tree)
    assert isinstance(flat, list)
    return flat
