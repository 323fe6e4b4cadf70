"""One sCM training step (Lu & Song 2025): images/s, saved-for-backward bytes and peak memory, random weights and data.

The step as `cmfast distill-scd` (or `train-sct`) runs it, through cmfast.training.scm.SCMLoss: the teacher's PF-ODE
velocity (sCD: one EDM-teacher evaluation without gradients; sCT: the data's velocity), the tangent
cos(t) sin(t) dF^-/dt by one torch.func.jvp of the student without gradients, the student's forward with its logvar
head, the adaptive-weighted loss, its backward, RAdam and one EMA update. Every row runs on the same device in one
run, with cudnn.benchmark on; each torch.compile row in a fresh process of its own, which Dynamo's state from earlier
rows cannot reach. Rows, per network, batch, objective and precision:
  eager-<p>-nchw        the reference a user would run: the plain network, torch.func.jvp, eager PyTorch, NCHW;
                        attention through SDPA on unit-stride q/k/v (ADM's own attention; DDPM++'s fp32 einsum is
                        swapped for SDPA while the row runs), SDPA's math kernel inside the JVP (its fused kernels
                        have no forward mode), the fastest kernel elsewhere
  eager-<p>-cl          the same in channels_last; the faster of the two is the eager baseline (x_eager = 1)
  cmfast-fused-<p>      as `--fused` runs it: set_fused_ops on student and teacher (GroupNorm+SiLU, and ADM's
                        attention, through cmfast.ops, whose autograd.Functions carry forward-mode rules),
                        TrigFlowModel.skip_out_op = cmfast.ops.trig_skip_out; NCHW; the networks' own attention
                        (DDPM++: the einsum; ADM: the fused op where a kernel runs, else SDPA)
  compile-<mode>-<p>    torch.compile(fullgraph=True) of the loss (teacher, JVP, student forward, loss; the backward
                        through AOTAutograd), in the eager baseline's memory format; where torch.compile cannot
                        trace the torch.func.jvp the row gives the one-line reason instead of a figure
  compile-nets-<mode>-<p>  torch.compile of the two backbones (student and teacher), as `model = torch.compile(model)`
                        would: Dynamo does not trace torch.func.jvp of a compiled module called from eager, so the
                        JVP runs eager; the teacher's and the student's forward (and backward) run compiled
<p>: fp32 everywhere; on CUDA also bf16 (autocast of both networks, float32 master weights). On a CPU the rows run
float32 only: the CPU's bf16 convolutions are emulated (`python -m bench cd-step` measures bf16 autocast at 0.75x of
float32 on the CI machine's CPU). <mode>: default; max-autotune with --max-autotune.
Networks: DDPM++ (CIFAR-10) at batch 512 and ADM-64 at batch 64 on a GPU; on a CPU the digits network
(ddpmpp-digits8) at batch 32 and adm-tiny (16x16, attention at 8x8) at batch 16. Dropout 0 in every row (the sCD
presets'; the sCT presets' 0.2 is left out: with dropout the loss replays torch's RNG state, which torch.compile
cannot trace).
Each row: the median of at least 5 timings after a warm-up step (each a median over repeated steps, one step per
timing when a step outlasts 300 ms on a CPU), their minimum and maximum, images/s; the activation bytes autograd saves
for backward per image (cmfast.training.memory.saved_bytes: each storage once, weights apart; not in the torch.compile
rows, where Dynamo traces the hook and runs eager); the step's peak memory above what lives before it
(bench.common.step_peak_bytes: torch.cuda.max_memory_allocated on CUDA, torch.profiler's memory events on a CPU), and
on CUDA also max_memory_allocated over the row; x_eager: the eager baseline's milliseconds over the row's, same
network, batch, objective and precision, same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import multiprocessing
import os
import re
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from cmfast import ops
from cmfast.networks import ADMConfig, build_network, network_config, set_fused_ops
from cmfast.preconditioning import EDMDenoiser, TrigFlowModel
from cmfast.training.memory import saved_bytes
from cmfast.training.scm import SCMLoss

from .common import failure, fresh_device, machine, select_models, table, time_step, write_results
from .sampling import sdpa_attention

GPU_CASES = {"ddpmpp-cifar10": 512, "adm-imagenet64": 64}  # preset: batch
CPU_CASES = {"ddpmpp-digits8": 32, "adm-tiny": 16}
KINDS = ("scd", "sct")
MIN_REPS = 5
SUMMARY_COLUMNS = [
    "model", "batch", "kind", "variant", "precision", "format", "attention", "ms", "ms_min", "ms_max", "images_s",
    "saved_mib_per_image", "step_peak_mib", "peak_mem_gib", "x_eager", "baseline", "load_1m", "note",
]  # fmt: skip
LABELS = {
    "eager": "unfused, torch.func.jvp, eager",
    "fused": "cmfast fused JVP kernels, eager",
    "compile": "torch.compile of the unfused step (loss, fullgraph)",
    "compile-nets": "torch.compile of the unfused networks (the JVP eager)",
}
SAVED_BYTES_COMPILED = (
    "not measured: under saved_tensors_hooks Dynamo traces the hook itself and falls back to eager, so the count "
    "would be the eager step's"
)
# the loss's settings: the sCD presets' proposal (imagenet64-scd, digits-scd), the tangent past its warm-up (r = 1)
P_MEAN, P_STD, TANGENT_WARMUP = -0.8, 1.6, 10_000


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one row runs the step."""

    dtype: torch.dtype | None = None  # autocast dtype of teacher and student; None: float32
    channels_last: bool = False  # networks and inputs in channels_last
    fused: bool = False  # cmfast's fused ops with their JVP rules (`--fused`)
    compile_mode: str | None = None  # torch.compile mode; None: eager
    compile_target: str | None = None  # "step": the loss, fullgraph; "nets": the two backbones
    sdpa: bool = True  # DDPM++'s einsum attention swapped for SDPA (the unfused rows)
    group: str | None = None  # "eager": the baseline group this row competes in

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def label(self) -> str:
        if self.compile_mode:
            return LABELS["compile-nets" if self.compile_target == "nets" else "compile"] + f", {self.compile_mode}"
        return LABELS["fused" if self.fused else "eager"]


