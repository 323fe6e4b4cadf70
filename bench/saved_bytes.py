"""Activation memory of a consistency-distillation step: the bytes autograd saves for backward, eager vs fused.

`python -m bench.saved_bytes [--models ddpmpp-cifar10,adm-imagenet64] [--batch 1] [--out PATH]`

The recorded part of the step (the online model's forward, the l2 distance and the backward; the teacher and the
target run without gradients and save nothing) under cmfast.training.memory.consistency_step_saved_bytes, for each
network at random weights, dropout 0 (the paper's CD students), in fp32 and under bf16 autocast:
  eager  ConsistencyModel as it is by default: PyTorch's GroupNorm, SiLU, attention and float32 skip/out
  fused  set_fused_ops (GroupNorm+SiLU and ADM's attention through cmfast.ops) and skip/out through cmfast.ops
  fused-sdpa  (ADM) the same with the attention blocks left to PyTorch's scaled_dot_product_attention: where
         cmfast.ops.attention has no fused backend (a CPU without Triton's interpreter) it runs its reference, which
         keeps the T x T probabilities for backward, while SDPA's flash path keeps only its log-sum-exp
Bytes are distinct storages (views count once); parameters and autocast's weight copies are reported apart
(weights_mib), since they do not grow with the batch. A count of bytes, not a timing: the same on any machine where
the dispatch picks the same backends (the `backends` entry says which ran). Writes
bench/results/<device>-<date>-saved-bytes.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from cmfast import ConsistencyModel, build_network, ops
from cmfast.networks import NETWORK_PRESETS, set_fused_ops
from cmfast.networks.adm import AttentionBlock
from cmfast.training.memory import consistency_step_saved_bytes

from .common import machine, table, write_results

MODELS = ["ddpmpp-cifar10", "adm-imagenet64"]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
COLUMNS = ["model", "precision", "variant", "batch", "mib_per_image", "weights_mib", "storages", "vs_eager", "top"]


def _backends(device: str) -> dict[str, str]:
    """The backend each fused op takes for this run's tensors, as the dispatch chooses it."""
    x = torch.randn(2, 64, 8, 8, device=device)
    sigma = torch.ones(2, device=device)
    return {
        "group_norm_silu": ops.explain("group_norm_silu", x, None, None, 32).backend,
        "skip_out": ops.explain("skip_out", x, x, sigma, 0.002, 0.5).backend,
        "attention": ops.explain("attention", torch.randn(2, 192, 64, device=device), 4).backend,
    }


def _short(producer: str) -> str:
    """'NativeGroupNormBackward0' -> 'NativeGroupNorm'; the custom ops' generated nodes by their op's name."""
    if producer.startswith("GeneratedBackwardFor_"):
        return producer.removeprefix("GeneratedBackwardFor_").removesuffix("_defaultBackward").replace("_", ".", 1)
    return producer.removesuffix("Backward0")


def measure(preset: str, batch: int, device: str, log=print) -> list[dict]:
    """Eager and fused, fp32 and bf16, on one network built once at random weights."""
    config = dataclasses.replace(NETWORK_PRESETS[preset], dropout=0.0)
    torch.manual_seed(0)
    model = ConsistencyModel(build_network(config)).to(device).train()
    g = torch.Generator(device).manual_seed(1)
    shape = (batch, config.in_channels, config.resolution, config.resolution)
    images = torch.rand(shape, generator=g, device=device) * 2 - 1
    labels = torch.randint(config.num_classes, (batch,), generator=g, device=device) if config.num_classes else None
    sigma = torch.tensor([2.0, 0.5][:batch] + [1.0] * max(0, batch - 2), device=device)
    rows = []
    for precision, dtype in PRECISIONS.items():
        model.autocast_dtype = dtype
        eager = None
        attention_blocks = [m for m in model.net.modules() if isinstance(m, AttentionBlock)]
        for variant in ("eager", "fused", "fused-sdpa") if attention_blocks else ("eager", "fused"):
            set_fused_ops(model.net, variant != "eager")
            for block in attention_blocks if variant == "fused-sdpa" else ():
                block.fused = False
            model.skip_out_op = ops.skip_out if variant != "eager" else None
            start = time.perf_counter()
            saved = consistency_step_saved_bytes(model, images, sigma, labels, generator=torch.Generator(device))
            ranked = sorted(saved.by_producer.items(), key=lambda kv: -kv[1])
            row = dict(
                model=preset,
                precision=precision,
                variant=variant,
                batch=batch,
                mib_per_image=saved.per_image / 2**20,
                weights_mib=saved.weights / 2**20,
                storages=saved.storages,
                tensors=saved.tensors,
                activation_bytes=saved.activations,
                by_producer_mib={_short(k): v / 2**20 for k, v in ranked},
                top=", ".join(f"{_short(k)} {v / saved.activations:.0%}" for k, v in ranked[:4]),
                seconds=time.perf_counter() - start,
            )
            eager = eager or row
            row["vs_eager"] = row["activation_bytes"] / eager["activation_bytes"]
            rows.append(row)
            log(
                f"{preset:16s} {precision} {variant:10s} {row['mib_per_image']:8.2f} MiB/image "
                f"({row['vs_eager']:.2f} x eager; {row['seconds']:.0f} s)"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.saved_bytes", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=MODELS)
    parser.add_argument("--batch", type=int, default=1, help="images per measured step (default 1)")
    parser.add_argument("--out", help="results JSON path (default: bench/results/<device>-<date>-saved-bytes.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in NETWORK_PRESETS]
    if unknown:
        parser.error(f"unknown preset {', '.join(unknown)}; presets: {', '.join(NETWORK_PRESETS)}")
    if args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine()
    backends = _backends(device)
    print(f"device: {info['device']}; torch {info['torch']}, {info['date']}; fused backends {backends}")
    rows = [row for preset in args.models for row in measure(preset, args.batch, device)]
    extra = {"backends": backends, "distance": "l2", "dropout": 0.0}
    path = write_results(f"{info['date'][:10]}-saved-bytes", info, rows, extra, args.out)
    print(f"\n## saved for backward per image ({info['device']}); full results: {path}\n")
    print(table(rows, COLUMNS))


if __name__ == "__main__":
    main()
