"""`cmfast eval`, `cmfast tune-steps`, `cmfast ref-stats` and `cmfast train-classifier`.

Errors in the user's input are ValueErrors with one-line messages; `cmfast.cli.main` prints them and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ..data import load_dataset, load_digits
from ..evaluation.classifier import (
    RESOLUTION,
    SHIPPED_CLASSIFIER,
    accuracy,
    round_weights,
    save_classifier,
    train_classifier,
)
from ..evaluation.frechet import frechet_distance, gaussian_statistics
from ..evaluation.metrics import (
    FEATURE_SPACES,
    compute_metrics,
    feature_space,
    reference_for,
    resolve_split,
    save_reference,
)
from ..evaluation.search import greedy_time_points
from ..generate import SamplingPlan, generate, image_shape, sampling_plan
from ..io import atomic_write_bytes
from .common import (
    DTYPES,
    HelpFormatter,
    add_device_arg,
    add_time_point_args,
    check_device,
    check_grid_use,
    check_out_file,
    load_for_sampling,
    plural,
    positive,
)

DIGITS_SPLITS = ("train", "test", "all")


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        choices=FEATURE_SPACES,
        default="digits",
        help="feature space: the shipped digits classifier (no download) or torch-fidelity's TF-Inception port",
    )
    p.add_argument("--classifier", default=SHIPPED_CLASSIFIER, help="digits classifier: the shipped name or a file")
    p.add_argument(
        "--inception-weights",
        help="local torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth); default: "
        "$CMFAST_INCEPTION_WEIGHTS, torch's hub cache, or a download when online",
    )


def _add_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ref",
        help="reference: a statistics .npz (from ref-stats or --save-ref) or a dataset (digits8, an image folder, an "
        "image .npz); default: the built-in digits at the samples' size",
    )
    p.add_argument(
        "--ref-split",
        choices=DIGITS_SPLITS,
        help="split of a built-in digits reference (default test); other datasets are always used whole",
    )
    p.add_argument("--save-ref", help="also write the reference statistics (mu, sigma, features) to this .npz")


def _add_sampling_args(p: argparse.ArgumentParser, with_when: bool) -> None:
    add_device_arg(p)
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="backbone precision via autocast")
    add_time_point_args(p, with_when)
    p.add_argument("--num", type=int, default=1000, help="number of generated images")
    p.add_argument("--batch", type=int, default=500, help="images per network call")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def register(sub) -> None:
    """Add eval, tune-steps, ref-stats and train-classifier to an argparse subparsers object."""
    fmt = HelpFormatter
    p = sub.add_parser(
        "eval",
        help="sample a model and report FID, KID, IS and precision/recall as JSON",
        description="Sample --num images (a consistency model with Algorithm 1 at --steps/--sigmas/--ts; an EDM "
        "teacher with the Heun sampler at --steps Heun steps) or take --images, then compare them with the reference "
        "in a feature space: FID, KID, precision/recall (torch-fidelity) and the classifier's or Inception's score. "
        "Prints JSON and writes it to --out when given.",
        formatter_class=fmt,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a shipped model name, a cmfast .safetensors checkpoint or an official .pt file")
    what.add_argument(
        "--images",
        help="evaluate these images instead: an .npz from `cmfast sample`, a folder, or digits8 (its train split)",
    )
    _add_sampling_args(p, with_when=True)
    _add_feature_args(p)
    _add_reference_args(p)
    p.add_argument("--out", help="also write the JSON result to this file (atomically)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "tune-steps",
        help="search the middle time points of 2- and 3-step sampling (greedy ternary search on FID)",
        description="The paper's time-point search: ts starts at 0 and ends at GRID-1; the second point is found by "
        "ternary search over the grid index minimising FID, then the third with the second fixed, and so on up to "
        "--max-steps. Every candidate is sampled from the same seeds. Prints the search as JSON (and writes it to "
        "--out when given), and the chosen ts for each step count on stderr.",
        formatter_class=fmt,
    )
    p.add_argument("--model", required=True, help="a consistency model: shipped name or checkpoint")
    _add_sampling_args(p, with_when=False)
    p.add_argument("--max-steps", type=int, default=3, help="search up to this many steps (>= 2)")
    _add_feature_args(p)
    _add_reference_args(p)
    p.add_argument("--out", help="also write the search (chosen ts, every scored ts) as JSON to this file")
    p.set_defaults(handler=cmd_tune_steps)

    p = sub.add_parser(
        "ref-stats",
        help="compute a dataset's reference statistics (mu, sigma, features) once and save them as .npz",
        description="Extract features of a dataset and save mu, sigma and the features, for --ref of eval/tune-steps.",
        formatter_class=fmt,
    )
    p.add_argument("--data", required=True, help="digits8 (etc.), an image folder or an image .npz")
    p.add_argument(
        "--split",
        choices=DIGITS_SPLITS,
        help="split of the built-in digits (default test); other datasets are used whole",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_feature_args(p)
    p.set_defaults(handler=cmd_ref_stats)

    p = sub.add_parser(
        "train-classifier",
        help="train the digits classifier whose features give the digits FID",
        description="Train the small digits CNN on the train split of the built-in 8x8 digits (augmented: small "
        "rotations, scalings and shifts), report train and test accuracy, and save it as .safetensors. The shipped "
        "cmfast/assets/digits-classifier.safetensors is `--seed 0 --dtype fp16`.",
        formatter_class=fmt,
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (batch 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and augmentation")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="storage precision")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=cmd_train_classifier)


# --- shared ----------------------------------------------------------------------------------------------------------


def _check_common(args) -> torch.device:
    positive("--num", args.num)
    positive("--batch", args.batch)
    positive("--grid", args.grid)
    if args.num < 2:
        raise ValueError(f"--num must be at least 2 to fit a Gaussian, got {args.num}")
    if not 0 <= args.seed <= 2**63 - 1 - args.num:
        raise ValueError(f"--seed must lie in [0, 2^63 - 1 - num], got {args.seed}")
    for name in ("out", "save_ref"):
        check_out_file(getattr(args, name, None), f"--{name.replace('_', '-')}")
    return check_device(args.device)


def _space(args, device):
    return feature_space(
        args.features, device=device, classifier=args.classifier, inception_weights_path=args.inception_weights
    )


def _reference(args, space, size: int, channels: int, progress: bool):
    ref = reference_for(space, args.ref, resolve_split(args.ref, args.ref_split), size, channels, progress=progress)
    if args.save_ref:
        save_reference(args.save_ref, ref)
    return ref


def _generate(model, plan: SamplingPlan, args, progress: bool) -> np.ndarray:
    return generate(model, plan, args.num, args.batch, args.seed, progress=progress).images


def finite_or_none(value):
    """`value` with every non-finite float replaced by None: JSON has no NaN or inf, and null says "no number"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _write_json(path: str | None, result: dict) -> str:
    text = json.dumps(finite_or_none(result), indent=2, allow_nan=False)
    if path:
        atomic_write_bytes(path, (text + "\n").encode())
    return text