def suite_variants(
    device: str, compile: bool, compile_modes: tuple[str, ...] = ("default",), best_eager: dict | None = None
) -> dict[str, Variant]:
    """The rows for one device, in the order they run (torch.compile's last: a run cut by its budget keeps the
    rest). best_eager: precision -> the eager baseline Variant measured so far, whose memory format the compile rows
    take (channels_last on CUDA before any is measured)."""
    out = {}
    precisions = [None, torch.bfloat16] if device == "cuda" else [None]
    for dtype in precisions:
        p = "bf16" if dtype is not None else "fp32"
        out[f"eager-{p}-nchw"] = Variant(dtype=dtype, group="eager")
        out[f"eager-{p}-cl"] = Variant(dtype=dtype, channels_last=True, group="eager")
        out[f"cmfast-fused-{p}"] = Variant(dtype=dtype, fused=True, sdpa=False)
    if compile:
        for dtype in precisions:
            p = "bf16" if dtype is not None else "fp32"
            best = (best_eager or {}).get(p)
            channels_last = best.channels_last if best is not None else device == "cuda"
            for mode in compile_modes:
                for target, name in (("step", f"compile-{mode}-{p}"), ("nets", f"compile-nets-{mode}-{p}")):
                    out[name] = Variant(
                        dtype=dtype, channels_last=channels_last, compile_mode=mode, compile_target=target
                    )
    return out


def select_cases(device: str, networks: list[str] | None = None, batch: int | None = None) -> dict[str, int]:
    """preset -> batch of the networks to run: the device's defaults, or `networks` in their order, each at `batch`
    when given, else at its default batch on either device (a preset without one needs `batch`)."""
    defaults = GPU_CASES if device == "cuda" else CPU_CASES
    if not networks:
        return {name: batch or b for name, b in defaults.items()}
    cases = {}
    for name in networks:
        network_config(name)  # an unknown name raises ValueError listing the presets
        known = defaults.get(name) or {**CPU_CASES, **GPU_CASES}.get(name)
        if batch is None and known is None:
            raise ValueError(f"{name} has no default batch here: give --batch")
        cases[name] = batch or known
    return cases


