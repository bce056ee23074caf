"""The optimised BLAS is what MLX uses, only when the fast paths are wanted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert {"platform", "mlx_device", "blas_library", "fast_cpu_paths"} <= set(info)
