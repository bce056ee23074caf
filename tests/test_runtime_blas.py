"""The optimised BLAS is what MLX uses, only when the fast paths are wanted."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROBE = (
    "import finetune, mlx.core as mx; from finetune.runtime import blas, fast_cpu_active;"
    "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)));"
    "import json; print(json.dumps({'lib': blas.active_blas_library(), 'fast': fast_cpu_active()}))"
)


def _probe(fast: str) -> dict:
    env = {**os.environ, "VOICEFOUNDRY_FAST_CPU": fast}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
def test_fast_paths_are_on_with_openblas_under_mlx():
    state = _probe("auto")
    assert state["fast"] is True
    assert "openblas" in state["lib"], state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
def test_setting_turns_fast_paths_off():
    state = _probe("0")
    assert state["fast"] is False
    assert "openblas" not in state["lib"], state


def test_doctor_reports_json():
    out = subprocess.run(
        [sys.executable, "-m", "finetune", "doctor", "--json", "--no-measure"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout)
    assert {"platform", "mlx_device", "blas_library", "fast_cpu_paths", "packed_quantized"} <= set(
        info
    )


DECODE_PROBE = """
import json, os, sys
import finetune, mlx.core as mx, numpy as np
from finetune.runtime import blas
rng = np.random.default_rng(0)
w, x, v = (rng.standard_normal(s).astype(np.float32) for s in ((96, 80), (1, 80), (96, 1)))
many = rng.standard_normal((80, 80)).astype(np.float32)
W, X, V, MANY = mx.array(w), mx.array(x), mx.array(v), mx.array(many)
before = blas.decode_gemm_counts()
got = {
    "x@W.T": (X @ W.T, x @ w.T), "W@x.T": (W @ X.T, w @ x.T), "v.T@W": (V.T @ W, v.T @ w),
    "W.T@v": (W.T @ V, w.T @ v), "batched": (mx.stack([X, X]) @ W.T, np.stack([x, x]) @ w.T),
    "many": (MANY @ W.T, many @ w.T),
}
errors = {k: float(np.abs(np.array(a) - b).max()) for k, (a, b) in got.items()}
after = blas.decode_gemm_counts()
state = blas.state()
child = None
if after is not None:
    # A forked child has none of the parent's worker threads: its products must still finish.
    # (MLX itself does not run in a forked child; the child calls the global cblas_sgemm.)
    import ctypes
    sgemm = ctypes.CDLL(None).cblas_sgemm
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    big = rng.standard_normal((4096, 512)).astype(np.float32)
    ones, out = np.ones((3, 512), np.float32), np.zeros((3, 4096), np.float32)
    def product():
        sgemm(101, 111, 112, 3, 4096, 512, 1.0, ones.ctypes.data, 512, big.ctypes.data, 512,
              0.0, out.ctypes.data, 4096)
        return np.allclose(out, big.sum(axis=1)[None], atol=1e-2)
    product()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if product() else 1)
    child = os.waitpid(pid, 0)[1]
print(json.dumps({"before": before, "after": after, "errors": errors, "child": child,
                  "path": state.decode_gemm, "problem": state.decode_gemm_problem}))
"""


def _decode_probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DECODE_PROBE],
        env={**os.environ, "VOICEFOUNDRY_FAST_CPU": "1", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
def test_decode_products_go_to_the_few_row_kernel_and_agree_with_numpy(tmp_path):
    state = _decode_probe(VOICEFOUNDRY_NATIVE_DIR=str(tmp_path))
    assert state["problem"] is None and str(tmp_path) in state["path"], state
    done = {k: state["after"][k] - state["before"][k] for k in state["after"]}
    # x @ W.T of one and of two rows (MLX folds the shared-weight batch into two rows): the
    # kernel; the one-column and other-layout one-row products: sgemv; 80 rows: sgemm.
    assert done["few_rows"] >= 2 and done["sgemv"] >= 3 and done["sgemm"] >= 1, state
    assert max(state["errors"].values()) < 1e-4, state
    assert state["child"] == 0, state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
def test_decode_gemm_can_be_turned_off_and_needs_a_compiler(tmp_path):
    off = _decode_probe(VOICEFOUNDRY_DECODE_GEMM="0", VOICEFOUNDRY_NATIVE_DIR=str(tmp_path))
    assert off["after"] is None and "off" in off["problem"], off
    assert max(off["errors"].values()) < 1e-4
    wrong = _decode_probe(VOICEFOUNDRY_DECODE_GEMM="avx1024", VOICEFOUNDRY_NATIVE_DIR=str(tmp_path))
    assert wrong["after"] is None and "'avx1024' is not one of" in wrong["problem"], wrong
    empty = tmp_path / "bin"
    empty.mkdir()
    bare = _decode_probe(VOICEFOUNDRY_NATIVE_DIR=str(tmp_path / "cache"), PATH=str(empty), CC="")
    assert bare["after"] is None and "no C compiler" in bare["problem"], bare
    assert max(bare["errors"].values()) < 1e-4  # plain OpenBLAS still does the products


@pytest.fixture(scope="module")
def fresh_decode_gemm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library built from this checkout's source, once for the module."""
    from finetune.runtime.blas import DECODE_GEMM_LINK
    from finetune.runtime.native import library

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VOICEFOUNDRY_NATIVE_DIR", str(tmp_path_factory.mktemp("native")))
        return library("decode_gemm", link=DECODE_GEMM_LINK)


