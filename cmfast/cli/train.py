"""`cmfast train-edm`, `cmfast distill`, `cmfast train-ct`, `cmfast train-sct`, `cmfast distill-scd` (the
command-line edge of the trainer) and `cmfast demo`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..pipeline import CD_STEPS, CD_STEPS_AFTER_TRAINING, SHIPPED_TEACHER, TEACHER_STEPS, demo_processes, run_pipeline
from ..streaming import open_dataset, write_shards
from ..training.config import TRAIN_PRESETS, TrainConfig, preset_config
from ..training.trainer import Trainer
from .common import check_out_dir, positive

COMMANDS = {
    "train-edm": ("edm", "train an EDM teacher (denoiser) with EDM's loss", "digits-edm"),
    "distill": ("cd", "consistency distillation of an EDM teacher (Algorithm 2)", "digits-cd"),
    "train-ct": ("ct", "consistency training from scratch (Algorithm 3; --ict for improved CT)", "digits-ct"),
    "train-sct": ("sct", "continuous-time consistency training (sCT, TrigFlow; Lu & Song 2025)", "digits-sct"),
    "distill-scd": (
        "scd",
        "continuous-time consistency distillation of an EDM teacher (sCD, TrigFlow; Lu & Song 2025)",
        "digits-scd",
    ),
}
TEACHER_COMMAND_KINDS = ("cd", "scd")

# CLI flag -> TrainConfig field, for the overrides every command accepts.
OVERRIDES = {
    "data": "dataset",
    "network": "network",
    "steps": "total_steps",
    "batch": "batch_size",
    "accum": "accum",
    "micro_batch": "micro_batch",
    "sharding": "sharding",
    "lr": "lr",
    "lr_decay": "lr_decay",
    "ema_warmup": "ema_warmup",
    "ema": "ema_rates",
    "dropout": "dropout",
    "precision": "mixed_precision",
    "seed": "seed",
    "log_every": "log_every",
    "checkpoint_every": "checkpoint_every",
    "keep": "keep_checkpoints",
    "sample_every": "sample_every",
    "max_bad_steps": "max_bad_steps",
}
CD_OVERRIDES = {
    "teacher": "teacher",
    "distance": "distance",
    "num_scales": "num_scales",
    "solver": "solver",
    "target_ema": "target_ema",
}
CT_OVERRIDES = {"distance": "distance", "s0": "s0", "s1": "s1", "mu0": "mu0", "mu_variant": "mu_variant"}
SCM_OVERRIDES = {
    "p_mean": "p_mean",
    "p_std": "p_std",
    "tangent_warmup": "tangent_warmup",
    "tangent_c": "tangent_c",
    "time_cond": "time_cond",
    "time_scale": "time_scale",
    "adaptive_double_norm": "adaptive_double_norm",
    "logvar_head": "logvar_head",
}


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated EMA rates, got {text!r}")


def register(sub) -> None:
    """Add the training commands and demo to an argparse subparsers object."""
    for name, (kind, help_text, default_preset) in COMMANDS.items():
        presets = [p for p, v in TRAIN_PRESETS.items() if v["kind"] == kind]
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. Starts from a preset ({', '.join(presets)}); flags "
            "override its fields. Writes config.json, log.jsonl, checkpoints/, samples/ and model.safetensors into "
            "--run-dir; --resume continues from the newest readable checkpoint there.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--preset", choices=presets, help=f"training preset (default: {default_preset})")
        p.add_argument("--run-dir", required=True, help="directory for this run's outputs")
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (its config.json rules)")
        p.add_argument(
            "--data",
            help="dataset: digits8/digits16/digits32 (in memory), or streamed from disk: an image folder, a .zip of "
            "images (EDM's layout, labels from its dataset.json), .tar shards or .npz shards (one file, a range "
            "such as 'shards/train-{0000..0099}.tar', or a glob)",
        )
        if kind not in TEACHER_COMMAND_KINDS:
            p.add_argument("--network", help="network preset (see `cmfast info PRESET`)")
        p.add_argument("--steps", type=int, help="total optimizer steps K (on --resume: train on to step K)")
        p.add_argument("--batch", type=int, help="global batch size (split over torchrun processes)")
        p.add_argument(
            "--accum",
            type=int,
            help="gradient accumulation: micro-batches per optimizer step on each process (1 when not given); the "
            "update equals one step on the whole --batch, with EMAs and schedules advancing once per step",
        )
        p.add_argument(
            "--micro-batch",
            type=int,
            help="per-process micro-batch instead of --accum: accum = batch / (processes x micro-batch), so the same "
            "command fits any number of GPUs",
        )
        p.add_argument(
            "--sharding",
            choices=["ddp", "fsdp"],
            help="with several processes: ddp replicates the models (when not given); fsdp shards the online, target "
            "and EMA weights and the optimizer state (FSDP2; checkpoints as torch.distributed.checkpoint "
            "directories; fp32 or bf16)",
        )
        p.add_argument(
            "--workers",
            type=int,
            help="DataLoader processes that read and decode streamed data ahead of training (default: 0 for the "
            "digits, else the cores per process less one, 1..8)",
        )
        p.add_argument("--lr", type=float, help="RAdam learning rate")
        p.add_argument(
            "--lr-decay",
            type=float,
            help="fraction of the run at its end (0..1) over which the learning rate falls linearly towards 0 "
            "(default 0: constant)",
        )
        p.add_argument("--ema", type=_rates, help="online EMA rates, e.g. 0.999,0.9999")
        p.add_argument(
            "--ema-warmup",
            action="store_true",
            default=None,
            help="online EMAs decay at min(rate, (1 + k) / (10 + k)) at step k, so a short run's average does not "
            "keep its initial weights",
        )
        p.add_argument("--dropout", type=float, help="override the network's dropout")
        p.add_argument("--precision", choices=["no", "bf16", "fp16"], help="mixed precision (fp32 master weights)")
        p.add_argument("--seed", type=int, help="seed of initial weights, data order and noise")
        p.add_argument("--log-every", type=int, help="steps between log lines")
        p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
        p.add_argument("--keep", type=int, help="checkpoints to keep")
        p.add_argument("--sample-every", type=int, help="training images between sample grids (0: only at the end)")
        p.add_argument(
            "--max-bad-steps", type=int, help="consecutive skipped (non-finite) steps tolerated; one more stops the run"
        )
        p.add_argument("--device", help="torch device (default: this process's GPU under torchrun, else cpu)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.add_argument(
            "--fused",
            action="store_true",
            help="run GroupNorm+SiLU and attention through cmfast.ops (C++/CUDA extension or Triton kernels)",
        )
        if kind in TEACHER_COMMAND_KINDS:
            p.add_argument(
                "--teacher",
                help="EDM teacher: a checkpoint from train-edm (.safetensors), an official edm_*.pt file, or a shipped "
                "teacher's name (digits-edm)",
            )
        if kind in ("sct", "scd"):
            p.add_argument("--p-mean", type=float, help="proposal: mean of ln(sigma_d tan t)")
            p.add_argument("--p-std", type=float, help="proposal: standard deviation of ln(sigma_d tan t)")
            p.add_argument("--tangent-warmup", type=int, help="steps of the tangent warm-up (0: none)")
            p.add_argument("--tangent-c", type=float, help="c of the tangent normalisation g / (||g|| + c)")
            p.add_argument(
                "--time-cond",
                choices=["t", "edm", "adm"],
                help="the network's time input: t, or EDM's c_noise of sigma_d tan t (sCD default: the teacher's)",
            )
            p.add_argument("--time-scale", type=float, help="network option: c_noise multiplier before the embedding")
            p.add_argument(
                "--adaptive-double-norm",
                action="store_true",
                default=None,
                help="network option: scale-shift conditioning with pixel-normalised scale and shift",
            )
            p.add_argument(
                "--no-logvar-head",
                dest="logvar_head",
                action="store_false",
                default=None,
                help="no adaptive weighting (the network's logvar head)",
            )
            p.add_argument(
                "--graph",
                action="store_true",
                help="refused: the sCM step's torch.func.jvp is not captured in a CUDA graph",
            )
        if kind == "cd":
            p.add_argument("--num-scales", type=int, help="N, points of the Karras grid")
            p.add_argument("--solver", choices=["heun", "euler"], help="teacher ODE solver")
            p.add_argument("--target-ema", type=float, help="mu, EMA rate of the target network")
            p.add_argument(
                "--graph",
                action="store_true",
                help="run each step as one captured CUDA graph (teacher, target, online forward/backward, RAdam, "
                "EMAs); needs CUDA, one process, --dropout 0 and --precision no/bf16 (falls back to eager on a CPU)",
            )
        if kind == "ct":
            p.add_argument("--s0", type=int, help="initial discretization steps")
            p.add_argument("--s1", type=int, help="final discretization steps")
            p.add_argument("--mu0", type=float, help="initial target EMA rate")
            p.add_argument("--mu-variant", choices=["paper", "official"], help="mu(k) with N(k) or N(k) - 1")
            p.add_argument(
                "--ict",
                action="store_true",
                default=None,
                help="all improved-CT options and settings (pseudo-Huber, s0=10, s1=1280, iCT's dropout and Fourier "
                "scale); flags that name a setting still win",
            )
            p.add_argument(
                "--rescale-schedule",
                action="store_true",
                help="with --resume --steps K: stretch N(k) and mu(k) over the new K (they jump); by default the "
                "schedule keeps the K the run started with",
            )
        if kind in ("cd", "ct"):
            p.add_argument(
                "--distance",
                choices=["l2", "l1", "l2-32", "lpips", "lpips-alex", "pseudo-huber"],
                help="distance d of the consistency loss",
            )
        p.set_defaults(handler=run_command, kind=kind, default_preset=default_preset)

    p = sub.add_parser(
        "prepare-data",
        help="write a dataset as tar shards, .npz shards or an EDM-style zip, for streaming to training",
        description="Read SOURCE (an image folder, a zip, shards, or the digits) and write it for streaming: OUT "
        "ending in .tar gives tar shards OUT-000000.tar, ... (WebDataset layout, labels as .cls members); .npz gives "
        ".npz shards of memory-mappable arrays; .zip gives one zip with a dataset.json (EDM's layout). Prints the "
        "--data value to train from. Each file is written atomically.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="dataset to read: an image folder, a .zip, .tar or .npz shards, or digits<size>")
    p.add_argument("out", help="output: DIR/NAME.tar, DIR/NAME.npz or DIR/NAME.zip")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per .tar or .npz shard")
    p.add_argument(
        "--members",
        choices=["png", "npy"],
        default="png",
        help="how tar and zip members store images: png (lossless, small) or npy (raw pixels: no decoding when "
        "training reads them, several times faster, about twice the bytes)",
    )
    p.add_argument("--resolution", type=int, help="resize every (square) image to this side, LANCZOS")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=cmd_prepare_data)

    p = sub.add_parser(
        "demo",
        help="the main job: distill a digits teacher, compare 1- and 2-step samples with it (CPU, minutes)",
        description="Consistency distillation on the built-in digits (scikit-learn's 8x8 handwritten digits): distill "
        f"the shipped EDM teacher ({SHIPPED_TEACHER}, or --teacher) into a consistency model, sample the same seeds "
        "with the teacher's Heun sampler and the student at one and two steps, write PNG grids side by side "
        "(panel.png) and print a table of steps, network evaluations and time. --train-teacher runs the whole "
        "pipeline: it trains a small EDM teacher first (several times as long). The run directories (cd/, and "
        "teacher/ when trained) hold configs, logs and checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--teacher",
        help=f"the EDM teacher to distill: a shipped name or a model file (default {SHIPPED_TEACHER}); not with "
        "--train-teacher",
    )
    p.add_argument(
        "--train-teacher", action="store_true", help="train a digits EDM teacher first and distill it instead"
    )
    p.add_argument(
        "--teacher-steps", type=int, default=TEACHER_STEPS, help="optimizer steps of the teacher (--train-teacher)"
    )
    p.add_argument(
        "--cd-steps",
        type=int,
        help=f"optimizer steps for consistency distillation (default {CD_STEPS}; {CD_STEPS_AFTER_TRAINING} after "
        "--train-teacher)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, noise and samples")
    p.add_argument("--out", default="demo", help="output directory (must not hold an earlier run)")
    p.add_argument(
        "--processes",
        type=int,
        default=demo_processes(),
        help="training processes, data parallel on the CPU, each with an equal share of the threads (default 1: "
        "on an idle machine threads are faster; the result is the same up to rounding)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(handler=cmd_demo)


def _flag_table(kind: str) -> dict[str, str]:
    extra = {
        "cd": CD_OVERRIDES,
        "ct": {**CT_OVERRIDES, "ict": "ict"},
        "sct": SCM_OVERRIDES,
        "scd": {**SCM_OVERRIDES, "teacher": "teacher"},
    }.get(kind, {})
    return {**OVERRIDES, **extra}


def _same(given, stored) -> bool:
    if isinstance(given, tuple | list) and isinstance(stored, tuple | list):
        return tuple(given) == tuple(stored)
    return given == stored


def resume_config(args, data: dict) -> TrainConfig:
    """The run's own config (config.json) for --resume. --steps may change the run's end (the schedule's K stays
    unless --rescale-schedule, and either way a line says so); --teacher may point to a moved teacher (the trainer
    checks its hash). Every other flag must agree with the run's value: it is refused, never silently ignored."""
    if getattr(args, "preset", None) is not None:
        raise ValueError("--resume continues the run's own config.json; drop --preset")
    fixed = {k: v for k, v in _flag_table(args.kind).items() if k not in ("steps", "teacher")}
    for flag, field in fixed.items():
        given = getattr(args, flag, None)
        if given is not None and not _same(given, data.get(field)):
            raise ValueError(
                f"--resume: --{flag.replace('_', '-')} {given} differs from the run's {field} = {data.get(field)} "
                "(config.json); drop it, or start a new --run-dir"
            )
    if (
        args.kind in TEACHER_COMMAND_KINDS
        and args.teacher is not None
        and Path(args.teacher).resolve() != Path(data["teacher"])
    ):
        print(f"cmfast: --resume: teacher {data['teacher']} replaced by {args.teacher} (checked by SHA-256)")
        data["teacher"] = args.teacher
    if args.kind == "ct" and data.get("schedule_steps") is None:
        data["schedule_steps"] = data["total_steps"]  # a run from before schedules were pinned: keep its K
    if args.steps is not None and args.steps != data["total_steps"]:
        if args.kind == "ct":
            old = data["schedule_steps"]
            if getattr(args, "rescale_schedule", False):
                data["schedule_steps"] = args.steps
                print(
                    f"cmfast: --rescale-schedule: the schedule's K changes from {old} to {args.steps}; "
                    "N(k) and mu(k) jump"
                )
            else:
                print(
                    f"cmfast: training to step {args.steps}; N(k) and mu(k) keep K = {old} "
                    "(--rescale-schedule stretches them)"
                )
        data["total_steps"] = args.steps
    elif getattr(args, "rescale_schedule", False):
        raise ValueError("--rescale-schedule needs --resume --steps K with a new K")
    return TrainConfig.from_dict(data)