# --- commands --------------------------------------------------------------------------------------------------------


def evaluate_images(images: np.ndarray, space, ref, progress: bool = False) -> tuple[dict, float]:
    """Metrics of uint8 `images` against `ref` in `space`, and the seconds spent on features and metrics."""
    t0 = time.perf_counter()
    features, logits = space(images, progress=progress)
    return compute_metrics(features, ref, logits=logits), time.perf_counter() - t0


def cmd_eval(args) -> None:
    device = _check_common(args)
    check_grid_use(args)
    progress = not args.no_progress
    result: dict = {}
    if args.images is not None:
        if args.steps is not None or args.sigmas is not None or args.ts is not None:
            raise ValueError("--images are evaluated as they are: drop --steps/--sigmas/--ts")
        data = load_dataset(args.images, split="train")
        channels, size = data.channels, data.resolution
        result.update(images=args.images, num=len(data))
    else:
        model = load_for_sampling(args.model, device, args.dtype)
        channels, size, _ = image_shape(model)
        plan = sampling_plan(model, args.steps, args.sigmas, args.ts, args.grid)
        if plan.warning:
            print(f"cmfast eval: warning: {plan.warning}", file=sys.stderr)
        record = plan.record()
        result.update(model=args.model, kind=model.kind, **record, num=args.num, seed=args.seed, dtype=args.dtype)
    space = _space(args, device)  # before sampling: missing weights or a bad reference fail first
    ref = _reference(args, space, size, channels, progress)
    t0 = time.perf_counter()
    images = data.images if args.images is not None else _generate(model, plan, args, progress)
    sample_seconds = time.perf_counter() - t0
    metrics, metric_seconds = evaluate_images(images, space, ref, progress)
    result.update(
        features={"space": space.name, "source": space.source},
        reference={
            "name": ref.name,
            "num": ref.num,
            "split": resolve_split(None, args.ref_split) if args.ref is None else None,
        },
        metrics=metrics,
        seconds={"sampling": sample_seconds, "metrics": metric_seconds},
        device=str(device),
        torch=torch.__version__,
    )
    print(_write_json(args.out, result))


