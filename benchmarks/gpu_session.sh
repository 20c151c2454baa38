#!/usr/bin/env bash
# The one prepared GPU check of a session with the device tool. Stages run in order, each under its own timeout,
# and write their tables under $OUT: STAGES="regional fusion toyworld quality train_step" picks them.
# Expects wheels/diffusers-*.whl carried along (the device image has torch, transformers, peft, accelerate).
# A CPU dry run of the same stages: DEVICE=cpu MODEL=tiny STAGES="regional fusion toyworld" bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-sd15}
STAGES=${STAGES:-toyworld regional fusion}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python -m pip install --quiet --no-deps wheels/diffusers-*.whl 2>&1 | grep -v WARNING
fi
python -c "import torch, transformers, peft, accelerate, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
quiet() { grep -v -e "kept in float32" -e "torchvision" ; }
for stage in $STAGES; do
  start=$(date +%s)
  case $stage in
    regional)
      timeout "${REGIONAL_TIMEOUT:-120}" python benchmarks/regional.py --model "$MODEL" --device "$DEVICE" \
        --dtype "${REGIONAL_DTYPE:-float16}" --steps 20 --repeat 3 2>&1 | quiet | tee "$OUT/regional.txt" ;;
    fusion)  # float16 (as users fuse on a GPU) with the L-BFGS reference at 3 concepts; float32 as last session
      timeout "${FUSION_TIMEOUT:-170}" python benchmarks/fusion.py --model "$MODEL" --device "$DEVICE" \
        --dtype "${FUSION_HALF:-float16}" --concepts "${FUSION_CONCEPTS:-3,14}" --methods weight,lbfgs,gradient \
        --lbfgs-max-concepts 3 --lbfgs-text-iterations 50 --lbfgs-unet-iterations 10 \
        2>&1 | quiet | tee "$OUT/fusion-half.txt"
      timeout "${FUSION_TIMEOUT:-170}" python benchmarks/fusion.py --model "$MODEL" --device "$DEVICE" \
        --dtype float32 --concepts "${FUSION_CONCEPTS:-3,14}" --methods gradient \
        2>&1 | quiet | tee "$OUT/fusion-float32.txt" ;;
    toyworld)
      timeout "${TOYWORLD_TIMEOUT:-300}" python scripts/train_toyworld.py --device "$DEVICE" \
        --minutes "${TOYWORLD_MINUTES:-3.5}" --out "$OUT/toyworld" ${TOYWORLD_FLAGS:-} 2>&1 | quiet \
        | tr '\r' '\n' | grep -v "it/s" | tail -60 | tee "$OUT/toyworld.txt"
      # At most 8 files of 16 MiB come back from $OUT: the ~20 MB folder travels as 15 MB pieces
      # (here: cat toyworld.tar.gz.part-* | tar -xz -C src/mixofshow/assets).
      tar -C "$OUT" -czf - toyworld | split -b 15M - "$OUT/toyworld.tar.gz.part-" && rm -rf "$OUT/toyworld" ;;
    quality)  # the toy world's fusion-quality table with the models on the GPU (QUALITY_FLAGS: its options)
      timeout "${QUALITY_TIMEOUT:-300}" python benchmarks/quality.py --device "$DEVICE" --quiet \
        ${QUALITY_FLAGS:---quick} 2>&1 | quiet | grep -v -e "requires torchvision" | tee "$OUT/quality.txt" ;;
    train_step)
      timeout "${TRAIN_TIMEOUT:-360}" python benchmarks/train_step.py --device "$DEVICE" --resolution 512 \
        --batch-size 2 --precision "${PRECISION:-fp16}" --steps 20 --warmup 5 \
        --variants "${VARIANTS:-reference,ours,ours+compile}" 2>&1 | quiet | tee "$OUT/train_step.txt" ;;
  esac
  echo "stage $stage: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
done
