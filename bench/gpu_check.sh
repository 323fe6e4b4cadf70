#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see the device tool's README). Run from the repository root:
#   bash bench/gpu_check.sh            # writes everything under $OUT (or bench/results/gpu-run/ when OUT is unset)
# It records the device and versions, runs the test suite on the GPU machine, then the benchmarks, each with a
# time limit so one slow step cannot eat the session's device budget.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
PY
} > "$OUT/device.txt" 2>&1
pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1 || echo "editable install failed" >> "$OUT/install.log"
timeout 240 python -m pytest -q tests -x > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
timeout 180 python -m pytest -q bench --benchmark-only --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
tail -n 3 "$OUT"/*.log