def _private_library(tmp_path: Path, built: Path) -> ctypes.CDLL:
    """Its own copy: binding it leaves the one under this process's MLX alone."""
    copy = tmp_path / "private_decode_gemm.so"
    shutil.copy(built, copy)
    lib = ctypes.CDLL(str(copy))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.vf_qgemm.argtypes = [i, i, i, p, p, p, p, i, i, p]
    lib.vf_count.restype = ctypes.c_ulong
    return lib


def _kernels() -> list[int]:
    import platform

    return [1, 2] if platform.machine() in ("x86_64", "AMD64") else [0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
def test_sgemm_follows_the_blas_contract_for_every_path(tmp_path, fresh_decode_gemm):
    """Every layout, transpose and beta, few rows and one column, each kernel, against numpy."""
    from finetune.runtime.blas import find_blas

    lib = _private_library(tmp_path, fresh_decode_gemm)
    rng = np.random.default_rng(1)
    for kernel in [0, *_kernels()]:
        for threads in (1, 2):
            picked = lib.vf_bind(str(find_blas()).encode(), threads, kernel)
            assert picked == kernel or (kernel == 2 and picked == 1), (kernel, picked)
            for order in (101, 102):
                for ta in (111, 112):
                    for tb in (111, 112):
                        for m, n, k in SHAPES:
                            for beta in (0.0, 0.5):
                                _check_product(lib, rng, order, ta, tb, m, n, k, beta)


# Few rows, one column, one element; one-row products of a LoRA adapter's sizes (x @ A, h @ B:
# summed on the calling thread) and past that path's bounds (4100 outputs, 80k weights: sgemv).
SHAPES = (
    (1, 7, 5), (6, 1, 5), (1, 1, 4), (3, 9, 37), (16, 5, 33),
    (1, 8, 1024), (1, 3072, 8), (1, 4100, 3), (1, 40, 2000),
)  # fmt: skip


def _check_product(lib, rng, order, ta, tb, m, n, k, beta) -> None:
    a_op = rng.standard_normal((m, k)).astype(np.float32)
    b_op = rng.standard_normal((k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    want = 1.5 * a_op @ b_op + beta * c0
    a = _stored(a_op, ta == 112, order == 102, pad=3)
    b = _stored(b_op, tb == 112, order == 102, pad=2)
    c = _stored(c0, False, order == 102, pad=1)
    if beta == 0.0:
        c.data[:] = np.nan  # beta 0: C is never read
    lib.cblas_sgemm(order, ta, tb, m, n, k, 1.5, a.ptr, a.ld, b.ptr, b.ld, beta, c.ptr, c.ld)
    # float32 sums: their rounding grows with the length of the sum
    atol = 1e-5 * max(1.0, (k / 40) ** 0.5)
    np.testing.assert_allclose(c.logical(m, n), want, rtol=1e-5, atol=atol)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_of_a_few_row_product_is_bit_exact_to_it_alone(
    tmp_path, fresh_decode_gemm, threads
):
    from finetune.runtime.blas import find_blas

    lib = _private_library(tmp_path, fresh_decode_gemm)
    rng = np.random.default_rng(2)
    # Odd sizes: weight rows not a multiple of the 4-row blocks, inputs not of the vector width.
    w = rng.standard_normal((4099, 1037)).astype(np.float32)
    x = rng.standard_normal((65, 1037)).astype(np.float32)
    for kernel in _kernels():
        lib.vf_bind(str(find_blas()).encode(), threads, kernel)
        most = lib.vf_few_rows_max()
        assert most in (16, 64), most  # AVX-512: 16, AVX2: 64 (measured per kernel)
        before = lib.vf_count(0)
        alone = [_xwt(lib, x[r : r + 1], w) for r in range(most)]
        counts = [r for r in (2, 3, 5, 8, 16, 24, 33, 64) if r <= most]
        for rows in counts:
            together = _xwt(lib, x[:rows], w)
            for r in range(rows):
                assert np.array_equal(together[r], alone[r][0]), (kernel, threads, rows, r)
            np.testing.assert_allclose(together, x[:rows] @ w.T, rtol=1e-4, atol=1e-3)
        assert lib.vf_count(0) - before == most + len(counts)
        sgemm_before = lib.vf_count(2)
        _xwt(lib, x[: most + 1], w)  # one row more: OpenBLAS's sgemm
        assert lib.vf_count(2) - sgemm_before == 1


def _xwt(lib, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    m, k = x.shape
    lib.cblas_sgemm(
        101,
        111,
        112,
        m,
        w.shape[0],
        k,
        1.0,
        x.ctypes.data,
        k,
        w.ctypes.data,
        k,
        0.0,
        out.ctypes.data,
        w.shape[0],
    )
    return out


class _Stored:
    """A logical matrix laid out as BLAS sees it: row or column major, leading dimension padded."""

    def __init__(self, data: np.ndarray, col_major: bool, ld: int) -> None:
        self.data, self.col_major, self.ld = data, col_major, ld
        self.ptr = data.ctypes.data

    def logical(self, rows: int, cols: int) -> np.ndarray:
        if self.col_major:
            return self.data.reshape(cols, self.ld)[:, :rows].T
        return self.data.reshape(rows, self.ld)[:, :cols]


def _stored(op: np.ndarray, transposed: bool, col_major: bool, pad: int) -> _Stored:
    stored = op.T if transposed else op  # the matrix in memory, before the layout
    rows, cols = stored.shape
    outer, inner = (cols, rows) if col_major else (rows, cols)
    data = np.zeros((outer, inner + pad), np.float32)
    data[:, :inner] = stored.T if col_major else stored
    return _Stored(data.reshape(-1), col_major, inner + pad)


CACHE_PROBE = (
    "import finetune, mlx.core as mx, mlx.nn as nn; from finetune.runtime import prepare_model;"
    "before = mx.set_cache_limit(1 << 25); mx.set_cache_limit(before);"
    "prepare_model(nn.Linear(4, 4)); after = mx.set_cache_limit(0);"
    "import json; print(json.dumps({'before': before, 'after': after}))"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
@pytest.mark.parametrize(("setting", "mib"), [("", 1024), ("64", 64)])
def test_a_prepared_model_keeps_freed_buffers_for_reuse(setting: str, mib: int) -> None:
    """MLX's CPU backend keeps 32 MiB of freed buffers; preparing a model raises it to the
    setting (VOICEFOUNDRY_MLX_CACHE_MIB), so big activations reuse pages instead of fresh ones."""
    env = {**os.environ, "VOICEFOUNDRY_FAST_CPU": "1", "VOICEFOUNDRY_MLX_CACHE_MIB": setting}
    out = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True
    )
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["before"] == 32 * 2**20, state  # MLX's own default, pinned
    assert state["after"] == max(mib, 32) * 2**20, state


def test_a_bad_cache_setting_is_a_clear_error() -> None:
    env = {**os.environ, "VOICEFOUNDRY_MLX_CACHE_MIB": "lots"}
    out = subprocess.run(
        [sys.executable, "-c", "import finetune"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "VOICEFOUNDRY_MLX_CACHE_MIB must be a whole number of MiB, not 'lots'" in out.stderr


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine layout, written here from its definition: value i of each uint32 word in bits
    [bits * i, bits * (i + 1))."""
    per_word = 32 // bits
    words = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    packed = np.zeros(words.shape[:2], np.uint32)
    for i in range(per_word):
        packed |= words[:, :, i] << np.uint32(bits * i)
    return packed


def _qgemm(lib, x: np.ndarray, packed: np.ndarray, scales, biases, bits: int, group: int):
    x = np.ascontiguousarray(x)
    out = np.full((x.shape[0], packed.shape[0]), np.nan, np.float32)
    status = lib.vf_qgemm(
        x.shape[0], packed.shape[0], x.shape[1], x.ctypes.data, packed.ctypes.data,
        scales.ctypes.data, biases.ctypes.data, bits, group, out.ctypes.data,
    )  # fmt: skip
    return status, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_packed_product_equals_the_dequantised_one_and_each_row_alone(
    tmp_path, fresh_decode_gemm, threads
):
    """vf_qgemm against numpy on weights packed here: 4 and 8 bits, groups of one and several
    loads, output counts off the kernel's blocks, 1-9 rows; each row bit-exact to it alone."""
    from finetune.runtime.blas import find_blas

    lib = _private_library(tmp_path, fresh_decode_gemm)
    if lib.vf_bind(str(find_blas()).encode(), threads, 1) != 1:
        pytest.fail("this CPU has no AVX2 / FMA: the packed product's kernel cannot run")
    rng = np.random.default_rng(3)
    before = lib.vf_count(3)
    calls = 0
    for bits, group, n, k in (
        (4, 64, 1027, 512),
        (4, 128, 6, 256),
        (8, 32, 1029, 320),
        (8, 64, 3, 64),
    ):
        q = rng.integers(0, 2**bits, size=(n, k))
        scales = rng.uniform(0.001, 0.02, (n, k // group)).astype(np.float32)
        biases = rng.uniform(-0.1, 0.1, (n, k // group)).astype(np.float32)
        weight = q.astype(np.float32) * np.repeat(scales, group, 1) + np.repeat(biases, group, 1)
        packed = _pack(q, bits)
        x = rng.standard_normal((9, k)).astype(np.float32)
        alone = [
            _qgemm(lib, x[r : r + 1], packed, scales, biases, bits, group)[1] for r in range(9)
        ]
        for rows in (1, 2, 3, 4, 5, 8, 9):
            status, together = _qgemm(lib, x[:rows], packed, scales, biases, bits, group)
            assert status == 0
            np.testing.assert_allclose(together, x[:rows] @ weight.T, rtol=1e-4, atol=1e-3)
            for r in range(rows):
                assert np.array_equal(together[r], alone[r][0]), (bits, group, rows, r)
        calls += 9 + 7
    assert lib.vf_count(3) - before == calls
    # Layouts the kernel does not take are refused, never miscomputed.
    q = _pack(rng.integers(0, 16, size=(4, 64)), 4)
    ones = np.ones((4, 2), np.float32)
    x = np.ones((1, 64), np.float32)
    assert _qgemm(lib, x, q, ones, ones, 4, 32)[0] == -1  # a group less than one 64-value load
    assert _qgemm(lib, x, q, ones, ones, 3, 64)[0] == -1  # 3 bits
    assert _qgemm(lib, np.ones((1, 96), np.float32), q, ones, ones, 4, 64)[0] == -1  # k % group


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU fast paths")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_bf16_product_is_the_fp32_kernels_on_the_widened_weight(
    tmp_path, fresh_decode_gemm, threads
):
    """vf_bgemm with each kernel this CPU has (AVX2; AVX-512 where present): every output equals
    the fp32 few-row kernel's on the weight widened to fp32, bit for bit, up to its row limit."""
    from finetune.runtime.blas import find_blas

    lib = _private_library(tmp_path, fresh_decode_gemm)
    lib.vf_bgemm.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
    rng = np.random.default_rng(4)
    # Odd sizes: weight rows off the blocks, inputs off the vector width.
    w32 = rng.standard_normal((1031, 523)).astype(np.float32)
    half = (w32.view(np.uint32) >> 16).astype(np.uint16)
    widened = (half.astype(np.uint32) << 16).view(np.float32)
    for kernel in _kernels():
        lib.vf_bind(str(find_blas()).encode(), threads, kernel)
        most = lib.vf_few_rows_max()
        before = lib.vf_count(4)
        for rows in sorted({1, 2, 3, 5, 16, most}):
            x = rng.standard_normal((rows, 523)).astype(np.float32)
            ours = np.full((rows, 1031), np.nan, np.float32)
            assert (
                lib.vf_bgemm(rows, 1031, 523, x.ctypes.data, half.ctypes.data, ours.ctypes.data)
                == 0
            )
            assert np.array_equal(ours, _xwt(lib, x, widened)), (kernel, threads, rows)
        assert lib.vf_count(4) - before == len({1, 2, 3, 5, 16, most})
