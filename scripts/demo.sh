#!/usr/bin/env bash
# The main job until the toy world lands: on a tiny random base model (nothing downloaded), tune a concept with
# ED-LoRA from generated images, inspect the concept file and sample with it. Writes into ${OUT:-outputs/demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-outputs/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
.venv/bin/python scripts/make_demo_inputs.py "$OUT"
.venv/bin/mixofshow train --base "$OUT/tiny-base" --data "$OUT/concept/images" --masks "$OUT/concept/masks" \
  --words "<dot1>+<dot2>" --init "<rand-0.013>+ball" --resolution 32 --steps 200 --out "$OUT/dot.safetensors"
.venv/bin/mixofshow inspect "$OUT/dot.safetensors"
.venv/bin/mixofshow sample --base "$OUT/tiny-base" --concept "$OUT/dot.safetensors" --scale 0.7 \
  --prompt "a photo of a <dot1> <dot2> on the grass" --steps 20 --num-images 4 --out "$OUT/samples/dot.png"
echo "demo outputs in $OUT (concept file, validation grid, samples)"
