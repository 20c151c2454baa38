#!/usr/bin/env bash
# Creates .venv and installs mixofshow with its test tools; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU one is enough.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
