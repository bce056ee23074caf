#!/usr/bin/env bash
# A second virtual environment (default .venv-parity) for the reference-parity tests
# (tests/parity/, `make parity`): PyTorch CPU and the reference implementations, official
# `qwen-tts` and Kyutai's `moshi`. It does not hold the project: qwen-tts pins transformers 4.57
# while mlx-audio needs >= 5.14, so the tests run our side (server, CLI) from .venv and compare.
#
# Both reference packages pin what this machine cannot or need not install (qwen-tts: gradio,
# torchaudio - whose PyPI builds do not load beside torch 2.13 - ; moshi: torch<2.10,
# sounddevice), so they are installed with --no-deps beside deploy/parity-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VF_PARITY_VENV:-.venv-parity}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and alone: 2.13.0 CPU is the build that lies on disk on the CI machines.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -r deploy/parity-requirements.txt
"$venv/bin/python" -m pip install -q --no-deps "qwen-tts==0.1.1" "moshi==0.2.13"
