"""The paper's table in miniature on the built-in digits: train, search time points, evaluate, write the report.

    python bench/quality_digits.py                  # the full run (CPU, about 30 minutes on 2 cores)
    python bench/quality_digits.py --quick          # the same pipeline with small budgets (a few minutes)
    python bench/quality_digits.py --scm            # only the sCM students (sCT, sCD): train, evaluate at 1 and 2 steps

With the project's own commands (run in-process through `cmfast.cli.main`, printed as shell lines in the report) it
trains an EDM teacher, CD students with l2 and LPIPS, and CT with the paper's schedule and with the iCT options, all
students with the same number of steps; evaluates the teacher at 1, 2, 4, 8 and 18 Heun steps and every student at
1, 2 and 3 steps (the middle time points found by `cmfast tune-steps` on other seeds than the final evaluation's), all
with the digits FID of the shipped classifier against the 300-image test split; and writes docs/results-digits.md
(table, commands, seeds, machine), a plot of FID against network evaluations and a panel of sample grids.

LPIPS needs ImageNet AlexNet/VGG weights. When torch's hub cache lacks them (an offline machine), the LPIPS run uses
a randomly initialised AlexNet backbone (seeded, written into a private TORCH_HOME under the run directory) under the
lpips package's shipped linear heads; the report says which was used. LPIPS at 224x224 costs about 4 s per batch of
64 on 2 CPU cores, so the LPIPS student trains the same number of steps with a smaller batch (set in the budget).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Budget:
    teacher_steps: int  # EDM teacher optimizer steps (batch 64)
    student_steps: int  # every student: CD-l2, CD-LPIPS, CT, iCT
    lpips_batch: int  # CD-LPIPS batch (the others use the presets' 64)
    grid: int  # Karras grid that tune-steps indexes
    num_search: int  # images per FID evaluation in the time-point search
    num_eval: int  # images per final evaluation
    teacher_heun: tuple[int, ...] = (1, 2, 4, 8, 18)  # Heun steps of the teacher's evaluations
    student_steps_eval: tuple[int, ...] = (1, 2, 3)
    grid_images: int = 64  # images per sample grid
    ema: str | None = None  # EMA rate(s) of every run; None: the presets' 0.999


BUDGETS = {
    "full": Budget(teacher_steps=4000, student_steps=2000, lpips_batch=16, grid=40, num_search=1000, num_eval=2000),
    # a 0.999 EMA still remembers the initial weights after a few hundred steps, so the short runs average less
    "quick": Budget(
        teacher_steps=1000, student_steps=400, lpips_batch=8, grid=18, num_search=300, num_eval=500, ema="0.99"
    ),
    # the CI test of this script's machinery: seconds, meaningless numbers
    "tiny": Budget(
        teacher_steps=3,
        student_steps=2,
        lpips_batch=2,
        grid=6,
        num_search=12,
        num_eval=16,
        teacher_heun=(1, 2),
        grid_images=4,
    ),
}
SEED = 0  # training runs and the time-point search
EVAL_SEED = 1_000_000  # final evaluations: other images than the ones the search chose the time points on


@dataclass
class Student:
    name: str  # run directory name
    label: str  # row label in the report
    command: str  # distill or train-ct
    args: list[str] = field(default_factory=list)


STUDENTS = [
    Student("cd-l2", "CD (l2)", "distill", ["--preset", "digits-cd", "--distance", "l2"]),
    Student("cd-lpips", "CD (LPIPS)", "distill", ["--preset", "digits-cd", "--distance", "lpips-alex"]),
    Student("ct", "CT (paper schedule, l2)", "train-ct", ["--preset", "digits-ct"]),
    Student("ict", "CT (iCT options)", "train-ct", ["--preset", "digits-ict"]),
]


# Continuous-time consistency models (Lu & Song 2025), at the CD students' budget; evaluated at the paper's 1 and 2
# steps (sigma_max, then t_mid = 1.1), with no time-point search. `--scm` runs only these; the report takes their
# rows from OUT/scm-results.json when it exists.
SCM_STUDENTS = [
    Student("sct", "sCT (TrigFlow)", "train-sct", ["--preset", "digits-sct"]),
    Student("scd", "sCD (TrigFlow)", "distill-scd", ["--preset", "digits-scd"]),
]


class Runner:
    """Runs cmfast commands in this process and keeps their shell form and wall time for the report."""

    def __init__(self, out: Path, progress: bool):
        self.out = out
        self.progress = progress
        self.log: list[tuple[str, float]] = []

    def __call__(self, *argv: str, env: dict[str, str] | None = None, progress_flag: bool = True) -> float:
        from cmfast.cli import main

        argv = [str(a) for a in argv]
        if progress_flag and not self.progress:
            argv.append("--no-progress")
        shown = " ".join(shlex.quote(_display(a)) for a in argv)
        prefix = "".join(f"{k}={shlex.quote(_display(v))} " for k, v in (env or {}).items())
        print(f"$ {prefix}cmfast {shown}", flush=True)
        t0 = time.perf_counter()
        with _environment(env or {}):
            rc = main(argv)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"quality_digits: `cmfast {shown}` failed with exit code {rc}")
        self.log.append((f"{prefix}cmfast {shown}", seconds))
        return seconds


def _display(arg: str) -> str:
    """A path inside the repository, relative to its root (as the report's commands are run from there)."""
    if os.path.isabs(arg) and Path(arg).resolve().is_relative_to(ROOT):
        return os.path.relpath(arg, ROOT)
    return arg


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lpips_backbone(out: Path) -> tuple[dict[str, str], str]:
    """(environment for the LPIPS run, what it uses). Real ImageNet AlexNet weights when torch's hub cache has them;
    otherwise a seeded random AlexNet feature extractor, saved where torchvision looks in a private TORCH_HOME."""
    import torchvision

    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    name = os.path.basename(url)
    if os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name)):
        return {}, "the ImageNet AlexNet backbone from torchvision (real LPIPS-Alex)"
    home = out / "torch-home"
    path = home / "hub" / "checkpoints" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            features = torchvision.models.alexnet().features  # torchvision's default initialisation
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return {"TORCH_HOME": str(home)}, (
        "a RANDOMLY INITIALISED AlexNet backbone (torchvision's default init, seed 0; the machine is offline and has "
        "no ImageNet weights) under the lpips package's trained linear heads: a fixed random-feature distance with "
        "LPIPS's architecture and 224x224 upsampling, not the perceptual metric of the paper"
    )


