#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see the device tool's README and bench/README.md).
#
#   bash bench/gpu_check.sh [STEPS]     # from the repository root; results under $OUT (or bench/results/gpu-run)
#
# STEPS is a comma-separated list, run in the order given (default: all). The package is first installed without
# the C++/CUDA extension; the ext step rebuilds it with the extension (sm_90) and runs its tests.
#   ext        build the C++/CUDA extension into the package, then its tests (ext-build: only build it)
#   tests      the CUDA tests (pytest -m cuda: kernels, extension, graph sampler, captured CD step, losses)
#   attn       bench.attention_configs: every attention block configuration, checked and timed
#   ops        python -m bench ops (ops-quick: batch 256 only, fewer shapes)
#   sampling   python -m bench sampling (sampling-quick: batch 1 and 256, compile in 'default' mode)
#   cd-step    python -m bench cd-step (cd-step-quick: l2 only)
#   engine     the CUDA tests of the inference engine, its NHWC norm kernel, the graph sampler, the captured CD step,
#              the diffusers interop (tests/engine, tests/kernels/test_group_norm_silu_nhwc.py, tests/test_graphs.py,
#              tests/training, tests/interop)
#   fair       the fair sampling suite for ADM-64 and DDPM++ at batch 256 and 1 (eager NCHW and channels_last, the
#              engine, the engine as a CUDA graph, cmfast fused, diffusers), then its torch.compile rows (max-autotune,
#              reduce-overhead at batch 1), then the profiler kernel tables (engine graph, eager, compile)
#   engine-bench  the engine figures first, for a short lease: one-step sampling at batch 1 and 256 for ADM-64 then
#              DDPM++ without torch.compile (eager bf16, cmfast fused, CUDA graph, eager fp32, diffusers), the CD step
#              (l2) for both models, then the torch.compile rows of sampling in 'default' mode (compiling is slowest)
#   ext-diag   why an argument error inside cmfast._C crashed (bench/ext_throw_check.py; a native backtrace through
#              cuda-gdb; the same check on a CPU-only build of the extension), then the extension's tests without the two tests
#              that raise errors through the extension
#   final      the captured CD step's tests alone (with per-test timeouts that print where a hang sits), the DDPM++ CD
#              step (eager AMP and cmfast, dropout 0), then sampling with eager bf16, the CUDA graph and torch.compile
#              ('default' mode, static shapes), batch 256 first, ADM-64 first
#   cd-fair    the fair CD-step suite, bf16: the captured step's CUDA tests (tests/training/test_graph_step.py, -m cuda),
#              then python -m bench cd-step with l2 and LPIPS for DDPM++ (CIFAR-10, batch 512), then for ADM-64
#              (batch 64), each in its own run: eager AMP NCHW and channels_last, cmfast fused eager, cmfast captured,
#              torch.compile default and max-autotune (compiled last, cut first by --budget-s); every row with its
#              images/s, step peak memory and max_memory_allocated, ratios against the best eager and compile rows
#   diffusers  the diffusers interop on CUDA: cmfast.accelerate's CUDA test (graph replay against the plain pipeline),
#              then python -m bench diffusers for ADM-64 at batch 1 and 256 (diffusers, +cmfast, cmfast, +compile)
#   scm-step   the sCM step: the JVP tests (tests/kernels/test_jvp.py, test_jvp_networks.py: the fused ops' forward-mode
#              rules and whole networks' JVPs against float64, CUDA and CPU cases), then python -m bench scm-step (sCD)
#              for DDPM++ (CIFAR-10, batch 512), then for ADM-64 (batch 64), each in its own run: unfused eager NCHW and
#              channels_last, cmfast's fused JVP kernels, fp32 then bf16 autocast, torch.compile of the step and of the
#              networks (default mode, compiled last, cut first by --budget-s); images/s, saved bytes per image, step
#              peak memory, ratios against the best unfused eager row
# Each step has its own time limit, so one slow step cannot eat the device budget, and a failing step does not stop
# the ones after it. The machine has no network: wheels it lacks (lpips, diffusers) travel in .whl/ (carry it).
# The last lines printed are a short table of results; the JSON results and a tarball of the logs are in $OUT.
set -uo pipefail
STEPS=${1:-tests,attn,ops,sampling,cd-step,ext}
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
has() { [[ ",$STEPS," == *",$1,"* ]]; }
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/logs/NAME.log, record the exit code
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(($(date +%s) - T0))s)"
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc after $(($(date +%s) - T0))s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/logs/$name.log"
  tar -czf "$OUT/run-logs.tar.gz" -C "$OUT" logs  # few files come back from $OUT (8 at most): bundle the logs
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
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
CMFAST_SKIP_EXT=1 step install 120 python3 -m pip install --no-index --no-deps --no-build-isolation -e .
for s in ${STEPS//,/ }; do  # in the order given
  case $s in
    ext|ext-build)  # rebuild with the extension; a failed build leaves the pure-Python install in place
      step ext_build 200 python3 -m pip install --no-index --no-deps --no-build-isolation -e .
      python3 -c "from cmfast import ops; print('extension:', ops.extension.reason() or 'loaded')" | tee -a "$OUT/steps.txt"
      [ "$s" = ext ] && step ext_tests 90 python3 -m pytest -q -p no:cacheprovider --tb=short -ra tests/kernels/test_extension.py ;;
    # -v: each result is printed as it happens, so a run stopped at its limit still says which tests failed
    tests) step tests 150 python3 -m pytest -v -p no:cacheprovider -n 8 -m cuda --tb=short -ra tests ;;
    attn) step attn 80 python3 -m bench.attention_configs --out "$OUT/attention-configs.json" ;;
    ops) step bench_ops 240 python3 -m bench ops --out "$OUT/bench-ops.json" ;;
    ops-quick) step bench_ops 100 python3 -m bench ops --quick --out "$OUT/bench-ops.json" ;;
    sampling) step bench_sampling 200 python3 -m bench sampling --out "$OUT/bench-sampling.json" ;;
    sampling-quick) step bench_sampling 100 python3 -m bench sampling --quick --compile-mode default --budget-s 70 \
      --out "$OUT/bench-sampling.json" ;;
    cd-step) step bench_cd_step 200 python3 -m bench cd-step --out "$OUT/bench-cd-step.json" ;;
    cd-step-quick) step bench_cd_step 90 python3 -m bench cd-step --quick --compile-mode default --budget-s 60 \
      --out "$OUT/bench-cd-step.json" ;;
    engine) step engine_tests 150 python3 -m pytest -v -p no:cacheprovider -n 4 -m cuda --tb=short -ra \
      tests/engine tests/kernels/test_group_norm_silu_nhwc.py tests/test_graphs.py tests/training tests/interop ;;
    fair)
      step bench_sampling 200 python3 -m bench sampling --batches 256,1 --models adm-imagenet64,ddpmpp-cifar10 \
        --variants eager-bf16-cl,eager-bf16-nchw,engine,engine-graph,cmfast-fused,diffusers --budget-s 170 \
        --out "$OUT/bench-sampling.json"
      step bench_sampling_compile 200 python3 -m bench sampling --batches 256,1 --variants compile \
        --models adm-imagenet64,ddpmpp-cifar10 --budget-s 170 --out "$OUT/bench-sampling-compile.json"
      step bench_profile 150 python3 -m bench profile --compile-mode default --budget-s 120 \
        --out "$OUT/bench-profile.json" ;;
    engine-bench)
      step bench_sampling 170 python3 -m bench sampling --quick --no-compile --models adm-imagenet64,ddpmpp-cifar10 \
        --budget-s 140 --out "$OUT/bench-sampling.json"
      step bench_cd_step 120 python3 -m bench cd-step --quick --no-compile --models ddpmpp-cifar10,adm-imagenet64 \
        --budget-s 90 --out "$OUT/bench-cd-step.json"
      step bench_sampling_compile 150 python3 -m bench sampling --quick --variants compile --compile-mode default \
        --models adm-imagenet64,ddpmpp-cifar10 --budget-s 100 --out "$OUT/bench-sampling-compile.json" ;;
    ext-diag)
      { g++ --version | head -n 1; python3 -c "import torch; print(torch.__config__.show())" | head -n 6; } \
        >> "$OUT/steps.txt" 2>&1
      step ext_throw 60 python3 bench/ext_throw_check.py
      cat "$OUT/logs/ext_throw.log" >> "$OUT/steps.txt"
      step ext_cpu_only_build 120 bash -c 'rm -rf /tmp/cpuonly && mkdir /tmp/cpuonly && cp -r setup.py pyproject.toml \
        README.md cmfast csrc /tmp/cpuonly/ && cd /tmp/cpuonly && rm -f cmfast/_C*.so && CMFAST_EXT_CUDA=0 \
        python3 setup.py -q build_ext --inplace'
      step ext_throw_cpu_only 40 bash -c 'python3 bench/ext_throw_check.py --cases torch-with-ext,cpu,cpu-dtype \
        --so /tmp/cpuonly/cmfast/_C*.so'
      cat "$OUT/logs/ext_throw_cpu_only.log" >> "$OUT/steps.txt"
      step ext_tests_nothrow 90 python3 -m pytest -v -p no:cacheprovider --tb=short -ra tests/kernels/test_extension.py \
        -k "not clear_errors and not dispatch_and_registration"
      step ext_throw_gdb 50 cuda-gdb -q -batch -ex run -ex bt --args python3 bench/ext_throw_check.py --cases cpu \
        --in-process ;;
    final)
      step train_tests 90 python3 -m pytest -v -p no:cacheprovider --timeout 70 --tb=short -ra -m cuda tests/training
      step bench_cd_step 80 python3 -m bench cd-step --quick --no-compile --models ddpmpp-cifar10 \
        --out "$OUT/bench-cd-step.json"
      step bench_sampling 200 python3 -m bench sampling --variants eager-bf16,cmfast-graph,compile --batches 256,1 \
        --compile-mode default --models adm-imagenet64,ddpmpp-cifar10 --out "$OUT/bench-sampling.json" ;;
    cd-fair)
      step cd_graph_tests 90 python3 -m pytest -v -p no:cacheprovider -m cuda --tb=short -ra \
        tests/training/test_graph_step.py
      step bench_cd_fair_ddpmpp 270 python3 -m bench cd-step --compile --models ddpmpp-cifar10 --budget-s 200 \
        --out "$OUT/bench-cd-fair-ddpmpp.json"
      step bench_cd_fair_adm 270 python3 -m bench cd-step --compile --models adm-imagenet64 --budget-s 200 \
        --out "$OUT/bench-cd-fair-adm.json" ;;
    scm-step)
      step jvp_tests 150 python3 -m pytest -v -p no:cacheprovider --tb=short -ra tests/kernels/test_jvp.py \
        tests/kernels/test_jvp_networks.py
      step bench_scm_ddpmpp 240 python3 -m bench scm-step --compile --network ddpmpp-cifar10 --budget-s 180 \
        --out "$OUT/bench-scm-step-ddpmpp.json"
      step bench_scm_adm 240 python3 -m bench scm-step --compile --network adm-imagenet64 --budget-s 180 \
        --out "$OUT/bench-scm-step-adm.json" ;;
    diffusers)
      step diffusers_tests 60 python3 -m pytest -v -p no:cacheprovider -m cuda --tb=short -ra tests/interop
      step bench_diffusers 200 python3 -m bench diffusers --batches 256,1 --budget-s 170 \
        --out "$OUT/bench-diffusers.json" ;;
    *) echo "unknown step $s" ;;
  esac
done

echo
echo "== summary ($STEPS, $(($(date +%s) - T0))s)"
cat "$OUT/steps.txt"
for f in "$OUT"/logs/*tests.log; do [ -f "$f" ] && grep -h -E "^(FAILED|ERROR)|passed|failed" "$f" | tail -n 15; done
[ -f "$OUT/logs/attn.log" ] && sed -n '/^| D |/,$p' "$OUT/logs/attn.log"
for f in "$OUT"/logs/bench_*.log; do [ -f "$f" ] && sed -n '/^## /,$p' "$f"; done
rm -rf "$OUT/logs"