@dataclasses.dataclass
class Step:
    """One row's training step and what the measurements need from it."""

    run: object  # () -> loss: zero_grad, loss, backward, RAdam, EMA update
    loss: object  # () -> the scalar loss with its graph (no backward), for the saved-bytes count
    online: TrigFlowModel
    teacher: EDMDenoiser | None
    batch: int


def student_config(network, kind: str):
    """The student's network config: the preset's with dropout 0 and the logvar head (every sCM preset has it); sCT
    also with the TrigFlow time input at 1000 t (cifar10-sct, digits-sct) and, for ADM, the adaptive double
    normalisation (imagenet64-sct)."""
    config = dataclasses.replace(network_config(network), dropout=0.0, logvar_head=True)
    if kind == "sct":
        config = dataclasses.replace(config, time_scale=1000.0)
        if isinstance(config, ADMConfig):
            config = dataclasses.replace(config, adaptive_double_norm=True)
    return config


def make_step(network, batch: int, n_classes: int, kind: str, device: str, v: Variant, seed: int = 0) -> Step:
    """The step of one row. network: a preset name or a network config."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    config = student_config(network, kind)
    net = build_network(config)
    teacher = None
    if kind == "scd":  # the EDM teacher: the preset's network, the student starting from its weights
        teacher_net = build_network(dataclasses.replace(network_config(network), dropout=0.0))
        net.load_state_dict(teacher_net.state_dict(), strict=False)  # the logvar head stays new
        teacher = EDMDenoiser(teacher_net).to(device).eval().requires_grad_(False)
    online = TrigFlowModel(net, noise_cond=teacher.noise_cond if teacher is not None else "t").to(device).train()
    ema = copy.deepcopy(online).eval().requires_grad_(False)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    for m in (online, teacher):
        if m is None:
            continue
        m.to(memory_format=fmt)
        m.autocast_dtype = v.dtype
        set_fused_ops(m.net, v.fused)
        if v.compile_target == "nets":
            m.net = torch.compile(m.net, mode=v.compile_mode, dynamic=False)
    online.skip_out_op = ops.trig_skip_out if v.fused else None
    loss_fn = SCMLoss(teacher, p_mean=P_MEAN, p_std=P_STD, tangent_warmup=TANGENT_WARMUP)
    optimizer = torch.optim.RAdam(online.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(seed + 1)
    shape = (batch, config.in_channels, config.resolution, config.resolution)
    images = (torch.rand(shape, device=device, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    labels = torch.randint(n_classes, (batch,), device=device, generator=g) if n_classes else None
    t, z = loss_fn.draw(images, g)
    z = z.contiguous(memory_format=fmt)
    k = TANGENT_WARMUP  # the tangent's full second term (r = 1)
    if v.compile_target == "step":
        compiled = torch.compile(loss_fn.loss_from_draws, mode=v.compile_mode, dynamic=False, fullgraph=True)

        def loss():
            return compiled(online, images, labels, k, t, z).mean()

    else:

        def loss():
            return loss_fn.loss_from_draws(online, images, labels, k, t, z).mean()

    ema_params, params = list(ema.parameters()), list(online.parameters())

    def run():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - 0.9999)
        return value

    return Step(run=run, loss=loss, online=online, teacher=teacher, batch=batch)


def compile_failure(e: Exception) -> str:
    """One line for a torch.compile failure: where it stopped (inside torch.func.jvp or not), Dynamo's own message,
    and the op and error it hit inside when the message carries them (a fake-tensor run that raised)."""
    text = str(e)
    head = "torch.compile cannot trace the step's torch.func.jvp" if "func.jvp" in text else "torch.compile failed"
    line = f"{head}: {failure(e)}"
    op = re.search(r"call_function <(?:function|built-in function|OpOverload[^>]*?) ?([\w.]+)", text)
    # the error inside, as Dynamo quotes it (a repr within a repr: the quote may come escaped); PyTorch's source
    # location and its request for a bug report are left out
    text = re.sub(r' at \\?"[^"]*?\\?"(:\d+)?|, please report a bug to PyTorch', "", text)
    inner = re.search(r"got (\w+(?:Error|Exception))\(\\?['\"](.+?)(?:\. |\\n|\\?['\"]\))", text)
    if op or inner:
        line += "; inside:"
        if op:
            line += f" {op.group(1)}"
        if inner:
            line += f" {inner.group(1)}: {inner.group(2)}"
    return " ".join(line.split())[:400]


def _attention(network, v: Variant, device: str) -> str:
    if isinstance(network_config(network), ADMConfig):
        if not v.fused:
            return "sdpa (adm's own)"
        backend = ops.explain("attention", torch.randn(1, 3 * 64, 64, device=device), 1).backend
        return "sdpa (no fused attention kernel here)" if backend == "torch" else f"cmfast fused op ({backend})"
    return "sdpa (swapped in)" if v.sdpa else "einsum fp32 (the network's own)"


def fused_backends(device: str) -> dict[str, str]:
    """The backend cmfast.ops' dispatch picks on this device for the fused ops' forward and forward-mode rules
    (float32 NCHW inputs; an ADM-64-like attention shape)."""
    out = {}
    x = torch.randn(2, 64, 8, 8, device=device)
    qkv = torch.randn(2, 3 * 64, 64, device=device)
    for op, args in (("group_norm_silu", (x, None, None, 32)), ("group_norm_silu_jvp", (x, None, None, 32)),
                     ("attention", (qkv, 1)), ("attention_jvp", (qkv, 1))):  # fmt: skip
        try:
            out[op] = ops.explain(op, *args).backend
        except Exception as e:  # noqa: BLE001 (a backend error is the answer)
            out[op] = failure(e)
    return out


def _git_state() -> dict:
    """The commit the bench ran from, and whether tracked files differed from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True,
                                timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode:
        return {}
    return {
        "commit": commit.stdout.strip(),
        "tracked_files_modified": sorted(ln[3:] for ln in status.stdout.splitlines()),
    }


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str | None = None,
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
    batch: int | None = None,
    reps: int = MIN_REPS,
    kinds: list[str] | None = None,
    max_autotune: bool = False,
    on_row=None,
) -> tuple[list[dict], dict]:
    """Every row of the chosen networks (`models`, default: the device's), objectives (`kinds`, default sCD) and
    variants; compile_mode "max-autotune" (or max_autotune) adds the max-autotune rows to the default ones.
    on_row(rows, setup): called after each row with the rows so far (to save them as they come)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    compile = device == "cuda" if compile is None else compile
    modes = ("default", "max-autotune") if max_autotune or compile_mode == "max-autotune" else ("default",)
    cases = select_cases(device, models, batch)
    if quick:
        cases = dict(list(cases.items())[:1])
    kinds = list(kinds or ["scd"])
    for kind in kinds:
        if kind not in KINDS:
            raise SystemExit(f"--kind: {kind} is not one of {', '.join(KINDS)}")
    wanted = set(select_models(suite_variants(device, True, ("default", "max-autotune")), variants, "--variants"))
    deadline = time.monotonic() + budget_s
    setup = {"fused_backends": fused_backends(device), "git": _git_state(), "objective": _objective()}
    rows = []
    best: dict = {}  # (preset, kind) -> {precision: (Variant, ms)}
    for compiled_phase in (False, True):
        for preset, b in cases.items():
            n_classes = network_config(preset).num_classes
            for kind in kinds:
                s = best.setdefault((preset, kind), {})
                eager = {p: vm[0] for p, vm in s.items()}
                for name, v in suite_variants(device, compile, modes, eager).items():
                    if name in wanted and bool(v.compile_mode) == compiled_phase:
                        args = (preset, b, n_classes, kind, device, name, v, reps, deadline)
                        row = isolated_row(*args) if v.compile_mode else measure_row(*args)
                        rows.append(row)
                        log(_line(row))
                        if on_row is not None:
                            on_row(rows, setup)
                        if v.group == "eager" and "ms" in row and row["ms"] < s.get(v.precision, (None, 1e30))[1]:
                            s[v.precision] = (v, row["ms"])
    return rows, setup


def _objective() -> dict:
    return dict(p_mean=P_MEAN, p_std=P_STD, tangent_r=1.0, dropout=0.0, optimizer="RAdam", ema_rates=[0.9999])


def isolated_row(*args) -> dict:
    """measure_row(*args) in a fresh spawned process with this one's thread count: Dynamo's caches and state from
    earlier rows cannot reach it (in one process, after a failed trace of the JVP, a later row's compile of the
    networks failed where it succeeds alone)."""
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(_row_in_child, torch.get_num_threads(), *args).result()
    except Exception as e:  # noqa: BLE001 (a crashed worker is a result to report)
        preset, batch, _, kind, _, name, v = args[:7]
        return dict(model=preset, batch=batch, kind=kind, variant=name, label=v.label, group=v.group,
                    precision=v.precision, skipped=f"the row's process failed: {failure(e)}")  # fmt: skip


def _row_in_child(threads: int, *args) -> dict:
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # as in the parent (run)
    return measure_row(*args)


def measure_row(preset, batch, n_classes, kind, device, name, v: Variant, reps: int, deadline: float) -> dict:
    """One measured row, or one with the reason it was not measured."""
    row = dict(model=preset, batch=batch, kind=kind, variant=name, label=v.label, group=v.group)
    row.update(
        precision=v.precision,
        format="channels_last" if v.channels_last else "nchw",
        attention=_attention(preset, v, device),
    )
    if time.monotonic() > deadline:
        return {**row, "skipped": "the suite's time budget ran out"}
    row["load_1m"] = os.getloadavg()[0]
    try:
        with sdpa_attention() if v.sdpa else contextlib.nullcontext():
            ms = _measure(preset, batch, n_classes, kind, device, v, reps, row)
    except Exception as e:  # noqa: BLE001 (an OOM, a compile failure is a result to report)
        return {**row, "skipped": compile_failure(e) if v.compile_target == "step" else failure(e)}
    row.update(ms=ms, images_s=batch / ms * 1e3, load_1m_after=os.getloadavg()[0])
    return row


def _measure(preset, batch, n_classes, kind, device, v: Variant, reps: int, row: dict) -> float:
    """Times one row's step into row (first step, repetitions, saved bytes, peak memory, Dynamo's counts) and returns
    its median milliseconds."""
    fresh_device(device)
    from torch._dynamo.utils import counters  # Dynamo's counters run over the process: differences per row

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    unsupported = dict(counters["unimplemented"])
    if v.compile_mode:
        torch._dynamo.reset()
    step = make_step(preset, batch, n_classes, kind, device, v)
    timing = time_step(step.run, device, repeats=reps, slow=device == "cpu")  # first call: with compiling
    row.update({k: val for k, val in timing.items() if k != "ms"})
    if v.compile_mode:  # proof that it compiled, and what Dynamo declined (the JVP of a compiled module)
        row["dynamo_graphs"] = counters["stats"]["unique_graphs"] - graphs
        row["dynamo_graph_breaks"] = sum(counters["graph_break"].values()) - breaks
        new = [k for k, n in counters["unimplemented"].items() if n > unsupported.get(k, 0)]
        declined = sorted({k.splitlines()[0].strip() for k in new})
        row["dynamo_unsupported"] = declined
        if v.compile_target == "nets":
            eager_jvp = any("functorch" in k for k in declined)
            row["note"] = "the JVP ran eager (Dynamo: " + (
                "torch.func.jvp of a compiled module called from eager is not supported)"
                if eager_jvp
                else "no functorch refusal recorded in this row)"
            )
        row["saved_bytes_error"] = SAVED_BYTES_COMPILED
    else:
        counted = saved_bytes(step.loss, batch, [*step.online.parameters(), *step.online.buffers()])
        row["saved_mib_per_image"] = counted.per_image / 2**20
        step.online.zero_grad(set_to_none=True)
    return timing["ms"]


def _line(row: dict) -> str:
    head = f"{row['model']:16s} b={row['batch']:<4d} {row['kind']} {row['variant']:26s}"
    if "skipped" in row:
        return f"{head} {row['skipped']}"
    saved = row.get("saved_mib_per_image")
    saved = f"{saved:7.3f} MiB/img saved" if saved is not None else "saved bytes not measured"
    return (
        f"{head} {row['ms']:9.1f} ms [{row['ms_min']:.1f}, {row['ms_max']:.1f}]  {row['images_s']:8.1f} img/s  "
        f"{saved}  step peak {row['step_peak_mib']:8.1f} MiB  load {row['load_1m']:.2f}"
    )


def summary(rows: list[dict]) -> list[dict]:
    """Every row (those not run with their reason in `note`), with x_eager: the fastest eager row's milliseconds
    over the row's, among rows of the same network, batch, objective and precision timed in this run."""
    out = []
    for r in rows:
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        if "skipped" in r:
            line["note"] = r["skipped"]
            out.append(line)
            continue
        key = (r["model"], r["batch"], r["kind"], r["precision"])
        eager = [s for s in rows if "ms" in s and s.get("group") == "eager"]
        eager = [s for s in eager if (s["model"], s["batch"], s["kind"], s["precision"]) == key]
        if eager:
            base = min(eager, key=lambda s: s["ms"])
            line["x_eager"] = base["ms"] / r["ms"]
            if base is r:
                line["baseline"] = "eager"
        out.append(line)
    return out


