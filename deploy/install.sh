#!/usr/bin/env bash
# Install voicefoundry into a virtual environment (default .venv), with an optimised BLAS for
# MLX on Linux (Debian's OpenBLAS; see finetune/runtime/blas.py). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VF_VENV:-.venv}"
python="${PYTHON:-python3}"

if [[ "$(uname -s)" == "Linux" ]]; then
  # OpenBLAS, and C / C++ compilers for the small libraries the runtime builds on first use
  # (finetune/runtime/csrc/: decode's few-row products, the vocoder's Snake, the packed 4/8-bit
  # product's MLX extension; optional, 1.6x and more).
  missing=()
  compgen -G "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0" >/dev/null \
    || missing+=(libopenblas0-pthread)
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=(g++)
  if (( ${#missing[@]} )); then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""
      [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    else
      echo "warning: no apt-get; install ${missing[*]} (or set VOICEFOUNDRY_BLAS=/path/libopenblas.so.0)" >&2
    fi
  fi
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# The SDK (clients/python) first in the same command: the `voicefoundry` script's client
# commands (say, voices, jobs) are built on it.
"$venv/bin/python" -m pip install -q -e clients/python -e ".[dev]"
# Kyutai's `moshi.client`, which the duplex client tests run unchanged. --no-deps: moshi pins
# torch for its model code, which pip cannot resolve beside our stack and the client never
# imports; the client's own dependencies (aiohttp, sphn, numpy) come with the dev extra.
"$venv/bin/python" -m pip install -q --no-deps "moshi==0.2.13"
"$venv/bin/voicefoundry" doctor --no-measure
