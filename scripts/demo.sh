#!/usr/bin/env bash
# The main job: set-up, then the toy-world demo on the bundled base model (nothing downloaded, CPU): tune three
# concepts with ED-LoRA, fuse them (weight and gradient fusion), sample each concept and a three-region
# composition, score everything with the toy world's classifier. Writes ${OUT:-outputs/demo}/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-outputs/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
.venv/bin/mixofshow demo --out "$OUT" "$@"
echo "demo report: $OUT/index.html"