def train_config(args) -> TrainConfig:
    """The preset with the flags applied, or (on --resume) the run's own config (see `resume_config`)."""
    run_dir = Path(args.run_dir)
    if getattr(args, "lr", None) is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {args.lr}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise ValueError(f"--seed must not be negative, got {args.seed}")
    if args.resume:
        path = run_dir / "config.json"
        if not path.is_file():
            raise ValueError(f"--resume: {path} not found; is {run_dir} a cmfast run directory?")
        data = json.loads(path.read_text())
        data = {k: v for k, v in data.items() if k in TrainConfig.__dataclass_fields__}
        if data.get("kind") != args.kind:
            raise ValueError(f"--resume: {run_dir} holds a {data.get('kind')!r} run, not {args.kind!r}")
        return resume_config(args, data)
    if getattr(args, "rescale_schedule", False):
        raise ValueError("--rescale-schedule applies only to --resume --steps K")
    overrides = {field: getattr(args, flag, None) for flag, field in _flag_table(args.kind).items()}
    return preset_config(args.preset or args.default_preset, **overrides)


def run_command(args) -> None:
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must not be negative, got {args.workers}")
    config = train_config(args)
    trainer = Trainer(
        config,
        args.run_dir,
        resume=args.resume,
        progress=not args.no_progress,
        device=args.device,
        graph=getattr(args, "graph", False),
        fused=args.fused,
        workers=args.workers,
    )
    path = trainer.train()
    if trainer.dist.is_main:
        print(f"wrote {path} (step {trainer.step}); samples in {Path(args.run_dir) / 'samples'}")


def cmd_prepare_data(args) -> None:
    positive("--shard-size", args.shard_size)
    if args.resolution is not None:
        positive("--resolution", args.resolution)
    dataset = open_dataset(args.source)
    spec = write_shards(dataset, args.out, args.shard_size, args.members, args.resolution, not args.no_progress)
    print(f"wrote {len(dataset)} images; train with --data '{spec}'")


def cmd_demo(args) -> None:
    positive("--teacher-steps", args.teacher_steps)
    if args.cd_steps is not None:
        positive("--cd-steps", args.cd_steps)
    positive("--processes", args.processes)
    if args.train_teacher and args.teacher is not None:
        raise ValueError("--teacher names a teacher to distill, --train-teacher trains one: give one of them")
    check_out_dir(args.out)
    print(
        run_pipeline(
            args.out,
            args.cd_steps,
            seed=args.seed,
            progress=not args.no_progress,
            processes=args.processes,
            teacher=SHIPPED_TEACHER if args.teacher is None else args.teacher,
            teacher_steps=args.teacher_steps if args.train_teacher else 0,
        )
    )