def train(run: Runner, out: Path, budget: Budget) -> tuple[dict[str, float], str]:
    """Train the teacher and the four students (a finished run directory is reused); returns seconds per run."""
    seconds = {}
    teacher = out / "edm" / "model.safetensors"
    common = ["--seed", SEED, "--sample-every", 0, *(["--ema", budget.ema] if budget.ema else [])]

    def fit(name: str, command: str, args: list, env=None) -> None:
        run_dir = out / name
        if (run_dir / "model.safetensors").is_file():
            print(f"reusing {run_dir / 'model.safetensors'}")
            seconds[name] = float("nan")
            return
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        seconds[name] = run(command, *args, *common, "--run-dir", run_dir, *resume, env=env)

    fit("edm", "train-edm", ["--preset", "digits-edm", "--steps", budget.teacher_steps])
    lpips_env, lpips_note = lpips_backbone(out)
    for s in STUDENTS:
        args = [*s.args, "--steps", budget.student_steps]
        if s.command == "distill":
            args += ["--teacher", teacher]
        if s.name == "cd-lpips":
            args += ["--batch", budget.lpips_batch]
        fit(s.name, s.command, args, env=lpips_env if s.name == "cd-lpips" else None)
    return seconds, lpips_note


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def scm_run(out: Path, budget: Budget, progress: bool = False) -> list[dict]:
    """Train and evaluate the sCM students (a finished run is reused); writes OUT/scm-results.json, returns its rows.
    sCD distils this bench's teacher (OUT/edm) when it exists, else the shipped digits-edm."""
    run = Runner(out, progress)
    teacher = out / "edm" / "model.safetensors"
    rows, ev = [], out / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    common = ["--seed", SEED, "--sample-every", 0, "--steps", budget.student_steps]
    for s in SCM_STUDENTS:
        run_dir = out / s.name
        args = [*s.args, *common, *(["--teacher", teacher] if s.command == "distill-scd" and teacher.is_file() else [])]
        seconds = float("nan")
        if not (run_dir / "model.safetensors").is_file():
            resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
            seconds = run(s.command, *(args if not resume else []), "--run-dir", run_dir, *resume)
        for n in (1, 2):
            path = ev / f"{s.name}-{n}step.json"
            run("eval", "--model", run_dir / "model.safetensors", "--steps", n, "--num", budget.num_eval,
                "--seed", EVAL_SEED, "--out", path)  # fmt: skip
            rows.append({**_read(path), "label": s.label, "name": s.name, "steps": n, "train_seconds": seconds})
    from cmfast.io import atomic_write_bytes

    record = {"rows": rows, "commands": run.log, "date": datetime.date.today().isoformat(), "machine": machine()}
    atomic_write_bytes(out / "scm-results.json", json.dumps(record, indent=2).encode())
    return rows


