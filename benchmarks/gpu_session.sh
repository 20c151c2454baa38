#!/usr/bin/env bash
# The one prepared GPU check for a session with the device tool: versions, then the training-step benchmark.
# Expects wheels/diffusers-*.whl carried along (the device image has torch, transformers, peft, accelerate).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pip install --quiet --no-deps wheels/diffusers-*.whl 2>&1 | grep -v WARNING
python -c "import torch, transformers, peft, accelerate, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
timeout "${TRAIN_TIMEOUT:-360}" python benchmarks/train_step.py --device cuda --resolution 512 --batch-size 2 \
  --precision "${PRECISION:-fp16}" --steps 20 --warmup 5 --variants "${VARIANTS:-reference,ours,ours+compile}" 2>&1 \
  | grep -v "kept in float32" | tee "$OUT/train_step.txt"
[ "${FUSION:-0}" = "1" ] && timeout "${FUSION_TIMEOUT:-300}" python benchmarks/fusion.py --model sd15 --device cuda --concepts "${FUSION_CONCEPTS:-1,3}" --methods "${FUSION_METHODS:-weight,lbfgs,gradient}" --json "$OUT/fusion.json" 2>&1 | grep -v "kept in float32" | tee "$OUT/fusion.txt"
