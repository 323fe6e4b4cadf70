"""`cmfast edit TASK`: zero-shot editing (Algorithm 4) from the command line, writing a labelled panel and raw arrays.

Outputs in --out: TASK.png (rows: one per input; columns: reference, degraded input, results; small images enlarged),
TASK.npz (uint8 NHWC: "images" = all results, "results" (N, K, H, W, C), "reference", "degraded", and the time
points and seeds) and TASK.json (the resolved run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from .. import editing
from ..data import load_digits, load_npz
from ..generate import check_class_label, check_finite, image_shape, num_classes, sampling_plan
from ..io import atomic_write_bytes, label_font, save_npz, save_png, to_uint8
from ..networks import NETWORK_PRESETS
from ..sampling import generators_from_seeds, karras_sigmas, randint, randn
from .common import (
    HelpFormatter,
    RawHelpFormatter,
    add_model_args,
    add_sigma_args,
    check_device,
    check_out_dir,
    ints,
    load_for_sampling,
    plural,
    positive,
)

TASKS = {
    "inpaint": "fill the pixels that --mask marks; the others keep the input exactly",
    "colorize": "colour a grayscale (or RGB) input, keeping its luminance exactly (RGB models only)",
    "super_resolve": "raise the resolution by --factor, keeping the input's patch means exactly",
    "denoise": "remove Gaussian noise of level --sigma in one step f(y, sigma), or several (--steps)",
    "interpolate": "decode the spherical interpolation between the noises of two --seeds, one step per image",
    "stroke_edit": "turn a stroke painting into a realistic image (SDEdit: noise to t1 = 5.38, then 2 steps; "
    "on the 8x8 digits --ts 22,26 follows the strokes better)",
}
SAMPLED_TASKS = ("inpaint", "colorize", "super_resolve", "stroke_edit")  # K results per input, from seeded noise
TASK_OPTIONS = ("input", "mask", "factor", "sigma", "noisy", "steps", "seeds", "num", "sigmas", "ts", "grid", "samples")
WHOLE_GRID = "Karras grid size (walked whole unless --sigmas/--ts say otherwise; --ts indexes it)"
GRID_HELP = {
    "inpaint": WHOLE_GRID,
    "colorize": WHOLE_GRID,
    "super_resolve": WHOLE_GRID,
    "stroke_edit": "Karras grid size that --ts indexes",
}
SAMPLED_SEEDS = "result k of input i uses seed SEED + i*SAMPLES + k"
SEED_HELP = {
    **{task: SAMPLED_SEEDS for task in SAMPLED_TASKS},
    "denoise": "input i uses seed SEED + i, for the added noise and any later steps",
    "interpolate": "class labels (class-conditional models) come from the first seed of each pair",
}

DESCRIPTION = """\
Zero-shot editing with a consistency model (Algorithm 4 of Song et al. 2023): no training for any task.