def evaluate(run: Runner, out: Path, budget: Budget) -> dict:
    """Tune, evaluate and sample every model; returns {"rows": [...], "tuned": {...}, "floor": {...}}."""
    ev, grids = out / "eval", out / "grids"
    ev.mkdir(parents=True, exist_ok=True)
    final = ["--num", budget.num_eval, "--seed", EVAL_SEED]
    rows = []
    run("eval", "--images", "digits8", "--out", ev / "data-train-split.json")
    floor = _read(ev / "data-train-split.json")
    teacher = out / "edm" / "model.safetensors"
    for n in budget.teacher_heun:
        path = ev / f"edm-heun{n}.json"
        run("eval", "--model", teacher, "--steps", n, *final, "--out", path)
        rows.append({**_read(path), "label": "EDM teacher (Heun)", "name": "edm", "steps": n})
    run("sample", "--model", teacher, "--steps", max(budget.teacher_heun), "--num", budget.grid_images,
        "--seed", EVAL_SEED, "--out", grids / f"edm-heun{max(budget.teacher_heun)}")  # fmt: skip
    tuned = {}
    for s in STUDENTS:
        model = out / s.name / "model.safetensors"
        tune = ev / f"{s.name}-tune.json"
        run("tune-steps", "--model", model, "--grid", budget.grid, "--num", budget.num_search, "--seed", SEED,
            "--max-steps", max(budget.student_steps_eval), "--out", tune)  # fmt: skip
        tuned[s.name] = _read(tune)
        for n in budget.student_steps_eval:
            ts = tuned[s.name]["chosen"][str(n)]["ts"]
            when = ["--steps", 1] if n == 1 else ["--ts", ",".join(map(str, ts)), "--grid", budget.grid]
            path = ev / f"{s.name}-{n}step.json"
            run("eval", "--model", model, *when, *final, "--out", path)
            rows.append({**_read(path), "label": s.label, "name": s.name, "steps": n})
            if n <= 2:
                run("sample", "--model", model, *when, "--num", budget.grid_images, "--seed", EVAL_SEED,
                    "--out", grids / f"{s.name}-{n}step")  # fmt: skip
    return {"rows": rows, "tuned": tuned, "floor": floor}


