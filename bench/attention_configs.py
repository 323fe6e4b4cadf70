"""Tuning aid for the Triton attention kernels (GPU): every candidate (BLOCK_M, BLOCK_N, warps, stages) checked for
correctness (forward output and each part of the qkv gradient against float64, relative error) and timed (forward,
forward+backward) at the networks' shapes. The launcher's table (`cmfast.kernels.attention._blocks`) is chosen from
its output.

    python -m bench.attention_configs [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from cmfast import ops
from cmfast.kernels import attention as K

from .common import machine, time_ms

CANDIDATES = {
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3)],
    256: [(32, 32, 8, 1), (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
SHAPES = {64: (256, 6, 1024), 256: (256, 1, 256)}  # head_dim -> (batch, heads, tokens): ADM-64 at 32x32, DDPM++ 16x16


def _errors(blocks, head_dim: int) -> dict:
    """Relative errors of out, dq, dk, dv against float64 at a small irregular shape, bf16 and float32."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        B, H, T = 2, 2, 333
        qkv = (1.4 * torch.randn(B, 3 * H * head_dim, T, generator=g)).to("cuda", dtype)
        dout = torch.randn(B, H * head_dim, T, generator=g).to("cuda", dtype)
        res = {}
        for name, backend, cast in (("kernel", "triton", None), ("ref", "torch", torch.float64)):
            x = (qkv.to(cast) if cast else qkv).detach().requires_grad_()
            y = ops.attention(x, H, backend=backend)
            y.backward(dout.to(y.dtype))
            res[name] = (y.detach().double(), x.grad.double())
        (y, dx), (ry, rdx) = res["kernel"], res["ref"]
        parts = dict(zip(("dq", "dk", "dv"), dx.reshape(B, 3, -1, T).unbind(1)))
        refs = dict(zip(("dq", "dk", "dv"), rdx.reshape(B, 3, -1, T).unbind(1)))
        tag = "fp32" if dtype == torch.float32 else "bf16"
        out[f"{tag}_out"] = ((y - ry).norm() / ry.norm()).item()
        for k in parts:
            out[f"{tag}_{k}"] = ((parts[k] - refs[k]).norm() / refs[k].norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attention_configs", description=__doc__)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention_configs needs a CUDA device")
    rows = []
    original = K._blocks
    for head_dim, configs in CANDIDATES.items():
        B, H, T = SHAPES[head_dim]
        qkv = torch.randn(B, 3 * H * head_dim, T, device="cuda", dtype=torch.bfloat16)
        leaf = qkv.detach().requires_grad_()
        dout = torch.randn(B, H * head_dim, T, device="cuda", dtype=torch.bfloat16)
        flops = 4 * B * H * T * T * head_dim
        for cfg in configs:
            K._blocks = lambda block_d, cfg=cfg: cfg
            row = dict(head_dim=head_dim, blocks=list(cfg), shape=[B, H, T])
            try:
                row.update(_errors(cfg, head_dim))
                row["fwd_ms"] = time_ms(lambda q=qkv, h=H: ops.attention(q, h, backend="triton"), "cuda")
                row["fwd_bwd_ms"] = time_ms(
                    lambda q=leaf, h=H, d=dout: torch.autograd.grad(ops.attention(q, h, backend="triton"), q, d), "cuda"
                )
                row["fwd_tflop_s"] = flops / row["fwd_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 (a config that does not compile is a result)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    K._blocks = original
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": machine(), "rows": rows}, fh, indent=1)
    print("\n| D | blocks | fwd ms | fwd+bwd ms | TFLOP/s | worst bf16 err | worst fp32 err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bf = max((v for k, v in r.items() if k.startswith("bf16_")), default=float("nan"))
        fp = max((v for k, v in r.items() if k.startswith("fp32_")), default=float("nan"))
        print(
            f"| {r['head_dim']} | {r['blocks']} | {r.get('fwd_ms', float('nan')):.3f} | "
            f"{r.get('fwd_bwd_ms', float('nan')):.3f} | {r.get('fwd_tflop_s', float('nan')):.0f} | {bf:.2e} | "
            f"{fp:.2e} |" + (f" {r['error']}" if "error" in r else "")
        )


if __name__ == "__main__":
    main()
