"""`python -m bench`: run a benchmark suite, write its JSON under bench/results/, print a summary table.

Suites:
  ops       the fused ops (GroupNorm+SiLU, attention, skip/out, Heun step) against eager PyTorch and torch.compile
  sampling  one-step sampling throughput and batch-1 latency: eager (NCHW, channels_last), torch.compile, diffusers,
            cmfast fused, the engine, the engine as a CUDA graph
  cd-step   one consistency-distillation training step, l2 and LPIPS: images/s and peak memory; eager AMP (NCHW and
            channels_last), torch.compile (default and max-autotune), cmfast fused eager and captured
  scm-step  one sCM training step (sCD, sCT) with its torch.func.jvp tangent: images/s, saved bytes and peak memory;
            unfused eager (NCHW and channels_last), cmfast's fused JVP kernels, torch.compile; it has its own options
            (`python -m bench scm-step --help`)
  diffusers one-step sampling of one ADM model: diffusers' pipeline, accelerated by cmfast, cmfast, and compiled
  profile   kernel tables of one sampling call (engine, eager, compile): kernel count and time by category
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from .common import machine, table, write_results

SUITES = {
    "ops": "bench.ops",
    "sampling": "bench.sampling",
    "cd-step": "bench.cd_step",
    "scm-step": "bench.scm_step",
    "diffusers": "bench.diffusers_pipeline",
    "profile": "bench.profile_tables",
}


def _batch_sizes(text: str) -> list[int]:
    """'256,1' -> [256, 1], or a one-line argparse error naming the bad entry."""
    sizes = []
    for entry in filter(None, text.split(",")):
        if not entry.isdigit() or int(entry) < 1:
            raise argparse.ArgumentTypeError(f"batch sizes are positive integers separated by commas, got {entry!r}")
        sizes.append(int(entry))
    return sizes


OWN_OPTIONS = {"scm-step"}  # suites with their own command line: `python -m bench SUITE --help`


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in OWN_OPTIONS:
        importlib.import_module(SUITES[argv[0]]).main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which measurements to run")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and batch sizes (a first look)")
    parser.add_argument("--out", help="results JSON path (default: bench/results/<device>-<suite>.json)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile baselines (default: on CUDA only; on a CPU it compiles with a C++ toolchain)",
    )
    parser.add_argument(
        "--compile-mode",
        help="torch.compile mode of the whole-model suites (default: max-autotune, and reduce-overhead at batch 1 in "
        "sampling; cd-step: both default and max-autotune, or only the mode given; max-autotune tunes for minutes, "
        "'default' is quicker)",
    )
    parser.add_argument("--budget-s", type=float, default=1e9, help="whole-model suites: skip what starts later")
    parser.add_argument(
        "--models",
        type=lambda s: [m for m in s.split(",") if m],
        help="whole-model suites: comma-separated presets, run in this order (default: all of the device's; on a GPU "
        "ddpmpp-cifar10,adm-imagenet64, on a CPU the small presets)",
    )
    parser.add_argument(
        "--variants",
        type=lambda s: [m for m in s.split(",") if m],
        help="whole-model suites: comma-separated variants (sampling: eager-bf16-cl, eager-bf16-nchw, engine, "
        "engine-graph, cmfast-fused, eager-fp32, diffusers, compile; cd-step: eager-amp-nchw, eager-amp-cl, "
        "eager-bf16-nchw (CPU, l2), cmfast-fused-eager, cmfast (captured, CUDA only), compile-default, "
        "compile-max-autotune; "
        "diffusers: diffusers, diffusers+cmfast, cmfast, diffusers+compile)",
    )
    parser.add_argument(
        "--batches",
        type=_batch_sizes,
        help="sampling: comma-separated batch sizes, in this order (default: 1,16,64,256 on a GPU, 1,16 on a CPU; "
        "--quick: 1,256)",
    )
    args = parser.parse_args(argv)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    if args.out and len(suites) > 1:
        parser.error("--out names one file; run one suite at a time with it")
    info = machine()
    print(f"device: {info['device']}; torch {info['torch']}, triton {info.get('triton')}, {info['date']}")
    for suite in suites:
        module = importlib.import_module(SUITES[suite])
        options = {
            "compile_mode": args.compile_mode,
            "budget_s": args.budget_s,
            "models": args.models,
            "variants": args.variants,
            "batches": args.batches,
        }
        accepted = inspect.signature(module.run).parameters
        options = {k: v for k, v in options.items() if k in accepted and v is not None}
        rows, extra = module.run(quick=args.quick, compile=args.compile, log=lambda s: print(s, flush=True), **options)
        path = write_results(suite + ("-quick" if args.quick else ""), info, rows, {"ceilings": extra}, args.out)
        print(f"\n## {suite} ({info['device']}); full results: {path}\n")
        print(table(module.summary(rows), module.SUMMARY_COLUMNS))
        sys.stdout.flush()