def tune_time_points(model, space, ref, args, progress: bool = True) -> dict:
    """Greedy ternary search of ts for 2..max_steps steps (one-step FID too); every candidate uses seeds SEED.."""
    scored: dict[tuple[int, ...], float] = {}
    total = 1 + (args.max_steps - 1) * search_budget(args.grid)  # memoised candidates make it fewer
    bar = tqdm(desc="tune-steps (FID evaluations)", total=total, unit="ts", disable=not progress)

    def fid(ts: tuple[int, ...]) -> float:
        if ts not in scored:
            plan = sampling_plan(model, ts=ts, grid=args.grid)
            images = generate(model, plan, args.num, args.batch, args.seed, progress=False).images
            features, _ = space(images)
            scored[ts] = frechet_distance(*gaussian_statistics(features), ref.mu, ref.sigma)
            bar.update(1)
            bar.set_postfix(ts=",".join(map(str, ts)), fid=f"{scored[ts]:.3f}")
        return scored[ts]

    chosen = {1: {"ts": [0, args.grid - 1], "fid": fid((0, args.grid - 1))}}
    for n in range(2, args.max_steps + 1):
        ts, value, _ = greedy_time_points(fid, args.grid, n)
        chosen[n] = {"ts": list(ts), "fid": value, "sigmas": list(sampling_plan(model, ts=ts, grid=args.grid).sigmas)}
    bar.total = bar.n  # the search ended: the bar ends full
    bar.close()
    return {"chosen": chosen, "scored": {",".join(map(str, k)): v for k, v in sorted(scored.items())}}


def search_budget(grid: int) -> int:
    """At most how many FID evaluations the ternary search for one middle point makes on a grid of `grid` points:
    two per round, each round shrinking hi - lo to hi - lo - (hi - lo) // 3 - 1 (see `ternary_search`), then the last
    three or fewer compared directly."""
    span, calls = max(0, grid - 3), 0  # candidates 1..grid-2
    while span >= 3:
        span, calls = span - span // 3 - 1, calls + 2
    return calls + span + 1


def cmd_tune_steps(args) -> None:
    device = _check_common(args)
    if args.max_steps < 2:
        raise ValueError(f"--max-steps must be at least 2 (one step has no middle point), got {args.max_steps}")
    if args.grid < args.max_steps + 1:
        raise ValueError(f"--grid {args.grid} has too few points for {args.max_steps} steps")
    model = load_for_sampling(args.model, device, args.dtype)
    sampling_plan(
        model, teacher_error=f"{args.model} is an EDM teacher; tune-steps searches a consistency model's time points"
    )
    space = _space(args, device)
    channels, size, _ = image_shape(model)
    progress = not args.no_progress
    ref = _reference(args, space, size, channels, progress)
    t0 = time.perf_counter()
    search = tune_time_points(model, space, ref, args, progress)
    result = {
        "model": args.model,
        "grid": args.grid,
        "num": args.num,
        "seed": args.seed,
        "features": {"space": space.name, "source": space.source},
        "reference": {"name": ref.name, "num": ref.num},
        **search,
        "seconds": time.perf_counter() - t0,
    }
    print(_write_json(args.out, result))
    for n, c in search["chosen"].items():
        ts = ",".join(map(str, c["ts"]))
        print(f"{plural(n, 'step')}: ts {ts} (grid {args.grid}): FID {c['fid']:.4f}", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def cmd_ref_stats(args) -> None:
    check_out_file(args.out)
    device = check_device(args.device)
    space = _space(args, device)
    ref = reference_for(space, args.data, resolve_split(args.data, args.split), 0, 0, progress=not args.no_progress)
    save_reference(args.out, ref)
    print(f"wrote {args.out}: {ref.num} images of {ref.name}, {space.name} features ({ref.mu.shape[0]} dimensions)")


def cmd_train_classifier(args) -> None:
    positive("--steps", args.steps)
    check_out_file(args.out)
    model, record = train_classifier(steps=args.steps, seed=args.seed, progress=not args.no_progress)
    if args.dtype == "fp16":  # report the accuracy of the weights as stored
        round_weights(model, torch.float16)
        test = load_digits(RESOLUTION, "test")
        record["test_accuracy"] = accuracy(model, *test.batch(range(len(test))))
    record.update(dtype=args.dtype, torch=torch.__version__)
    save_classifier(model, args.out, record, dtype=torch.float16 if args.dtype == "fp16" else None)
    print(
        f"wrote {args.out}: test accuracy {record['test_accuracy']:.4f} on the 300-image digits test split "
        f"(train {record['train_accuracy']:.4f}), {args.steps} steps, seed {args.seed}, {args.dtype}"
    )
