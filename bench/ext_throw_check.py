"""GPU-machine diagnostic: does an argument error raised inside cmfast._C (TORCH_CHECK) reach Python as a RuntimeError?

With some toolchains (torch 2.11 with g++ 13.3) such an error crashed the process with a segmentation fault instead
(see CMFAST_CHECK in csrc/common.h). Each case runs in its own process, so one crash does not hide the next:

    python bench/ext_throw_check.py                  # every case
    python bench/ext_throw_check.py --cases cpu      # some of them (comma-separated)
    python bench/ext_throw_check.py --so other/_C.so # another build of the library (torch.ops.load_library)
    cuda-gdb -batch -ex run -ex bt --args python bench/ext_throw_check.py --cases cpu --in-process  # where it crashes

A case prints "raised: <first line>" when the error came back, "no error" when the call succeeded, or its exit code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CASES = {
    # a PyTorch op's own error, without and with the extension loaded: is it exception handling as a whole?
    "torch-alone": (False, "torch.ones(2) + torch.ones(3)"),
    "torch-with-ext": (True, "torch.ones(2) + torch.ones(3)"),
    # an error from the C++ translation unit (CPU op), plain message and one formatting a dtype
    "cpu": (True, "E.skip_out(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3), 0.002, 0.5, False)"),
    "cpu-dtype": (True, "E.skip_out(torch.randn(2, 3).double(), torch.randn(2, 3), torch.ones(2), 0.002, 0.5, False)"),
    # an error from the CUDA translation unit (NCHW x where the kernel needs channels_last)
    "cuda": (
        True,
        "E.group_norm_silu(torch.randn(2, 64, 4, 4, device='cuda'), torch.ones(64, device='cuda'), "
        "torch.zeros(64, device='cuda'), None, None, 32, 1e-5, True)",
    ),
}

CHILD = """
import torch
if {load} and {so!r}:
    torch.ops.load_library({so!r})
    print("cmfast_ext from", {so!r}, flush=True)
elif {load}:
    import cmfast._C
    print("cmfast._C from", cmfast._C.__file__, flush=True)
E = torch.ops.cmfast_ext
try:
    {call}
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0][:160])
else:
    print("no error")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--so", default="", help="load the operator library from this file instead of cmfast._C")
    parser.add_argument("--in-process", action="store_true", help="run the cases here, not in child processes")
    args = parser.parse_args()
    for name in args.cases.split(","):
        load, call = CASES[name]
        code = CHILD.format(load=load, call=call, so=args.so)
        if args.in_process:  # for a debugger: the crash, if any, happens in this process
            exec(code, {})
            continue
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        print(f"{name:15s} rc={proc.returncode:<4d} {' | '.join(lines[-2:])[:300]}", flush=True)


if __name__ == "__main__":
    main()