# --- report ----------------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    by_name: dict[str, list] = {}
    for r in results["rows"]:
        by_name.setdefault(r["label"], []).append((r["evaluations"], r["metrics"]["fid"]))
    for label, points in by_name.items():
        x, y = zip(*sorted(points))
        style = dict(marker="s", lw=2, color="black") if "teacher" in label else dict(marker="o", lw=1.5)
        ax.plot(x, y, label=label, **style)
    ax.axhline(results["floor"]["metrics"]["fid"], color="gray", ls="--", lw=1, label="real digits (train vs test)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfe = sorted({r["evaluations"] for r in results["rows"]})
    ax.set_xticks(nfe, [str(n) for n in nfe])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("digits FID (lower is better)")
    ax.set_title("FID against network evaluations, 8x8 digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def sample_panel(grids: Path, panels: list[tuple[str, str]], path: Path) -> None:
    """One PNG with a captioned sample grid per (folder name, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 5
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    from cmfast.io import image_grid

    for ax, (folder, caption) in zip(axes.flat, panels):
        with np.load(grids / folder / "samples.npz") as data:
            grid = image_grid(data["images"], ncols=8)
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def report(results: dict, info: dict, b: Budget, doc: Path, figdir: Path) -> str:
    rows, floor = results["rows"] + results.get("scm", []), results["floor"]["metrics"]["fid"]
    heun = {r["steps"]: r for r in rows if r["name"] == "edm"}
    ref_steps = 18 if 18 in heun else max(heun)
    ref = heun[ref_steps]["metrics"]["fid"]
    fid = {(r["name"], r["steps"]): r["metrics"]["fid"] for r in rows}
    rel = os.path.relpath(figdir, doc.parent)

    lines = [
        "# Consistency models on the digits: the paper's table in miniature",
        "",
        f"Written by `bench/quality_digits.py{' --quick' if info['mode'] == 'quick' else ''}` on {info['date']} "
        f"({info['mode']} budget, {info['wall_minutes']:.1f} minutes in all).",
        f"Machine: {info['machine']}.",
        *([f"Budget note: {info['note']}"] if info.get("note") else []),
        "",
        "All numbers are **digits FID**: the Frechet distance between Gaussians fitted to the penultimate features "
        "of the shipped digits classifier (`cmfast/assets/digits-classifier.safetensors`, 99.67% test accuracy), "
        f"for {b.num_eval} generated images (seeds {EVAL_SEED}..{EVAL_SEED + b.num_eval - 1}) against the 300-image "
        "held-out test split. The scale is the classifier's (unit mean variance per feature on the train split); "
        "only ratios compare with the paper's Inception FIDs. For scale: the 1497 real training digits score "
        f"**{_fmt(floor)}** against the test split (the floor at this sample size).",
        "",
        "| model | sampler | steps | NFE | time points (ts on the grid, or sigmas) | digits FID | / teacher "
        f"({heun[ref_steps]['evaluations']} NFE) | KID | precision | recall | IS (classifier) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        if r["name"] == "edm":
            sampler, points = "EDM Heun", f"{r['steps']} Karras points + 0"
        else:
            sampler = "Algorithm 1"
            points = (
                f"ts {','.join(map(str, r['ts']))} / {r['grid']}"
                if "ts" in r
                else "sigma " + ", ".join(f"{s:g}" for s in r["sigmas"])
            )
        lines.append(
            f"| {r['label']} | {sampler} | {r['steps']} | {r['evaluations']} | {points} | **{_fmt(m['fid'])}** | "
            f"{_fmt(m['fid'] / ref, 2)}x | {_fmt(m['kid'], 4)} | {_fmt(m['precision'], 3)} | {_fmt(m['recall'], 3)} "
            f"| {_fmt(m['is'], 2)} |"
        )
    lines += ["", f"![digits FID against network evaluations]({rel}/fid-vs-nfe.png)", ""]

    def ratio(name, steps):
        return fid.get((name, steps), float("nan")) / ref

    two = heun.get(2, {}).get("metrics", {}).get("fid", float("nan"))
    aims = [
        ("CD (l2) at 1 step within 1.5x the teacher", ratio("cd-l2", 1), 1.5),
        ("CD (LPIPS) at 1 step within 1.5x the teacher", ratio("cd-lpips", 1), 1.5),
        ("CD (l2) at 2 steps within 1.2x the teacher", ratio("cd-l2", 2), 1.2),
        ("CD (LPIPS) at 2 steps within 1.2x the teacher", ratio("cd-lpips", 2), 1.2),
        ("CT (paper schedule) at 1 step within 2.5x the teacher", ratio("ct", 1), 2.5),
        ("CT (iCT options) at 1 step within 2.5x the teacher", ratio("ict", 1), 2.5),
    ]
    lines += [
        "## The aims, and what came out",
        "",
        "The paper (CIFAR-10, LPIPS CD): one-step CD at 1.74x and two-step at 1.44x its teacher's 35-NFE FID. The "
        "aims here, judged on this run's numbers:",
        "",
        "| aim | measured | met |",
        "|---|---|---|",
    ]
    for text, value, limit in aims:
        met = "yes" if value <= limit else "no"
        lines.append(f"| {text} | {_fmt(value, 2)}x | {met} |")
    for s in STUDENTS:
        one = fid.get((s.name, 1), float("nan"))
        met = "yes" if one < two / 2 else "no"
        lines.append(
            f"| {s.label} at 1 step far better (under half) than the teacher at 2 Heun steps "
            f"({heun.get(2, {}).get('evaluations', 'n/a')} NFE, FID {_fmt(two)}) | {_fmt(one)} | {met} |"
        )
    collapsed = [r for r in rows if r["name"] != "edm" and r["steps"] == 1 and r["metrics"]["precision"] < 0.05]
    lines += [
        "",
        f"Every ratio includes the finite-sample floor ({_fmt(floor)}, the real training digits' own score): the "
        f"teacher's FID above the floor is {_fmt(ref - floor)}.",
    ]
    lines += [
        f"{r['label']} did not learn digits: at one step its precision is {_fmt(r['metrics']['precision'])} (no "
        "generated image lies near a real one; see the grids)."
        for r in collapsed
    ]
    lines += [
        "",
        "## Time points found by `cmfast tune-steps`",
        "",
        f"Greedy ternary search over the index of a {b.grid}-point Karras grid (ts starts at 0 = sigma_max and ends at "
        f"{b.grid - 1} = sigma_min), minimising digits FID of {b.num_search} images from seeds {SEED}.. (not the "
        "final evaluation's seeds, so the chosen points are not scored on the images that chose them).",
        "",
        "| model | 2 steps: ts (search FID) | 3 steps: ts (search FID) | FID evaluations |",
        "|---|---|---|---|",
    ]
    for s in STUDENTS:
        t = results["tuned"][s.name]
        cells = [
            f"{','.join(map(str, t['chosen'][str(n)]['ts']))} ({_fmt(t['chosen'][str(n)]['fid'])})"
            for n in b.student_steps_eval
            if n > 1
        ]
        lines.append(f"| {s.label} | {' | '.join(cells)} | {len(t['scored'])} |")
    panels = [f"![sample grids]({rel}/samples.png)"]
    lines += [
        "",
        "## Samples",
        "",
        f"{b.grid_images} images per grid, seeds {EVAL_SEED}.., the same noise for every model; the teacher at "
        f"{max(b.teacher_heun)} Heun steps, each student at 1 and 2 steps (tuned ts).",
        "",
        *panels,
        "",
        "## Setup",
        "",
        "- Data: the built-in digits (scikit-learn's 8x8 handwritten digits), train split (1497 images); network "
        "`ddpmpp-digits8` (1.03M parameters) for every model.",
        f"- Budgets: teacher {b.teacher_steps} steps at batch 64; every student {b.student_steps} steps (CD-l2, CT, "
        f"iCT at batch 64; CD-LPIPS at batch {b.lpips_batch}, see below). Presets `digits-edm`, `digits-cd` (N = 18, "
        "Heun, mu = 0.95, lr 2e-4), `digits-ct` (s0 = 2, s1 = 150, mu0 = 0.9, lr 4e-4), `digits-ict`; the EMA "
        f"({b.ema or '0.999'}) is evaluated.",
        f"- LPIPS: {info['lpips']}. LPIPS at 224x224 costs about 4 s per batch of 64 on this CPU, so its run uses "
        f"batch {b.lpips_batch} for the same {b.student_steps} steps: {b.lpips_batch / 64:.2g} of the other students' "
        "training images. Its row is not an equal-budget comparison in images.",
        f"- Seeds: training {SEED} (weights, data order, noise); time-point search seeds {SEED}..; final evaluation "
        f"and grids seeds {EVAL_SEED}.. (image i uses seed SEED + i, independent of the batch).",
        "- Metrics: digits FID (`cmfast.evaluation.frechet`), KID (polynomial kernel, subsets of min(1000, N)), "
        "precision/recall (k = 3) and IS from torch-fidelity's functions on the same classifier features/logits. "
        "The reference (300 images) is small: KID and precision/recall are noisy at this size.",
        "- Training wall time (minutes): "
        + ", ".join(f"{k} {_fmt(v / 60, 1)}" for k, v in info["train_seconds"].items())
        + ". Reused runs show n/a.",
        "",
        "## Commands",
        "",
        "Run in this order from the repository root (the script runs them in-process through `cmfast.cli.main`):",
        "",
        "```bash",
        *[c for c, _ in info["commands"]],
        "```",
        "",
    ]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    from cmfast.io import atomic_write_bytes

    atomic_write_bytes(doc, text.encode())
    return text


def write_outputs(results: dict, info: dict, budget: Budget, out: Path, doc: Path, figdir: Path) -> None:
    """The plot, the sample panel and the report, from the results (and the grids under OUT/grids)."""
    plot(results, figdir / "fid-vs-nfe.png")
    top = max(budget.teacher_heun)
    panels = [(f"edm-heun{top}", f"EDM teacher, {top} Heun steps ({2 * top - 1} NFE)")]
    for s in STUDENTS:
        panels += [(f"{s.name}-{n}step", f"{s.label}, {n} step{'s' if n > 1 else ''}") for n in (1, 2)]
    sample_panel(out / "grids", panels, figdir / "samples.png")
    report(results, info, budget, doc, figdir)
    print(f"wrote {doc}, {figdir / 'fid-vs-nfe.png'} and {figdir / 'samples.png'}")


def _with_scm(results: dict, out: Path) -> dict:
    """The results with the sCM rows of OUT/scm-results.json, when `--scm` wrote one."""
    path = out / "scm-results.json"
    return {**results, "scm": _read(path)["rows"]} if path.is_file() else results


def report_only(out: Path, doc: Path, figdir: Path) -> None:
    """Rewrite the report and figures of a finished run from OUT/results.json."""
    saved = _with_scm(json.loads((out / "results.json").read_text()), out)
    info = saved.pop("info")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info["budget"].items()}
    write_outputs(saved, info, Budget(**fields), out, doc, figdir)


def run(
    mode: str,
    out: Path,
    doc: Path,
    figdir: Path,
    progress: bool = False,
    budget: Budget | None = None,
    note: str | None = None,
) -> dict:
    budget = budget or BUDGETS[mode]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runner = Runner(out, progress)
    train_seconds, lpips_note = train(runner, out, budget)
    results = evaluate(runner, out, budget)
    info = dict(
        mode=mode,
        budget=asdict(budget),
        date=datetime.date.today().isoformat(),
        machine=machine(),
        lpips=lpips_note,
        train_seconds=train_seconds,
        commands=runner.log,
        wall_minutes=(time.perf_counter() - t0) / 60,
        note=note,
    )
    from cmfast.io import atomic_write_bytes

    atomic_write_bytes(out / "results.json", json.dumps({"info": info, **results}, indent=2).encode())
    write_outputs(_with_scm(results, out), info, budget, out, doc, figdir)
    return {"info": info, **results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small budgets (a few minutes); writes into --out only")
    p.add_argument("--out", type=Path, help="run directory (default runs/quality-digits[-quick])")
    p.add_argument("--doc", type=Path, help="report (default docs/results-digits.md; --quick: OUT/results-digits.md)")
    p.add_argument("--figdir", type=Path, help="images (default docs/results-digits/; --quick: OUT/results-digits/)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--progress", action="store_true", help="show the commands' progress bars")
    p.add_argument("--report-only", action="store_true", help="rewrite report and figures from OUT/results.json")
    p.add_argument(
        "--scm", action="store_true", help="only train and evaluate the sCM students (writes OUT/scm-results.json)"
    )
    p.add_argument("--student-steps", type=int, help="override the budget's steps of every student")
    p.add_argument("--lpips-batch", type=int, help="override the budget's CD-LPIPS batch")
    p.add_argument("--ema", help="override the budget's EMA rate (runs trained from here on)")
    p.add_argument("--note", help="a sentence for the report, e.g. why the budget was overridden")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out or ROOT / "runs" / f"quality-digits{'-quick' if args.quick else ''}"
    doc = args.doc or (out / "results-digits.md" if args.quick else ROOT / "docs" / "results-digits.md")
    figdir = args.figdir or (out / "results-digits" if args.quick else ROOT / "docs" / "results-digits")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = BUDGETS[mode]
    overrides = {k: getattr(args, k) for k in ("student_steps", "lpips_batch", "ema") if getattr(args, k) is not None}
    if args.scm:
        for r in scm_run(out, replace(budget, **overrides), args.progress):
            print(f"{r['label']}, {r['steps']} step(s): digits FID {r['metrics']['fid']:.3f}")
    elif args.report_only:
        report_only(out, doc, figdir)
    else:
        run(mode, out, doc, figdir, progress=args.progress, budget=replace(budget, **overrides), note=args.note)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
