"""The compiled ELU kernel gives float32's rounding of the exact ELU, element by element."""

from __future__ import annotations

from finetune.runtime import host_elu

import numpy as np
import pytest

SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -1e-45, 1e-45, -1e-38, -87.0, -104.0, -1e30, 1e30],
    np.float32,
)


def _exact(x: np.ndarray) -> np.ndarray:
    wide = x.astype(np.float64)
    return np.where(wide > 0, wide, np.expm1(np.minimum(wide, 0.0)))


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32))


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 0.3, 1.0, 8.0, 40.0])
def test_kernel_rounds_the_exact_value(scale):
    assert host_elu.kernel_problem() is None  # CI machines have a compiler
    rng = np.random.default_rng(int(scale * 1e6))
    x = (rng.standard_normal(300_001) * scale).astype(np.float32)  # threads split it unevenly
    got = host_elu.elu(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    # float64's expm1 is within an ulp of float64, far inside half a float32 ulp
    assert _ulps(got, _exact(x)).max() <= 0.5 + 1e-6
    numpy_elu = host_elu._numpy_elu(x)
    # what numpy gives where there is no kernel: within an ulp from its scalar expm1, a few from
    # the SIMD expm1 it dispatches to on AVX-512 CPUs (2.3 seen)
    assert _ulps(numpy_elu, _exact(x)).max() <= 4.0


def test_special_values():
    got = host_elu.elu(SPECIALS)
    want = _exact(SPECIALS).astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(got[4]) and got[3] == -1.0 and got[2] == np.inf


def test_an_element_does_not_depend_on_the_rest_of_the_array():
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((8, 16, 1920)).astype(np.float32)
    whole = host_elu.elu(batch)
    for row in (0, 5):
        assert np.array_equal(host_elu.elu(batch[row : row + 1]), whole[row : row + 1])
    view = batch.transpose(0, 2, 1)  # a strided view is taken as its values
    assert np.array_equal(host_elu.elu(view), whole.transpose(0, 2, 1))


def test_without_a_kernel_numpy_does_it(monkeypatch):
    monkeypatch.setattr(host_elu.KERNEL, "lib", None)
    monkeypatch.setattr(host_elu.KERNEL, "problem", "no compiler")
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    assert host_elu.kernel_problem() == "no compiler"
    assert host_elu.describe() == "numpy (no compiler)"
    assert np.array_equal(host_elu.elu(x), host_elu._numpy_elu(x))


def test_only_float32():
    with pytest.raises(TypeError, match="float32"):
        host_elu.elu(np.zeros(3, np.float64))


def test_the_graph_elu_is_one_node_with_the_kernels_values():
    """In the graph (the extension's primitive bound to the kernel): the host kernel's values bit
    for bit, lazily, keeping a dense input's memory order (SEANet's transposed views)."""
    import io
    import re

    from finetune.families.personaplex import mimi_stream

    import mlx.core as mx

    node = host_elu.graph_elu()
    assert node is not None  # CI machines have a C and a C++ compiler
    x = mx.array(np.random.default_rng(5).standard_normal((3, 64, 40)).astype(np.float32) * 4)
    mx.eval(x)
    for view in (x, x.transpose(0, 2, 1), x[:, ::3], mx.broadcast_to(x[:1], x.shape)):
        got = node(view)
        dot = io.StringIO()
        mx.export_to_dot(dot, got)
        assert re.findall(r'label ="([A-Za-z]+)', dot.getvalue()).count("Elu") == 1
        wanted = host_elu.elu(np.array(view))
        assert np.array_equal(np.array(got), wanted)
        assert np.array_equal(np.array(mimi_stream.host_elu(view)), wanted)
    transposed = node(x.transpose(0, 2, 1))
    mx.eval(transposed)
    assert np.asarray(transposed).strides == np.asarray(x.transpose(0, 2, 1)).strides
    grad = mx.grad(lambda v: (node(v) * 3).sum())(x)
    assert mx.allclose(grad, mx.where(x > 0, 3.0, 3 * mx.exp(x)), atol=1e-5).item()


def test_without_the_extension_mimi_takes_the_host_round_trip(monkeypatch):
    from finetune.families.personaplex import mimi_stream

    import mlx.core as mx

    monkeypatch.setattr(mimi_stream, "graph_elu", lambda: None)
    x = mx.array(np.linspace(-5, 5, 120, dtype=np.float32).reshape(2, 60)).T
    got = mimi_stream.host_elu(x)
    assert got.shape == x.shape
    assert np.array_equal(np.array(got), host_elu.elu(np.array(x)))
