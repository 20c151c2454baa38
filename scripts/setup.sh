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
# Headless Chromium and its driver for the studio's browser test (Debian's packages, about a minute on a new
# machine); where they cannot be installed that test is skipped, saying why. MIXOFSHOW_NO_BROWSER=1 skips this.
if [ -z "${MIXOFSHOW_NO_BROWSER:-}" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null || echo "setup: could not install chromium; the studio's browser test will be skipped" >&2
  else
    echo "setup: no chromium/chromedriver (apt-get install chromium chromium-driver as root); the studio's" \
      "browser test will be skipped" >&2
  fi
fi
