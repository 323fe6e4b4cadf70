#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see the device tool's README and bench/README.md).
#
#   bash bench/gpu_check.sh [quick|full]     # from the repository root; results under $OUT (or bench/results/gpu-run)
#
# quick: device report, install, the CUDA tests of the kernels, `python -m bench ops --quick`.
# full:  the same with the whole CUDA test set, every benchmark suite (ops, sampling, cd-step) at full size.
# Each step has its own time limit, so one slow step cannot eat the device budget, and a failing step does not stop
# the ones after it. The machine has no network: wheels it lacks (lpips, diffusers) travel in .whl/ (carry it).
# The last lines printed are a short table of results; the full logs and JSON are in $OUT.
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMFAST_BENCH_OUT="$OUT"
T0=$(date +%s)
# Few files come back from $OUT (8 at most): every step's log goes to logs/<step>.log, bundled into run-logs.tar.gz.
mkdir -p "$OUT/logs"
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/logs/NAME.log, record the exit code
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(($(date +%s) - T0))s)"
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc after $(($(date +%s) - T0))s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/logs/$name.log"
  tar -czf "$OUT/run-logs.tar.gz" -C "$OUT" logs
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/logs/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Builds the C++/CUDA extension for the H100/H200 (sm_90) when csrc/ has sources.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step install 300 python3 -m pip install --no-index --no-deps --no-build-isolation -e .
if ! python3 -c "import cmfast" 2> /dev/null; then  # a broken extension build must not cost the rest of the run
  CMFAST_SKIP_EXT=1 step install_without_extension 120 python3 -m pip install --no-index --no-deps --no-build-isolation -e .
fi
python3 -c "import cmfast.ops as o; print('cmfast imported; extension:', o._extension_reason() or 'loaded')" \
  | tee -a "$OUT/steps.txt"

if [ "$MODE" = full ]; then
  step tests 300 python3 -m pytest -q -p no:cacheprovider tests -m cuda -ra
  step bench_ops 240 python3 -m bench ops --out "$OUT/bench-ops.json"
  step bench_sampling 150 python3 -m bench sampling --out "$OUT/bench-sampling.json"
  step bench_cd_step 120 python3 -m bench cd-step --out "$OUT/bench-cd-step.json"
else
  step tests 120 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/training/test_losses.py -m cuda -ra
  step bench_ops 150 python3 -m bench ops --quick --out "$OUT/bench-ops.json"
fi

echo
echo "== summary ($MODE, $(($(date +%s) - T0))s)"
cat "$OUT/steps.txt"
grep -h -E "^(FAILED|ERROR)|passed|failed" "$OUT"/logs/tests.log | tail -n 12
for f in "$OUT"/logs/bench_*.log; do sed -n '/^## /,$p' "$f"; done
rm -rf "$OUT/logs"