def _reps(text: str) -> int:
    if not text.isdigit() or int(text) < MIN_REPS:
        raise argparse.ArgumentTypeError(f"at least {MIN_REPS} timed repetitions per row, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return int(text)


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench scm-step",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--network",
        type=_names,
        help="comma-separated presets, run in this order (default: ddpmpp-cifar10,adm-imagenet64 on a GPU, "
        "ddpmpp-digits8,adm-tiny on a CPU); any preset of cmfast.networks.NETWORK_PRESETS (one without a default "
        "batch needs --batch)",
    )
    p.add_argument("--batch", type=_positive, help="batch of every network (default: each network's, see below)")
    p.add_argument("--kind", type=_names, default=["scd"], help="comma-separated objectives: scd, sct (default: scd)")
    p.add_argument("--reps", type=_reps, default=MIN_REPS, help=f"timed repetitions per row (>= {MIN_REPS})")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include the torch.compile rows (default: on CUDA only; on a CPU Inductor compiles C++ for minutes)",
    )
    p.add_argument("--max-autotune", action="store_true", help="also the torch.compile rows in mode max-autotune")
    p.add_argument(
        "--variants",
        type=_names,
        help="comma-separated rows: eager-fp32-nchw, eager-fp32-cl, cmfast-fused-fp32, compile-default-fp32, "
        "compile-nets-default-fp32, compile-max-autotune-fp32, compile-nets-max-autotune-fp32, and on CUDA the "
        "same with bf16 (default: all that the other options select)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        help="CPU threads (torch.set_num_threads; default: torch's, one per core); recorded as cpu_threads",
    )
    p.add_argument("--budget-s", type=float, default=1e9, help="rows that would start later are listed as not run")
    p.add_argument("--out", help="results JSON path (default: bench/results/<device>-scm-step.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        select_cases(device, args.network, args.batch)
    except ValueError as e:
        raise SystemExit(f"--network: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"device: {info['device']}; torch {info['torch']}, triton {info.get('triton')}, {info['date']}")

    def save(rows, setup):  # after every row: a run stopped by a time limit keeps what it measured
        return write_results("scm-step", info, rows, {"setup": setup}, args.out)

    rows, setup = run(
        compile=args.compile,
        models=args.network,
        log=lambda s: print(s, flush=True),
        budget_s=args.budget_s,
        variants=args.variants,
        batch=args.batch,
        reps=args.reps,
        kinds=args.kind,
        max_autotune=args.max_autotune,
        on_row=save,
    )
    path = save(rows, setup)
    print(f"\n## scm-step ({info['device']}); full results: {path}\n")
    print(table(summary(rows), SUMMARY_COLUMNS))
