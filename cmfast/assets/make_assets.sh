#!/usr/bin/env bash
# Re-create the shipped digits models with the project's own commands (CPU, about 40 minutes on 2 cores).
# Run from the repository root with cmfast installed: bash cmfast/assets/make_assets.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/assets}
ASSETS=cmfast/assets
cmfast train-edm --preset digits-edm --steps 4000 --run-dir "$RUNS/digits-edm" --no-progress
cmfast export "$RUNS/digits-edm/model.safetensors" "$ASSETS/digits-edm.safetensors" --dtype fp16
cmfast distill --preset digits-cd --teacher "$RUNS/digits-edm/model.safetensors" --steps 2000 \
  --run-dir "$RUNS/digits-cd" --no-progress
cmfast export "$RUNS/digits-cd/model.safetensors" "$ASSETS/digits-cd.safetensors" --dtype fp16
cmfast train-ct --preset digits-ict --steps 4000 --run-dir "$RUNS/digits-ict" --no-progress
cmfast export "$RUNS/digits-ict/model.safetensors" "$ASSETS/digits-ict.safetensors" --dtype fp16
# Coloured digits (RGB), for the colorization demo: only the distilled model ships.
cmfast train-edm --preset digits-rgb-edm --steps 3000 --run-dir "$RUNS/digits-rgb-edm" --no-progress
cmfast distill --preset digits-rgb-cd --teacher "$RUNS/digits-rgb-edm/model.safetensors" --steps 1500 \
  --run-dir "$RUNS/digits-rgb-cd" --no-progress
cmfast export "$RUNS/digits-rgb-cd/model.safetensors" "$ASSETS/digits-rgb-cd.safetensors" --dtype fp16
# The digits classifier whose features give the digits FID of `cmfast eval` (about a minute).
cmfast train-classifier --out "$ASSETS/digits-classifier.safetensors" --seed 0 --dtype fp16 --no-progress
