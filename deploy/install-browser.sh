#!/usr/bin/env bash
# What the console's browser tests (tests/browser, `make browser`) need beyond the project's venv:
# Debian's `chromium` and Playwright's Python package (the `browser` extra), which drives that
# Chromium through executable_path. Playwright's own browser downloads are never used (no hub,
# no CDN here). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VF_VENV:-.venv}"

if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
  else
    echo "error: the browser tests need Chromium: install it and put 'chromium' on PATH" >&2
    exit 1
  fi
fi
"$venv/bin/python" -m pip install -q -e ".[browser]"
