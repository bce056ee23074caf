"""The compiled Snake kernel gives numpy's result (and float64's, to float32 rounding)."""

from __future__ import annotations

from finetune.runtime import host_snake

import numpy as np
import pytest


def _exact(x: np.ndarray, scale: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return x + gain * np.sin(x.astype(np.float64) * scale) ** 2


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 701, 96), (40_000, 7), (1, 9, 1024)])
def test_kernel_matches_numpy_and_float64(shape):
    assert host_snake.kernel_problem() is None  # CI machines have a compiler
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    scale = np.exp(rng.standard_normal(shape[-1]) * 0.5).astype(np.float32)
    gain = np.exp(rng.standard_normal(shape[-1]) * 0.5).astype(np.float32)
    got = host_snake.snake(x, scale, gain)
    assert got.shape == x.shape and got.dtype == np.float32
    reference = host_snake._numpy_snake(x, scale, gain)
    bound = 4 * np.spacing(np.abs(_exact(x, scale, gain)).astype(np.float32)) + 1e-6
    assert np.all(np.abs(got - _exact(x, scale, gain)) <= bound)
    assert np.abs(got - reference).max() <= 4e-6 * max(1.0, float(np.abs(reference).max()))


def test_non_contiguous_input_and_large_arguments():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 32)) * 1e4).astype(np.float32).T  # a transposed view
    scale = np.ones(64, np.float32)
    gain = np.full(64, 0.5, np.float32)
    exact = _exact(x, scale, gain)
    got = host_snake.snake(x, scale, gain)
    assert np.all(np.abs(got - exact) <= 2 * np.spacing(np.abs(exact).astype(np.float32)))


def test_shapes_the_kernel_does_not_take_go_to_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    scale = rng.standard_normal((4, 1)).astype(np.float32)  # per row, not per channel
    gain = np.ones((4, 1), np.float32)
    assert np.array_equal(host_snake.snake(x, scale, gain), host_snake._numpy_snake(x, scale, gain))


def test_without_a_kernel_numpy_does_it(monkeypatch):
    monkeypatch.setattr(host_snake.KERNEL, "lib", None)
    monkeypatch.setattr(host_snake.KERNEL, "problem", "no compiler")
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    ones = np.ones(6, np.float32)
    assert host_snake.kernel_problem() == "no compiler"
    assert np.array_equal(host_snake.snake(x, ones, ones), host_snake._numpy_snake(x, ones, ones))
