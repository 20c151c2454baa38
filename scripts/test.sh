#!/usr/bin/env bash
# The test command: set-up, lint, then the whole test suite (tiny random models, CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --line-length 119 src tests benchmarks scripts
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -p no:cacheprovider "$@"