tasks:
  inpaint        Fill the pixels that --mask marks (1 = generate): a PNG (white = generate), box:x0,y0,x1,y1,
                 strokes:SEED (random brush strokes) or center (a centred box, the default). The other pixels keep
                 the input exactly. Time points: the whole Karras grid of --grid points (40: 39 evaluations).
  colorize       Colour a grayscale input (or an RGB one, whose colour is discarded); the output keeps the input's
                 luminance 0.2989 R + 0.5870 G + 0.1140 B exactly. Needs an RGB model. Same time points.
  super_resolve  Raise the resolution by --factor (dividing the model's size): the input is a low-resolution
                 image (size/factor) or a full-size one that is reduced; the output keeps its factor x factor patch
                 means exactly. Same time points.
  denoise        Add noise of std --sigma to the input (or take it as already noisy with --noisy) and remove it:
                 f(y, sigma) in one evaluation, or several steps down a Karras grid (--steps 1,2: one column each).
  interpolate    Decode the spherical interpolation between the noises of two seeds (--seeds A,B; more pairs give
                 more rows), --num images per strip, one evaluation each; the ends are the seeds' one-step samples.
  stroke_edit    Turn a stroke painting into an image (SDEdit): x = painting + 5.38 z, then f at 5.38 and 2.24.
                 On the 8x8 digits, --ts 22,26 (t = 1.38, 0.47) follows the strokes far better (docs/editing).
                 --input digits-test:N makes crude paintings from real digits (three flat gray levels).

inputs (--input): an image file (PNG/JPEG), an .npz of uint8 images (key "images", NHWC, as `cmfast sample` writes)
or digits-test:N (the first N images of the built-in digits test split at the model's size). Grayscale inputs are
broadcast to RGB models. Result k of input i uses seed SEED + i*SAMPLES + k (denoise: SEED + i, for the added noise
and any later steps), so results do not depend on --batch.
Time points: --sigmas, or --ts indexing a Karras grid of --grid points, override the task's default.
`cmfast edit TASK --help` lists a task's own options."""

INPUTS = (
    '--input: an image file (PNG/JPEG), an .npz of uint8 images (key "images", NHWC, as `cmfast sample` writes) or '
    "digits-test:N (the first N images of the built-in digits test split at the model's size); grayscale inputs are "
    "broadcast to RGB models."
)
TASK_HELP = {
    "inpaint": "Fill the pixels that --mask marks (1 = generate); the other pixels keep the input exactly. "
    "Time points: the whole Karras grid of --grid points (40: 39 evaluations). " + INPUTS,
    "colorize": "Colour a grayscale input (or an RGB one, whose colour is discarded); the output keeps the input's "
    "luminance 0.2989 R + 0.5870 G + 0.1140 B exactly. Needs an RGB model. Time points: the whole Karras grid. "
    + INPUTS,
    "super_resolve": "Raise the resolution by --factor (dividing the model's size): the input is a low-resolution "
    "image (size/factor) or a full-size one that is reduced; the output keeps its factor x factor patch means "
    "exactly. Time points: the whole Karras grid. " + INPUTS,
    "denoise": "Add noise of std --sigma to the input (or take it as already noisy with --noisy) and remove it: "
    "f(y, sigma) in one evaluation, or several steps down a Karras grid (--steps 1,2: one column each). " + INPUTS,
    "interpolate": "Decode the spherical interpolation between the noises of two seeds (--seeds A,B; more pairs give "
    "more rows), --num images per strip, one evaluation each; the ends are the seeds' one-step samples.",
    "stroke_edit": "Turn a stroke painting into an image (SDEdit): x = painting + t1 z, then f at each time point. "
    "Default time points 5.38, 2.24 (the paper's, for 64x64 images); on the 8x8 digits models these barely follow "
    "the strokes, and --ts 22,26 (t = 1.38, 0.47 on the 40-point grid) works (docs/editing). digits-test:N makes "
    "crude paintings from real digits (three flat gray levels). " + INPUTS,
}


MAX_STRIP = 256  # interpolate --num: images per strip; a strip is one network call, so it must fit in memory


def _task_parser(tasks, name: str):
    """The sub-parser of one task, also reachable with hyphens (super-resolve)."""
    aliases = [name.replace("_", "-")] if "_" in name else []
    return tasks.add_parser(
        name, aliases=aliases, help=TASKS[name], description=TASK_HELP[name], formatter_class=HelpFormatter
    )


def _add_task_args(p: argparse.ArgumentParser, task: str) -> None:
    """The options of one task: the model, its own inputs and settings, seeds, batching and the output."""
    add_model_args(p)
    if task != "interpolate":
        p.add_argument("--input", help="image file, .npz of uint8 images, or digits-test:N (required)")
    if task == "inpaint":
        p.add_argument(
            "--mask", default="center", help="PNG (white = generate), box:x0,y0,x1,y1, strokes:SEED or center"
        )
    if task == "super_resolve":
        p.add_argument(
            "--factor", type=int, default=2, help="the resolution factor (an integer >= 2 dividing the size)"
        )
    if task == "denoise":
        p.add_argument("--sigma", type=float, default=0.3, help="the noise level")
        p.add_argument("--noisy", action="store_true", help="the input already carries noise of level --sigma")
        p.add_argument("--steps", type=ints, default="1", help="evaluations, one column per entry, e.g. 1,2")
    if task == "interpolate":
        p.add_argument("--seeds", type=ints, default="0,1", help="pairs of noise seeds, one row per pair")
        p.add_argument("--num", type=int, default=8, help=f"images per strip (at most {MAX_STRIP})")
    if task in SAMPLED_TASKS:
        add_sigma_args(p.add_mutually_exclusive_group())
        p.add_argument("--grid", type=int, default=editing.EDIT_GRID, help=GRID_HELP[task])
        p.add_argument("--samples", type=int, default=3, help="results per input")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP[task])
    p.add_argument("--batch", type=int, default=16, help="images per network call")
    p.add_argument("--class-label", type=int, help="class of every image (class-conditional models; default random)")
    p.add_argument("--out", default="edit", help=f"output directory for {task}.png, {task}.npz and {task}.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(sub) -> None:
    """Add `edit` with one sub-command per task to an argparse subparsers object."""
    p = sub.add_parser(
        "edit",
        help="zero-shot editing: inpaint, colorize, super_resolve, denoise, interpolate, stroke_edit",
        description=DESCRIPTION,
        formatter_class=RawHelpFormatter,
    )
    # options a task does not take read as unset (each task's own parser overrides these), so the code below needs
    # no per-task attribute checks
    p.set_defaults(**dict.fromkeys(TASK_OPTIONS))
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK", title="tasks (cmfast edit TASK --help)")
    for task in TASKS:
        t = _task_parser(tasks, task)
        _add_task_args(t, task)
        t.set_defaults(handler=cmd_edit, task=task)


# --- inputs ----------------------------------------------------------------------------------------------------------


def load_inputs(spec: str, size: int) -> Tensor:
    """Images from --input as (N, C, H, W) uint8 (digits-test:N at the given size)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits-test":
        try:
            n = int(arg)
        except ValueError:
            raise ValueError(f"--input {spec}: expected digits-test:N with an integer N")
        data = load_digits(size, split="test")
        if not 1 <= n <= len(data):
            raise ValueError(f"--input {spec}: N must lie in [1, {len(data)}]")
        return data.images[:n]
    if spec.lower().endswith(".npz"):
        return load_npz(spec).images
    if spec.lower().endswith((".png", ".jpg", ".jpeg")):
        if not os.path.isfile(spec):
            raise ValueError(f"--input {spec}: no such file")
        try:
            with Image.open(spec) as img:
                img = img.convert("L" if img.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
                array = np.asarray(img)
        except (OSError, ValueError) as err:
            raise ValueError(f"--input {spec}: cannot decode the image ({err})")
        array = array[..., None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    raise ValueError(f"--input {spec!r}: expected an image file (.png/.jpg), an .npz of uint8 images or digits-test:N")


def _fit_inputs(images: Tensor, spec: str, channels: int, sizes: tuple[int, ...]) -> Tensor:
    """uint8 (N, C, H, W) -> float [-1, 1] with the model's channels (grayscale broadcast), or a one-line error."""
    n, c, h, w = images.shape
    if (h, w) not in [(s, s) for s in sizes]:
        want = " or ".join(f"{s}x{s}" for s in sizes)
        raise ValueError(f"--input {spec}: images are {w}x{h} but this task takes {want} (resize them first)")
    if c != channels and not (c == 1 and channels == 3):
        raise ValueError(f"--input {spec}: images have {c} channel(s) but the model takes {channels}")
    return images.float().div(127.5).sub(1).expand(-1, channels, -1, -1)


def crude_strokes(images: Tensor) -> Tensor:
    """A crude stroke painting of each image: averages over blocks of side size/8 (none at 8x8), quantized to three
    flat levels (-1, 0, 1)."""
    block = max(1, images.shape[-1] // 8)
    coarse = F.interpolate(F.avg_pool2d(images, block), scale_factor=block, mode="nearest")
    return (coarse * 1.5).round().clamp(-1, 1)


# --- the command -----------------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    for name in ("batch", "samples", "num", "grid"):
        positive(f"--{name}", getattr(args, name))
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if args.task == "interpolate":
        if len(args.seeds) < 2 or len(args.seeds) % 2:
            raise ValueError(f"--seeds must hold pairs of seeds (A,B[,C,D...]), got {len(args.seeds)}")
        if min(args.seeds) < 0:
            raise ValueError(f"--seeds must be non-negative, got {min(args.seeds)}")
        if args.num > MAX_STRIP:
            raise ValueError(f"--num must be at most {MAX_STRIP} images per strip, got {args.num}")
    elif args.input is None:
        raise ValueError(f"{args.task} needs --input (an image file, an .npz or digits-test:N)")
    if args.task == "stroke_edit" and args.grid != editing.EDIT_GRID and args.ts is None:
        raise ValueError(f"--grid {args.grid} only applies with --ts (stroke_edit walks no grid); add --ts or drop it")
    if args.task == "super_resolve" and args.factor < 2:
        raise ValueError(f"--factor must be an integer >= 2, got {args.factor}")
    if args.task == "denoise" and any(s < 1 for s in args.steps):
        raise ValueError(f"--steps must be positive integers, got {args.steps}")


def _labels(model, args, gens, device) -> Tensor | None:
    """The class of each image: --class-label, or drawn from its own generator (class-conditional models only)."""
    classes = num_classes(model)
    if not classes:
        return None
    if args.class_label is not None:
        return torch.full((len(gens),), args.class_label, device=device)
    return randint(classes, len(gens), gens, device=device)


def _batched(run, inputs: Tensor, seeds: list[int], batch: int, progress: bool = False, desc: str = "") -> Tensor:
    """run(inputs[i:j], generators of seeds[i:j]) over chunks of `batch`, concatenated; results must be finite."""
    outs = []
    for start in tqdm(range(0, len(seeds), batch), desc=desc, unit="batch", disable=not progress):
        gens = generators_from_seeds(seeds[start : start + batch])
        out = run(inputs[start : start + batch], gens)
        check_finite(out, f"seeds {seeds[start]}..{seeds[min(start + batch, len(seeds)) - 1]}")
        outs.append(out)
    return torch.cat(outs)


def cmd_edit(args) -> None:
    _check_args(args)
    device = check_device(args.device)
    check_out_dir(args.out)
    model = load_for_sampling(args.model, device, args.dtype)
    if args.task == "stroke_edit":
        default = editing.STROKE_SIGMAS
    elif args.task in SAMPLED_TASKS:  # the paper's editing schedule: the whole Karras grid
        default = karras_sigmas(args.grid, model.sigma_min, model.sigma_max).tolist()
    else:  # denoise and interpolate evaluate at their own noise level; the plan only refuses teachers
        default = None
    plan = sampling_plan(
        model, sigmas=args.sigmas, ts=args.ts, grid=args.grid, default_sigmas=default,
        teacher_error=f"--model {args.model} is an EDM teacher; editing needs a consistency model",
    )  # fmt: skip
    check_class_label(model, args.class_label)
    channels, size, _ = image_shape(model)
    if args.task == "colorize" and channels != 3:
        raise ValueError(f"colorize needs an RGB model; {args.model} has {channels} channel(s)")
    sigmas = list(plan.sigmas) if args.task in SAMPLED_TASKS else None
    t0 = time.perf_counter()
    if args.task == "interpolate":
        panel = _interpolate(model, args, channels, size, device)
    else:
        panel = _edit_inputs(model, args, channels, size, device, sigmas)
    seconds = time.perf_counter() - t0
    _write(args, model, panel, sigmas, None if sigmas is None else plan.evaluations, seconds)


@dataclass
class Panel:
    """What a run produced: the panel's column headers and uint8 NHWC arrays."""

    headers: list[str]  # column headers, left to right
    results: np.ndarray  # (N, K, H, W, C): K results for each of N inputs (or strips)
    reference: np.ndarray | None = None  # (N, H, W, C) the clean images, when known
    degraded: np.ndarray | None = None  # (N, H, W, C) what the editor sees: masked, grayscale, low-res, noisy, strokes
    seeds: np.ndarray | None = None  # (N, K) the seed of each result
    extra: dict = field(default_factory=dict)  # more arrays for the .npz


def _edit_inputs(model, args, channels, size, device, sigmas) -> Panel:
    task = args.task
    sizes = (size, size // args.factor) if task == "super_resolve" and size % args.factor == 0 else (size,)
    if task == "super_resolve" and size % args.factor:
        raise ValueError(f"image size {size} is not divisible by the factor {args.factor}")
    raw = load_inputs(args.input, size)
    if len(raw) == 0:
        raise ValueError(f"--input {args.input}: holds no images")
    y = _fit_inputs(raw, args.input, channels, sizes).to(device)
    n = y.shape[0]
    reference, extra = y, {}
    if task == "inpaint":
        mask = editing.make_mask(args.mask, size).to(device)
        degraded, extra["mask"] = y * (1 - mask), to_uint8(mask[None, None] * 2 - 1)[0, ..., 0]
        headers = ["reference", "masked"]
    elif task == "colorize":
        degraded = editing.luminance(y).expand(-1, 3, -1, -1)
        headers = ["reference", "grayscale"]
    elif task == "super_resolve":
        if y.shape[-1] == size:
            degraded = editing.patch_means(y, args.factor)
            headers = ["reference", f"1/{args.factor} res"]
        else:
            reference, degraded = None, F.interpolate(y, scale_factor=args.factor, mode="nearest")
            headers = [f"1/{args.factor} res"]
    elif task == "stroke_edit":
        if args.input.startswith("digits-test:"):
            degraded = crude_strokes(y)
            headers = ["reference", "strokes"]
        else:
            reference, degraded, headers = None, y, ["strokes"]
    else:
        return _denoise(model, args, y, device)
    k = args.samples
    seeds = [args.seed + i for i in range(n * k)]
    inputs = degraded.repeat_interleave(k, 0) if task == "stroke_edit" else y.repeat_interleave(k, 0)

    def run(x, gens):
        labels = _labels(model, args, gens, device)
        kw = dict(class_labels=labels, generator=gens)
        if task == "inpaint":
            return editing.inpaint(model, x, mask, sigmas, **kw)
        if task == "colorize":
            return editing.colorize(model, x, sigmas, **kw)
        if task == "super_resolve":
            return editing.super_resolve(model, x, args.factor, sigmas, size=size, **kw)
        return editing.stroke_edit(model, x, sigmas, **kw)

    out = _batched(run, inputs, seeds, args.batch, not args.no_progress, task)
    headers += [f"sample {j + 1}" for j in range(k)]
    return Panel(
        headers,
        to_uint8(out).reshape(n, k, *out.shape[2:], out.shape[1]),
        None if reference is None else to_uint8(reference),
        to_uint8(degraded),
        np.array(seeds).reshape(n, k),
        extra,
    )


def _denoise(model, args, y, device) -> Panel:
    n = y.shape[0]
    seeds = [args.seed + i for i in range(n)]
    if args.noisy:
        noisy, reference = y, None
    else:
        noise = randn(y.shape, generators_from_seeds(seeds), device=device)
        noisy, reference = y + args.sigma * noise, y
    columns = []
    for steps in args.steps:

        def run(x, gens, steps=steps):
            if not args.noisy:  # redraw the input's noise, so later steps take fresh draws from the same streams
                randn(x.shape, gens, device=device)
            labels = _labels(model, args, gens, device)
            return editing.denoise(model, x, args.sigma, steps, class_labels=labels, generator=gens)

        columns.append(
            _batched(run, noisy, seeds, args.batch, not args.no_progress, f"denoise ({plural(steps, 'step')})")
        )
    out = torch.stack(columns, 1)
    headers = (["reference"] if reference is not None else []) + [f"noisy {args.sigma:g}"]
    headers += [f"{s} step" + ("s" if s > 1 else "") for s in args.steps]
    return Panel(
        headers,
        to_uint8(out.flatten(0, 1)).reshape(n, len(args.steps), *out.shape[3:], out.shape[2]),
        None if reference is None else to_uint8(reference),
        to_uint8(noisy),
        np.array(seeds)[:, None].repeat(len(args.steps), 1),
        {"steps": np.array(args.steps)},
    )


def _interpolate(model, args, channels, size, device) -> Panel:
    pairs = list(zip(args.seeds[::2], args.seeds[1::2]))
    z = [randn((channels, size, size), torch.Generator().manual_seed(s)) for pair in pairs for s in pair]
    z1, z2 = torch.stack(z[::2]).to(device), torch.stack(z[1::2]).to(device)
    labels = _labels(model, args, generators_from_seeds([a for a, _ in pairs]), device)
    out = editing.interpolate(model, z1, z2, args.num, class_labels=labels)
    check_finite(out, f"seeds {args.seeds}")
    alphas = np.linspace(0, 1, args.num)
    return Panel(
        [f"a = {a:.2f}" for a in alphas],
        to_uint8(out.flatten(0, 1)).reshape(len(pairs), args.num, *out.shape[3:], out.shape[2]),
        seeds=np.array(pairs),
        extra={"alphas": alphas},
    )


# --- outputs ---------------------------------------------------------------------------------------------------------


def render_panel(rows: list[list[np.ndarray]], headers: list[str], title: str, cell: int = 96) -> np.ndarray:
    """A labelled grid: `rows` of (H, W, C) uint8 images (small ones enlarged, nearest), column headers on top."""
    h, w = rows[0][0].shape[:2]
    scale = max(1, cell // max(h, w))
    ch, cw, pad = h * scale, w * scale, 6
    font = label_font(max(11, min(16, cw // 7)))
    ncols = max(len(r) for r in rows)
    text_h = font.getbbox("Ag")[3] + 6
    width = max(ncols * (cw + pad) + pad, int(font.getlength(title)) + 2 * pad)
    height = 2 * text_h + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), title, fill="black", font=font)
    for j, header in enumerate(headers):
        x = pad + j * (cw + pad) + (cw - font.getlength(header)) / 2
        draw.text((max(x, 0), text_h + 2), header, fill=(60, 60, 60), font=font)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
            canvas.paste(tile.resize((cw, ch), Image.NEAREST), (pad + j * (cw + pad), 2 * text_h + i * (ch + pad)))
    return np.asarray(canvas)


def _write(args, model, panel: Panel, sigmas, evaluations: int | None, seconds: float) -> None:
    n, k = panel.results.shape[:2]
    rows = []
    for i in range(n):
        row = [] if panel.reference is None else [panel.reference[i]]
        row += [] if panel.degraded is None else [panel.degraded[i]]
        rows.append(row + list(panel.results[i]))
    if args.task == "denoise":
        evaluations = list(args.steps)
    elif evaluations is None:  # interpolation: one evaluation per image
        evaluations = 1
    count = ", ".join(str(e) for e in evaluations) if isinstance(evaluations, list) else str(evaluations)
    name = f"{args.model} (random weights)" if args.model in NETWORK_PRESETS else args.model
    title = f"{args.task} - {name} - {count} evaluation(s) per result"
    png = os.path.join(args.out, f"{args.task}.png")
    save_png(png, render_panel(rows, panel.headers, title))
    arrays = {"images": panel.results.reshape(n * k, *panel.results.shape[2:]), "results": panel.results}
    if panel.reference is not None:
        arrays["reference"] = panel.reference
    if panel.degraded is not None:
        arrays["degraded"] = panel.degraded
    arrays.update(seeds=panel.seeds, **panel.extra)
    if sigmas is not None:
        arrays["sigmas"] = np.array(sigmas)
    npz = os.path.join(args.out, f"{args.task}.npz")
    save_npz(npz, **arrays)
    run = {
        "task": args.task,
        "model": args.model,
        "input": args.input,
        "sigmas": sigmas,
        "evaluations": evaluations,
        "seed": args.seed,
        "results": [n, k],
        "device": str(next(model.parameters()).device),
        "dtype": args.dtype,
        "seconds": seconds,
        "torch": torch.__version__,
    }
    run.update({key: getattr(args, key) for key in _TASK_ARGS.get(args.task, ())})
    atomic_write_bytes(os.path.join(args.out, f"{args.task}.json"), json.dumps(run, indent=2).encode())
    print(f"wrote {png}, {npz} and {args.task}.json: {n} x {k} results, {count} evaluation(s) each, {seconds:.2f} s")


_TASK_ARGS = {
    "inpaint": ("mask",),
    "super_resolve": ("factor",),
    "denoise": ("sigma", "steps", "noisy"),
    "interpolate": ("seeds", "num"),
}
